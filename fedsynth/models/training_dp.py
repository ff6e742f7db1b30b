"""The DP-SGD round of a noise-and-class family: only the discriminator's real term is
clipped per slice and noised, and only it is charged to the hospital's budget.

The discriminator's loss is a sum of a real term and a fake term. The fake term's
gradient is a function of the discriminator's current weights (themselves outputs of
earlier DP steps) and of images the generator made from public noise; it reads no
private data, so by post-processing it needs neither clipping nor noise. Only the real
term's per-sample gradients are clipped to C (:class:`~fedsynth.privacy.clipping.
PerSampleClipper`, one backward pass) and noised with N(0, sigma^2 C^2). (The Opacus
DCGAN example runs fakes through the private engine as well, which clips and noises
them and charges them to the budget for nothing; Opacus issue #418.) The fake labels
are drawn uniformly, never copied from the real batch, which would leak its labels
un-noised.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fedsynth.models.augment import diff_augment
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet
from fedsynth.models.training import RoundStats, generator_step, gradient_penalty
from fedsynth.privacy.clipping import PerSampleClipper
from fedsynth.privacy.sampling import PatientSampler, secure_generator

if TYPE_CHECKING:
    from fedsynth.privacy.accounting import PrivacyPlan
    from fedsynth.runs.config import TrainConfig

__all__ = ["train_round_dp"]


def _real_loss_per_sample(out: DiscriminatorOutput, labels: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "wgan-gp":
        loss = -out.adv
    else:
        loss = F.relu(1 - out.adv) if kind == "hinge" else F.softplus(-out.adv)
    if out.class_logits is not None:
        loss = loss + F.cross_entropy(out.class_logits, labels, reduction="none")
    return loss


def _fake_loss(out: DiscriminatorOutput, kind: str) -> torch.Tensor:
    if kind == "wgan-gp":
        return out.adv.mean()
    return F.relu(1 + out.adv).mean() if kind == "hinge" else F.softplus(out.adv).mean()


def train_round_dp(
    gen: GeneratorNet,
    disc: PerSampleClipper,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    sampler: PatientSampler,
    plan: PrivacyPlan,
    cfg: TrainConfig,
    *,
    num_classes: int,
    generator: torch.Generator,
    noise_generator: torch.Generator | None = None,
) -> RoundStats:
    """``cfg.local_steps`` GAN steps with DP-SGD on the discriminator's real term
    (``cfg.critic_steps_per_step`` DP discriminator steps per generator step).

    ``generator`` draws the public noise (latent codes, fake labels) and may be seeded
    for reproducibility. The DP noise (and the real slices' augmentation) comes from
    ``noise_generator``, which must not be
    predictable by anyone who sees the run config; by default a fresh one seeded from
    the operating system. (The sampler's generator must be unpredictable too:
    ``secure_generator()``.)

    Each discriminator step: the fake term's ordinary gradient (hooks off), plus the sum
    of the sampled real slices' per-sample gradients, each clipped to C, plus Gaussian
    noise of std sigma*C, divided by the expected batch size; then one generator step
    through the discriminator with per-sample hooks off and its weights frozen.
    """
    with warnings.catch_warnings():
        # Opacus's backward hooks fire on a loss whose inputs need no gradient: expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _train_round_dp(
            gen,
            disc,
            opt_g,
            opt_d,
            images,
            labels,
            sampler,
            plan,
            cfg,
            num_classes=num_classes,
            generator=generator,
            noise_generator=noise_generator or secure_generator(),
        )


def _train_round_dp(
    gen: GeneratorNet,
    disc: PerSampleClipper,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    sampler: PatientSampler,
    plan: PrivacyPlan,
    cfg: TrainConfig,
    *,
    num_classes: int,
    generator: torch.Generator,
    noise_generator: torch.Generator,
) -> RoundStats:
    device = images.device
    gen.train()
    disc.train()
    params = [p for p in disc.parameters() if p.requires_grad]
    C, sigma, expected = plan.max_grad_norm, plan.noise_multiplier, plan.expected_batch
    g_losses, d_fake = [], []
    start = time.perf_counter()
    kind = cfg.objective
    for _ in range(cfg.local_steps):
        for _ in range(cfg.critic_steps_per_step):
            # --- fake term: public, ordinary gradient ---
            fake_labels = torch.randint(num_classes, (expected,), generator=generator).to(device)
            z = torch.randn(expected, gen.latent_dim, generator=generator).to(device)
            with torch.no_grad():
                fake = gen(z, fake_labels)
            opt_d.zero_grad(set_to_none=True)
            disc.disable_hooks()
            out_fake = disc(diff_augment(fake, cfg.augment, generator), fake_labels)
            loss_fake = _fake_loss(out_fake, kind)
            if kind == "wgan-gp" and cfg.gp_weight > 0:
                # The gradient penalty at points between two independent batches of
                # *generated* images: it reads no patient data (only public noise and the
                # generator, itself post-processing of this DP discriminator), so its
                # gradient needs no clipping or noise and the accounting is unchanged. The
                # usual penalty between real and generated images differentiates D at real
                # images, a per-sample second-order gradient that neither Opacus nor this
                # clipper can bound; it is not used under DP. The price: the 1-Lipschitz
                # constraint is enforced only on the generator's support (Gulrajani et al.
                # penalise between the two distributions).
                with torch.no_grad():
                    other = gen(
                        torch.randn(expected, gen.latent_dim, generator=generator).to(device), fake_labels
                    )
                loss_fake = loss_fake + cfg.gp_weight * gradient_penalty(
                    disc,
                    diff_augment(other, cfg.augment, generator),
                    diff_augment(fake, cfg.augment, generator),
                    fake_labels,
                    generator=generator,
                )
            loss_fake.backward()
            disc.enable_hooks()
            fake_grads = [
                p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
            ]
            for p in params:
                p.grad = None
            # --- real term: per-sample clip, sum, noise ---
            idx = sampler.sample().to(device)
            noisy = [
                torch.normal(0.0, sigma * C, size=p.shape, generator=noise_generator).to(device)
                for p in params
            ]
            # The real slices' augmentation draws from a stream seeded by one secret draw, so the
            # public stream (latent codes, fake labels, the fake term) never depends on how
            # many patients the private Poisson sampling took, and nobody can tell which
            # augmentation a slice got (draws are handed out by position in the batch; kept
            # secret, each slice's augmentation is an independent random draw, and adding a
            # patient changes the clipped sum by one slice's term, at most C).
            fork = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=noise_generator)))
            if len(idx):
                # Augmented per slice, before the per-sample clip: each augmented slice depends
                # on that slice and secret randomness alone, so the accounting holds.
                real = diff_augment(images[idx], cfg.augment, fork).requires_grad_(True)
                real_labels = labels[idx]
                out_real = disc(real, real_labels)
                per_sample = _real_loss_per_sample(out_real, real_labels, kind)
                disc.backward_real(per_sample, real)
                clipped = disc.clipped_sum()
                for n, p in zip(noisy, params, strict=True):
                    n += clipped[p]
            for p, fg, n in zip(params, fake_grads, noisy, strict=True):
                p.grad = fg + n / expected
            opt_d.step()
            d_fake.append(out_fake.adv.detach().mean())
        # --- generator: through the discriminator, hooks off, weights frozen ---
        disc.disable_hooks()
        disc._module.requires_grad_(False)
        g_labels = torch.randint(num_classes, (expected,), generator=generator).to(device)
        loss_g = generator_step(gen, disc, opt_g, g_labels, cfg, generator=generator)
        cfg.family.after_generator_step(gen)
        disc._module.requires_grad_(True)
        disc.enable_hooks()
        g_losses.append(loss_g.detach())
    seconds = time.perf_counter() - start

    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.stack(values).mean().cpu()) if values else math.nan

    # Anything computed from the real slices (their loss, D's output on them, how many
    # were sampled) would leave the hospital without noise: withheld (NaN = not
    # reported). The generator loss and D(fake) only read public noise and DP weights.
    stats = RoundStats(
        steps=cfg.local_steps,
        num_examples=len(images),
        images_seen=cfg.critic_steps * cfg.batch_size,  # nominal
        d_loss=math.nan,
        g_loss=mean(g_losses),
        d_real=math.nan,
        d_fake=mean(d_fake),
        seconds=seconds,
        images_per_second=cfg.critic_steps * expected / seconds if seconds > 0 else math.nan,
    )
    if not np.isfinite([stats.g_loss]).all():
        raise FloatingPointError(
            f"DP training diverged (g-loss {stats.g_loss}); lower train.lr-g / train.lr-d"
        )
    return stats
