"""DP-SGD for a hospital's discriminator, accounted over the whole federation.

Plain PyTorch and Opacus, no Flower. What makes this different from wrapping the
discriminator with ``PrivacyEngine.make_private``:

* **Privacy unit.** Each step Poisson-samples *privacy units* (patients where the slice
  set has real patient ids, else slices) with rate q, and takes one random slice of each
  sampled patient. Adding or removing one patient changes at most one clipped per-sample
  gradient of the sum, so the subsampled Gaussian mechanism's guarantee is per patient.
* **Only real images are charged.** The discriminator's loss is a sum of a real term
  and a fake term. The fake term's gradient is a function of the discriminator's current
  weights (themselves outputs of earlier DP steps) and of images the generator made
  from public noise; it reads no private data, so by post-processing it needs neither
  clipping nor noise. Only the real term's per-sample gradients are clipped to C and
  noised with N(0, sigma^2 C^2). (The Opacus DCGAN example runs fakes through the
  private engine as well, which clips and noises them and charges them to the budget
  for nothing; Opacus issue #418.) The fake labels are drawn uniformly, never copied
  from the real batch, which would leak its labels un-noised.
* **Accounting across rounds.** The (sigma, q, steps) history lives in the hospital's
  state folder, so epsilon covers every step of every round, survives a client restart
  and a resumed run (a round whose update was lost still counts: it was spent).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from ..shared.config import DPConfig, TrainConfig
from .train import RoundStats, generator_loss

__all__ = [
    "PatientSampler",
    "PrivacyError",
    "PrivacyPlan",
    "PrivacyState",
    "check_dp_discriminator",
    "default_delta",
    "epsilon_for",
    "plan_privacy",
    "train_round_dp",
]


class PrivacyError(ValueError):
    """DP cannot be applied as configured (unsupported layers, impossible budget)."""


def default_delta(units: int) -> float:
    """min(1e-5, 1/(10 N)) for N privacy units."""
    return min(1e-5, 1.0 / (10 * max(units, 1)))


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP parameters a hospital trains with for the whole run."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    expected_batch: int
    units: int
    unit: str  # "patient" or "slice"
    planned_steps: int
    target_epsilon: float  # 0: no budget


def plan_privacy(dp: DPConfig, *, units: int, unit: str, batch_size: int, planned_steps: int) -> PrivacyPlan:
    """Choose sigma for the planned steps (or take the configured one).

    Raises
    ------
    PrivacyError
        Too few privacy units, or no sigma reaches the target.
    """
    if units < 2:
        raise PrivacyError(f"DP needs at least 2 {unit}s at the hospital, found {units}")
    sample_rate = min(1.0, batch_size / units)
    delta = dp.delta or default_delta(units)
    sigma = dp.noise_multiplier
    if sigma <= 0:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sigma = get_noise_multiplier(
                    target_epsilon=dp.target_epsilon, target_delta=delta, sample_rate=sample_rate,
                    steps=planned_steps, accountant="rdp", epsilon_tolerance=0.005,
                )
        except ValueError as err:
            raise PrivacyError(f"dp.target-epsilon {dp.target_epsilon}: cannot be met ({err})") from None
        # Opacus returns a sigma whose epsilon is within tolerance *below* the target;
        # check and nudge up so the final epsilon never exceeds it.
        while epsilon_for([(sigma, sample_rate, planned_steps)], delta) > dp.target_epsilon:
            sigma *= 1.01
    return PrivacyPlan(
        noise_multiplier=float(sigma), sample_rate=sample_rate, delta=delta, max_grad_norm=dp.max_grad_norm,
        expected_batch=max(1, round(sample_rate * units)), units=units, unit=unit,
        planned_steps=planned_steps, target_epsilon=dp.target_epsilon,
    )


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a (sigma, q, steps) history by Opacus's RDP or PRV accountant."""
    if not history:
        return 0.0
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivacyState:
    """A hospital's privacy history, kept in its state folder (``privacy.json``)."""

    history: list[tuple[float, float, int]] = field(default_factory=list)
    delta: float = 0.0
    unit: str = "slice"
    units: int = 0

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def add(self, sigma: float, q: float, steps: int) -> None:
        if self.history and self.history[-1][:2] == (sigma, q):
            s, q0, n = self.history[-1]
            self.history[-1] = (s, q0, n + steps)
        else:
            self.history.append((sigma, q, steps))

    def epsilon(self, accountant: str = "rdp", extra: tuple[float, float, int] | None = None) -> float:
        history = self.history + ([extra] if extra else [])
        return epsilon_for(history, self.delta, accountant)

    @classmethod
    def load(cls, path: Path) -> PrivacyState:
        if not path.is_file():
            return cls()
        raw = json.loads(path.read_text())
        return cls(history=[tuple(h) for h in raw["history"]], delta=raw["delta"], unit=raw["unit"],
                   units=raw["units"])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
        os.replace(tmp, path)


def check_dp_discriminator(disc: nn.Module) -> None:
    """Refuse, before any training, a discriminator Opacus cannot make private.

    Raises
    ------
    PrivacyError
        Naming each offending layer (BatchNorm, in-place activations, ...).
    """
    errors = ModuleValidator.validate(disc, strict=False)
    if errors:
        detail = "; ".join(str(e).split("\n")[0] for e in errors[:5])
        raise PrivacyError(
            f"the discriminator cannot be trained with DP-SGD: {detail}. "
            "Use GroupNorm instead of BatchNorm and no in-place activations."
        )


class PatientSampler:
    """Poisson sampling of privacy units, one random slice per sampled unit.

    ``unit_ids`` has one id per slice; slices sharing an id are one unit (a patient).
    """

    def __init__(self, unit_ids: np.ndarray, sample_rate: float, generator: torch.Generator) -> None:
        order = np.argsort(unit_ids, kind="stable")
        _, starts, counts = np.unique(unit_ids[order], return_index=True, return_counts=True)
        self.order = torch.from_numpy(order)
        self.starts = torch.from_numpy(starts)
        self.counts = torch.from_numpy(counts)
        self.sample_rate = sample_rate
        self.generator = generator

    @property
    def units(self) -> int:
        return len(self.starts)

    def sample(self) -> torch.Tensor:
        """Indices of the slices in this step's batch (possibly empty)."""
        chosen = torch.rand(self.units, generator=self.generator) < self.sample_rate
        starts, counts = self.starts[chosen], self.counts[chosen]
        offset = (torch.rand(len(starts), generator=self.generator) * counts).long().clamp_max(counts - 1)
        return self.order[starts + offset]


def _real_loss_per_sample(out, labels: torch.Tensor, kind: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    loss = F.relu(1 - out.adv) if kind == "hinge" else F.softplus(-out.adv)
    if out.class_logits is not None:
        loss = loss + F.cross_entropy(out.class_logits, labels, reduction="none")
    return loss


def _fake_loss(out, kind: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return F.relu(1 + out.adv).mean() if kind == "hinge" else F.softplus(out.adv).mean()


def train_round_dp(
    gen: nn.Module,
    disc: GradSampleModule,
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
) -> RoundStats:
    """``cfg.local_steps`` GAN steps with DP-SGD on the discriminator's real term.

    Each discriminator step: the fake term's ordinary gradient (hooks off), plus the sum
    of the sampled real slices' per-sample gradients, each clipped to C, plus Gaussian
    noise of std sigma*C, divided by the expected batch size; then one generator step
    through the discriminator with per-sample hooks off and its weights frozen.
    """
    with warnings.catch_warnings():
        # Opacus's backward hooks fire on a loss whose inputs need no gradient: expected here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _train_round_dp(gen, disc, opt_g, opt_d, images, labels, sampler, plan, cfg,
                               num_classes=num_classes, generator=generator)


def _train_round_dp(
    gen: nn.Module,
    disc: GradSampleModule,
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
) -> RoundStats:
    device = images.device
    gen.train()
    disc.train()
    params = [p for p in disc.parameters() if p.requires_grad]
    C, sigma, expected = plan.max_grad_norm, plan.noise_multiplier, plan.expected_batch
    d_losses, g_losses, d_real, d_fake, seen = [], [], [], [], 0
    start = time.perf_counter()
    for _ in range(cfg.local_steps):
        # --- fake term: public, ordinary gradient ---
        fake_labels = torch.randint(num_classes, (expected,), generator=generator).to(device)
        z = torch.randn(expected, gen.latent_dim, generator=generator).to(device)
        with torch.no_grad():
            fake = gen(z, fake_labels)
        opt_d.zero_grad(set_to_none=True)
        disc.disable_hooks()
        out_fake = disc(fake, fake_labels)
        loss_fake = _fake_loss(out_fake, cfg.loss)
        loss_fake.backward()
        disc.enable_hooks()
        fake_grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        for p in params:
            p.grad = None
        # --- real term: per-sample clip, sum, noise ---
        idx = sampler.sample().to(device)
        noisy = [torch.normal(0.0, sigma * C, size=p.shape, generator=generator).to(device) for p in params]
        if len(idx):
            real, real_labels = images[idx], labels[idx]
            out_real = disc(real, real_labels)
            per_sample = _real_loss_per_sample(out_real, real_labels, cfg.loss)
            per_sample.sum().backward()
            grad_samples = [p.grad_sample.reshape(len(idx), -1) for p in params]
            norms = torch.cat(grad_samples, dim=1).norm(dim=1)
            scale = (C / (norms + 1e-6)).clamp(max=1.0)
            for n, p in zip(noisy, params, strict=True):
                n += torch.einsum("i,i...->...", scale, p.grad_sample)
            d_losses.append(per_sample.detach().mean() + loss_fake.detach())
            d_real.append(out_real.adv.detach().mean())
            seen += len(idx)
        for p, fg, n in zip(params, fake_grads, noisy, strict=True):
            p.grad = fg + n / expected
            p.grad_sample = None
        opt_d.step()
        d_fake.append(out_fake.adv.detach().mean())
        # --- generator: through the discriminator, hooks off, weights frozen ---
        disc.disable_hooks()
        disc._module.requires_grad_(False)
        g_labels = torch.randint(num_classes, (expected,), generator=generator).to(device)
        z = torch.randn(expected, gen.latent_dim, generator=generator).to(device)
        opt_g.zero_grad(set_to_none=True)
        loss_g = generator_loss(disc(gen(z, g_labels), g_labels), g_labels, cfg.loss)
        loss_g.backward()
        opt_g.step()
        disc._module.requires_grad_(True)
        disc.enable_hooks()
        g_losses.append(loss_g.detach())
    seconds = time.perf_counter() - start

    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.stack(values).mean().cpu()) if values else math.nan

    stats = RoundStats(
        steps=cfg.local_steps, num_examples=len(images), images_seen=seen,
        d_loss=mean(d_losses), g_loss=mean(g_losses), d_real=mean(d_real), d_fake=mean(d_fake),
        seconds=seconds, images_per_second=cfg.local_steps * expected / seconds if seconds > 0 else math.nan,
    )
    if not np.isfinite([stats.g_loss]).all():
        raise FloatingPointError(f"DP training diverged (g-loss {stats.g_loss}); lower train.lr-g / train.lr-d")
    return stats
