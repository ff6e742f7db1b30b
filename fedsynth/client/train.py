"""The local GAN round a hospital runs: plain PyTorch, no Flower."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..shared.config import TrainConfig
from ..shared.device import autocast_for
from ..shared.models import DiscriminatorOutput, gradient_penalty
from .augment import diff_augment, diff_augment_paired

__all__ = [
    "BatchSource",
    "RoundStats",
    "discriminator_loss",
    "generator_loss",
    "generator_step",
    "make_optimizers",
    "mode_seeking_loss",
    "paired_generator_step",
    "r1_penalty",
    "train_round",
    "train_round_cycle",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundStats:
    """What one local round did, reported to the server as metrics."""

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
    # cyclegan: each half's weight in the server's average. A translator's: the real slices
    # its adversarial signal came from (0: not trained here); a domain's PatchGAN's: this
    # hospital's real slices of that domain (0: not trained here).
    weight_a2b: float = float("nan")
    weight_b2a: float = float("nan")
    weight_a: float = float("nan")
    weight_b: float = float("nan")

    def as_metrics(self) -> dict[str, float | int]:
        """Kebab-case metric names, with ``num-examples`` for weighted averaging. A NaN
        value means "not reported" (DP rounds withhold what real images would reveal) and
        is left out."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()
                if not (isinstance(v, float) and math.isnan(v))}


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


def discriminator_loss(real: DiscriminatorOutput, fake: DiscriminatorOutput, labels: torch.Tensor, kind: str) -> torch.Tensor:
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
    gen: nn.Module, disc: nn.Module, opt_g: torch.optim.Optimizer, labels: torch.Tensor, cfg: TrainConfig,
    *, generator: torch.Generator, autocast: contextlib.AbstractContextManager | None = None,
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
    if hasattr(gen, "update_ema"):  # stylegan2-lite keeps an EMA of its weights for sampling
        gen.update_ema()
    return loss.detach()


def paired_generator_step(
    gen: nn.Module, disc: nn.Module, opt_g: torch.optim.Optimizer, real: torch.Tensor, masks: torch.Tensor,
    cfg: TrainConfig, *, generator: torch.Generator, autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pix2pix's generator update: the adversarial loss of the (mask, generated slice)
    pair through the frozen discriminator, plus ``cfg.l1_weight`` x the mean absolute
    difference to the real slice of the same mask. Returns (adversarial loss, L1)."""
    opt_g.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        fake = gen(None, masks)
        loss = generator_loss(disc(*diff_augment_paired(fake, masks, cfg.augment, generator)), masks, cfg.objective)
        l1 = (fake.float() - real).abs().mean()
        total = loss + cfg.l1_weight * l1
    total.float().backward()
    opt_g.step()
    return loss.detach(), l1.detach()


def _augment(x: torch.Tensor, condition: torch.Tensor, policy: str, generator: torch.Generator,
             paired: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffAugment for what the discriminator sees: the slice alone, or for pix2pix the
    slice and its mask together (same translation and cutout)."""
    if paired:
        return diff_augment_paired(x, condition, policy, generator)
    return diff_augment(x, policy, generator), condition


def _optimizer_steps(opt: torch.optim.Optimizer) -> int:
    for group in opt.param_groups:
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if step is not None:
                return int(step)
    return 0


def r1_penalty(disc: nn.Module, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mescheder et al.'s R1: E ||grad_x D(x)||^2 at real images, differentiable in D's
    weights (the caller scales it by gamma / 2 and, lazily applied, by the interval)."""
    x = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(x, labels).adv.sum(), x, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def make_optimizers(gen: nn.Module, disc: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for both networks, with the configured learning rates and betas."""
    betas = (cfg.beta1, cfg.beta2)
    return (
        torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=betas),
        torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=betas),
    )


def train_round(
    gen: nn.Module,
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

    For pix2pix (``gen.paired``) the batch's "labels" are its masks (N, H, W): fakes are
    generated from the real batch's masks, the discriminator sees (slice, mask) pairs
    augmented together, and the generator update adds L1 to the real slices
    (``paired_generator_step``).

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
    paired = bool(getattr(gen, "paired", False))
    start = time.perf_counter()
    latent = gen.latent_dim
    r1 = cfg.r1_gamma if getattr(disc, "wants_r1", False) else 0.0
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
            real_aug, cond_real = _augment(real, labels, cfg.augment, generator, paired)
            fake_aug, cond_fake = _augment(fake, labels, cfg.augment, generator, paired)
            with mixed:
                out_real = disc(real_aug, cond_real)
                out_fake = disc(fake_aug, cond_fake)
                loss_d = discriminator_loss(out_real, out_fake, labels, cfg.objective)
                if cfg.objective == "wgan-gp" and cfg.gp_weight > 0:
                    loss_d = loss_d + cfg.gp_weight * gradient_penalty(disc, real_aug, fake_aug, labels,
                                                                       generator=generator)
                if r1 > 0 and d_step % cfg.r1_interval == 0:
                    loss_d = loss_d + r1_penalty(disc, real_aug, labels) * (r1 / 2 * cfg.r1_interval)
            loss_d.float().backward()
            opt_d.step()
        # --- generator (discriminator frozen: no weight gradients needed) ---
        disc.requires_grad_(False)
        if paired:
            loss_g, l1 = paired_generator_step(gen, disc, opt_g, real, labels, cfg, generator=generator,
                                               autocast=mixed)
            l1s.append(l1.float())
        else:
            loss_g = generator_step(gen, disc, opt_g, labels, cfg, generator=generator, autocast=mixed)
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
    if not np.isfinite([stats.d_loss, stats.g_loss]).all():
        raise FloatingPointError(
            f"training diverged (d-loss {stats.d_loss}, g-loss {stats.g_loss}); "
            "lower train.lr-g / train.lr-d"
        )
    return stats


def train_round_cycle(
    gen: nn.Module,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    domain_a: BatchSource | None,
    domain_b: BatchSource | None,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    shared_judges: bool = False,
) -> RoundStats:
    """CycleGAN's local round: ``cfg.local_steps`` steps, each one update of both
    discriminators and one of both translators.

    A hospital holding **both domains** trains CycleGAN as in the paper: D_A judges real A
    against G_BA(b), D_B real B against G_AB(a); the translators are trained with the
    adversarial loss of G_AB(a) and G_BA(b), the cycle L1 of G_BA(G_AB(a)) to a and
    G_AB(G_BA(b)) to b, and the identity L1 of G_BA(a) to a and G_AB(b) to b.

    A hospital holding **only domain A** has no real B to judge G_AB(a) with, so it trains
    what it can: D_A judges real A against the round trip G_BA(G_AB(a)), and G_BA learns
    to map the current G_AB's translations back to realistic A (adversarial through D_A,
    cycle L1 and identity L1). G_AB only runs forward: it is not updated here, and the
    hospital's ``weight_a2b`` is 0, so the server averages G_AB over the hospitals that
    hold real B. Symmetrically for a hospital holding only B.

    ``shared_judges`` (the discriminators came from the server,
    ``federation.aggregate-discriminator``): a hospital holding only A also judges
    G_AB(a) with the received D_B, trained at the hospitals holding B and frozen here,
    so it trains G_AB too (adversarial through D_B, plus the cycle), with weight the A
    slices it translated. D_B itself is not updated here (no real B), and its weight is 0.

    Each translator's weight in the server's average (``weight_a2b``, ``weight_b2a``) is
    the number of real slices its adversarial signal came from: of its target domain, or
    with shared judges of its source domain; each PatchGAN's (``weight_a``,
    ``weight_b``) the number of real slices of its domain here.
    """
    if domain_a is None and domain_b is None:
        raise ValueError("no training slices of either domain at this hospital")
    sources = {"a": domain_a, "b": domain_b}
    device = (domain_a or domain_b).images.device  # type: ignore[union-attr]
    mixed = autocast_for(device, cfg.mixed_precision)
    gen.train()
    disc.train()
    # A translator into a domain with no real slices here, and no shared judge of it, is not trained.
    frozen = [] if shared_judges else [d for d, s in (("a2b", domain_b), ("b2a", domain_a)) if s is None]
    for direction in frozen:
        getattr(gen, direction).requires_grad_(False)
    d_losses, g_losses, d_real, d_fake, cycles = [], [], [], [], []
    identity = cfg.identity_weight * cfg.cycle_weight
    other = {"a": "b", "b": "a"}
    start = time.perf_counter()
    try:
        for _ in range(cfg.local_steps):
            real = {d: s.next()[0] for d, s in sources.items() if s is not None}
            # --- discriminators: each domain present judges its real slices against fakes of it
            with torch.no_grad(), mixed:
                fakes = {}
                for d in real:
                    o = other[d]
                    if o in real:  # translated from the other domain's real slices
                        fakes[d] = gen(None, real[o], f"{o}2{d}").float()
                    else:  # the round trip of this domain's own slices
                        fakes[d] = gen(None, gen(None, real[d], f"{d}2{o}"), f"{o}2{d}").float()
            opt_d.zero_grad(set_to_none=True)
            loss_d = torch.zeros((), device=device)
            outs_real, outs_fake = [], []
            with mixed:
                for d in real:
                    out_real = disc(diff_augment(real[d], cfg.augment, generator), d)
                    out_fake = disc(diff_augment(fakes[d], cfg.augment, generator), d)
                    loss_d = loss_d + discriminator_loss(out_real, out_fake, real[d], cfg.objective)
                    outs_real.append(out_real.adv.detach().float().mean())
                    outs_fake.append(out_fake.adv.detach().float().mean())
            loss_d.float().backward()
            opt_d.step()
            # --- translators, discriminators frozen
            disc.requires_grad_(False)
            opt_g.zero_grad(set_to_none=True)
            adv = torch.zeros((), device=device)
            cycle = torch.zeros((), device=device)
            ident = torch.zeros((), device=device)
            with mixed:
                for d in real:
                    o = other[d]
                    translated = gen(None, real[d], f"{d}2{o}")
                    back = gen(None, translated, f"{o}2{d}")
                    cycle = cycle + (back.float() - real[d]).abs().mean()
                    ident = ident + (gen(None, real[d], f"{o}2{d}").float() - real[d]).abs().mean()
                    judged = []
                    if o in real or shared_judges:  # the translation, by the other domain's discriminator
                        judged.append((translated, o))
                    if o not in real:  # the way back, by this domain's own discriminator
                        judged.append((back, d))
                    for image, domain in judged:
                        adv = adv + generator_loss(disc(diff_augment(image, cfg.augment, generator), domain),
                                                   real[d], cfg.objective)
                total = adv + cfg.cycle_weight * cycle + identity * ident
            total.float().backward()
            opt_g.step()
            disc.requires_grad_(True)
            d_losses.append(loss_d.detach().float())
            g_losses.append(adv.detach().float())
            d_real.append(torch.stack(outs_real).mean())
            d_fake.append(torch.stack(outs_fake).mean())
            cycles.append(cycle.detach().float() / len(real))
    finally:
        for direction in frozen:
            getattr(gen, direction).requires_grad_(True)
    seconds = time.perf_counter() - start
    n = sum(len(s) for s in sources.values() if s is not None)
    images_seen = cfg.local_steps * sum(s.batch_size for s in sources.values() if s is not None)

    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.stack(values).mean().cpu())

    stats = RoundStats(
        steps=cfg.local_steps, num_examples=n, images_seen=images_seen,
        d_loss=mean(d_losses), g_loss=mean(g_losses), d_real=mean(d_real), d_fake=mean(d_fake),
        seconds=seconds, images_per_second=images_seen / seconds if seconds > 0 else float("nan"),
        l1=mean(cycles),
        weight_a2b=_translator_weight(domain_b, domain_a, shared_judges),
        weight_b2a=_translator_weight(domain_a, domain_b, shared_judges),
        weight_a=float(len(domain_a) if domain_a is not None else 0),
        weight_b=float(len(domain_b) if domain_b is not None else 0),
    )
    if not np.isfinite([stats.d_loss, stats.g_loss]).all():
        raise FloatingPointError(
            f"training diverged (d-loss {stats.d_loss}, g-loss {stats.g_loss}); lower train.lr-g / train.lr-d"
        )
    return stats


def _translator_weight(target: BatchSource | None, source: BatchSource | None, shared_judges: bool) -> float:
    """A translator's weight: the real slices of its target domain here, or, judged by a
    shared discriminator where there are none, the real slices it translated."""
    if target is not None:
        return float(len(target))
    return float(len(source)) if shared_judges and source is not None else 0.0
