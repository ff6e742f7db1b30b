"""The adversarial training loop the families share: losses, steps and one local round (plain PyTorch)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsynth.core.device import autocast_for
from fedsynth.models.augment import diff_augment, diff_augment_paired
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet

if TYPE_CHECKING:
    from fedsynth.runs.config import TrainConfig

__all__ = [
    "BatchSource",
    "RoundStats",
    "discriminator_loss",
    "finite",
    "generator_loss",
    "generator_step",
    "gradient_penalty",
    "make_optimizers",
    "mode_seeking_loss",
    "paired_generator_step",
    "r1_penalty",
    "train_round",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundStats:
    """What one local round did, reported to the server as metrics. A family whose
    networks have parts trained by only some hospitals subclasses it with a
    ``weight_<part>`` field per part (reported as ``weight-<part>``: see
    :mod:`fedsynth.models.family`)."""

    steps: int
    num_examples: int
    images_seen: int
    d_loss: float
    g_loss: float
    d_real: float  # mean D(real) logit
    d_fake: float  # mean D(fake) logit
    seconds: float
    images_per_second: float
    l1: float = float("nan")  # pix2pix: mean |generated - real| of the same mask; cyclegan: the cycle's
    # mean |A -> B -> A - A| (and B -> A -> B), in [-1, 1] units

    def as_metrics(self) -> dict[str, float | int]:
        """Kebab-case metric names, with ``num-examples`` for weighted averaging. A NaN
        value means "not reported" (DP rounds withhold what real images would reveal) and
        is left out."""
        return {
            k.replace("_", "-"): v
            for k, v in asdict(self).items()
            if not (isinstance(v, float) and math.isnan(v))
        }


class BatchSource:
    """Random mini-batches of a hospital's training slices, kept in memory on the device.

    Each pass visits every slice once in a fresh random order (sampling without
    replacement within an epoch). The whole set sits on the device: a hospital's 64 px
    slice set is a few MB, so a DataLoader would only add overhead.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, generator: torch.Generator
    ) -> None:
        if len(images) == 0:
            raise ValueError("no training slices at this hospital")
        self.images, self.labels = images, labels
        self.batch_size = min(batch_size, len(images))
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._order) < self.batch_size:
            fresh = torch.randperm(len(self.images), generator=self.generator)
            self._order = torch.cat([self._order, fresh])
        idx, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        idx = idx.to(self.images.device)
        return self.images[idx], self.labels[idx]


def discriminator_loss(
    real: DiscriminatorOutput, fake: DiscriminatorOutput, labels: torch.Tensor, kind: str
) -> torch.Tensor:
    """Adversarial loss of the discriminator (+ class loss on real images for AC heads).
    For ``wgan-gp`` the Wasserstein critic loss E[D(fake)] - E[D(real)]; the gradient
    penalty is added by the caller, which holds the inputs."""
    if kind in ("hinge", "auto"):
        loss = F.relu(1 - real.adv).mean() + F.relu(1 + fake.adv).mean()
    elif kind == "wgan-gp":
        loss = fake.adv.mean() - real.adv.mean()
    else:  # non-saturating BCE on logits
        loss = F.softplus(-real.adv).mean() + F.softplus(fake.adv).mean()
    if real.class_logits is not None:
        loss = loss + F.cross_entropy(real.class_logits, labels)
    return loss


def generator_loss(fake: DiscriminatorOutput, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Adversarial loss of the generator (+ class loss on its images for AC heads); for
    hinge and wgan-gp alike -E[D(G(z))]."""
    loss = F.softplus(-fake.adv).mean() if kind == "bce" else -fake.adv.mean()
    if fake.class_logits is not None:
        loss = loss + F.cross_entropy(fake.class_logits, labels)
    return loss


def mode_seeking_loss(images: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mode-seeking regulariser (Mao et al., MSGAN, CVPR 2019) for a batch whose second
    half repeats the first half's labels with fresh noise: 1 / (mean image distance /
    mean noise distance) over the pairs. It grows when different noise gives the same
    image, the one-image-per-class collapse a conditional DCGAN falls into within its
    first 50 steps on a few hundred slices. It reads only generated images."""
    half = len(images) // 2
    image_gap = (images[:half] - images[half : 2 * half]).abs().mean(dim=tuple(range(1, images.dim())))
    noise_gap = (z[:half] - z[half : 2 * half]).abs().mean(dim=1)
    return 1.0 / ((image_gap / noise_gap).mean() + 1e-5)


def generator_step(
    gen: GeneratorNet,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    labels: torch.Tensor,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """One generator update through the (frozen) discriminator, with the same
    augmentation as the discriminator sees and, if ``cfg.diversity_weight``, the
    mode-seeking term over pairs of noise vectors that share a label. Returns the
    adversarial part of the loss."""
    n = len(labels)
    device = labels.device
    if cfg.diversity_weight > 0 and n >= 2:
        half = n // 2
        labels = torch.cat([labels[:half], labels[:half], labels[2 * half :]])
    z = torch.randn(n, gen.latent_dim, generator=generator).to(device)
    opt_g.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        fake = gen(z, labels)
        loss = generator_loss(disc(diff_augment(fake, cfg.augment, generator), labels), labels, cfg.objective)
        total = loss
        if cfg.diversity_weight > 0 and n >= 2:
            total = loss + cfg.diversity_weight * mode_seeking_loss(fake.float(), z)
    total.float().backward()
    opt_g.step()
    return loss.detach()


def paired_generator_step(
    gen: GeneratorNet,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    real: torch.Tensor,
    masks: torch.Tensor,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pix2pix's generator update: the adversarial loss of the (mask, generated slice)
    pair through the frozen discriminator, plus ``cfg.l1_weight`` x the mean absolute
    difference to the real slice of the same mask. Returns (adversarial loss, L1)."""
    opt_g.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        fake = gen(None, masks)
        loss = generator_loss(
            disc(*diff_augment_paired(fake, masks, cfg.augment, generator)), masks, cfg.objective
        )
        l1 = (fake.float() - real).abs().mean()
        total = loss + cfg.l1_weight * l1
    total.float().backward()
    opt_g.step()
    return loss.detach(), l1.detach()


def _optimizer_steps(opt: torch.optim.Optimizer) -> int:
    for group in opt.param_groups:
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if step is not None:
                return int(step)
    return 0


def gradient_penalty(
    critic: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Gulrajani et al.'s penalty E[(||grad_x D(x_hat)||_2 - 1)^2] at x_hat = e*a + (1-e)*b,
    e ~ U(0, 1) per image, with the graph kept so that it can be minimised over D's weights.

    In a plain run ``a`` is the real batch and ``b`` the generated one. Under DP,
    fedsynth calls it with two independent batches of *generated* images: then the
    penalty reads no patient data (see ``fedsynth/models/training_dp.py``)."""
    e = torch.rand(len(a), 1, 1, 1, generator=generator).to(a.device)
    x_hat = (e * a.detach() + (1 - e) * b.detach()).requires_grad_(True)
    score = critic(x_hat, labels).adv
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def r1_penalty(disc: nn.Module, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mescheder et al.'s R1: E ||grad_x D(x)||^2 at real images, differentiable in D's
    weights (the caller scales it by gamma / 2 and, lazily applied, by the interval)."""
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x, labels).adv.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def make_optimizers(
    gen: GeneratorNet, disc: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for both networks, with the configured learning rates and betas."""
    betas = (cfg.beta1, cfg.beta2)
    return (
        torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=betas),
        torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=betas),
    )


Stats = TypeVar("Stats", bound=RoundStats)


def finite(stats: Stats) -> Stats:
    """``stats`` of a round whose losses are finite.

    Raises
    ------
    FloatingPointError
        A loss is NaN or infinite (training diverged).
    """
    if not np.isfinite([stats.d_loss, stats.g_loss]).all():
        raise FloatingPointError(
            f"training diverged (d-loss {stats.d_loss}, g-loss {stats.g_loss}); lower train.lr-g / train.lr-d"
        )
    return stats


def train_round(
    gen: GeneratorNet,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    batches: BatchSource,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
) -> RoundStats:
    """Train G and D for ``cfg.local_steps`` alternating steps.

    Each step: ``cfg.critic_steps_per_step`` discriminator updates (1, or ``n-critic``
    for WGAN-GP), each on a fresh real batch and as many generated images (conditioned
    on the real batch's labels, so fakes follow this hospital's class mix), both through
    the same DiffAugment policy (``cfg.augment``), with the gradient penalty at points
    between them for ``wgan-gp``; then one generator update through the discriminator
    with its weights frozen (``generator_step``).

    What differs between families comes from the run's family (``cfg.family``): how
    the discriminator's inputs are augmented (pix2pix: the slice and its mask together;
    its batch's "labels" are masks), the generator's update (pix2pix adds L1 to the real
    slices), lazy R1 (``uses_r1``) and what follows each generator update (stylegan2-lite
    moves its EMA).

    Parameters
    ----------
    gen, disc : the networks, already on the device of ``batches``.
    opt_g, opt_d : their optimizers (kept across rounds by the caller).
    batches : the hospital's training slices.
    cfg : the training section of the run config.
    generator : the seeded random source for noise.

    Returns
    -------
    RoundStats with means over the round's steps.
    """
    device = batches.images.device
    mixed = autocast_for(device, cfg.mixed_precision)
    gen.train()
    disc.train()
    d_losses, g_losses, d_real, d_fake, l1s = [], [], [], [], []
    family = cfg.family
    start = time.perf_counter()
    latent = gen.latent_dim
    r1 = cfg.r1_gamma if family.uses_r1 else 0.0
    # Lazy R1 counts the discriminator's steps over the whole run (Adam's step count,
    # which the hospital keeps between rounds), so it fires every r1-interval steps even
    # when a round has fewer.
    d_step = _optimizer_steps(opt_d)
    for _ in range(cfg.local_steps):
        for _ in range(cfg.critic_steps_per_step):
            d_step += 1
            real, labels = batches.next()
            n = len(real)
            # --- discriminator ---
            z = torch.randn(n, latent, generator=generator).to(device)
            with torch.no_grad(), mixed:
                fake = gen(z, labels).float()
            opt_d.zero_grad(set_to_none=True)
            real_aug, cond_real = family.augment(real, labels, cfg.augment, generator)
            fake_aug, cond_fake = family.augment(fake, labels, cfg.augment, generator)
            with mixed:
                out_real = disc(real_aug, cond_real)
                out_fake = disc(fake_aug, cond_fake)
                loss_d = discriminator_loss(out_real, out_fake, labels, cfg.objective)
                if cfg.objective == "wgan-gp" and cfg.gp_weight > 0:
                    loss_d = loss_d + cfg.gp_weight * gradient_penalty(
                        disc, real_aug, fake_aug, labels, generator=generator
                    )
                if r1 > 0 and d_step % cfg.r1_interval == 0:
                    loss_d = loss_d + r1_penalty(disc, real_aug, labels) * (r1 / 2 * cfg.r1_interval)
            loss_d.float().backward()
            opt_d.step()
        # --- generator (discriminator frozen: no weight gradients needed) ---
        disc.requires_grad_(False)
        loss_g, l1 = family.generator_update(
            gen, disc, opt_g, real, labels, cfg, generator=generator, autocast=mixed
        )
        family.after_generator_step(gen)
        if l1 is not None:
            l1s.append(l1.float())
        disc.requires_grad_(True)
        d_losses.append(loss_d.detach().float())
        g_losses.append(loss_g.detach().float())
        d_real.append(out_real.adv.detach().float().mean())
        d_fake.append(out_fake.adv.detach().float().mean())
    seconds = time.perf_counter() - start
    images_seen = cfg.critic_steps * batches.batch_size

    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.stack(values).mean().cpu())

    stats = RoundStats(
        steps=cfg.local_steps,
        num_examples=len(batches),
        images_seen=images_seen,
        d_loss=mean(d_losses),
        g_loss=mean(g_losses),
        d_real=mean(d_real),
        d_fake=mean(d_fake),
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else float("nan"),
        l1=mean(l1s) if l1s else float("nan"),
    )
    return finite(stats)
