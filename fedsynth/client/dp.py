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
* **One backward pass for the clipped sum.** ``PerSampleClipper`` builds on Opacus's
  fast-gradient-clipping hooks: one backward pass of the real term records each layer's
  activations and output gradients; per-sample gradient norms come from them (for
  convolutions, the "ghost norm" <a^T a, g^T g> where that is cheaper than forming the
  per-sample gradient); the clipped sum sum_i c_i g_i is then formed layer by layer from
  the same records (a convolution's weight gradient with the output gradients scaled by
  c_i), with no second backward pass and no per-sample gradients of the large layers
  kept in memory ("book-keeping", Bu et al. 2023). The result is the same sum Opacus's
  per-sample clipping gives (tested against ``GradSampleModule``).
* **Accounting across rounds.** The (sigma, q, steps) history lives in the hospital's
  state folder, so epsilon covers every step of every round, survives a client restart
  and a resumed run (a round whose update was lost still counts: it was spent).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from ..shared.config import DPConfig, TrainConfig
from ..shared.models import gradient_penalty
from .augment import diff_augment
from .train import RoundStats, generator_step

__all__ = [
    "PatientSampler",
    "PerSampleClipper",
    "PrivacyError",
    "PrivacyPlan",
    "PrivacyState",
    "check_dp_discriminator",
    "default_delta",
    "epsilon_for",
    "plan_privacy",
    "secure_generator",
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


# Above this RDP epsilon the PRV accountant is not run: its discretisation grows with
# epsilon (6 GB and 40 s at epsilon ~1100), and a tighter bound on a meaningless
# guarantee helps nobody. Reported as inf (null in the ledger).
PRV_MAX_EPSILON = 100.0


def epsilon_for(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a (sigma, q, steps) history by Opacus's RDP or PRV accountant.

    PRV is computed with an error of max(0.01, epsilon / 200) and only where the RDP
    epsilon is at most ``PRV_MAX_EPSILON`` (else inf).
    """
    if not history:
        return 0.0
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rdp = RDPAccountant()
        rdp.history = history
        epsilon = float(rdp.get_epsilon(delta=delta))
        if accountant == "rdp":
            return epsilon
        if epsilon > PRV_MAX_EPSILON:
            return math.inf
        prv = PRVAccountant()
        prv.history = history
        return float(prv.get_epsilon(delta=delta, eps_error=max(0.01, epsilon / 200)))


@dataclass
class PrivacyState:
    """A hospital's privacy history, kept in its state folder (``privacy.json``)."""

    history: list[tuple[float, float, int]] = field(default_factory=list)
    delta: float = 0.0
    unit: str = "slice"
    units: int = 0
    # Per run (its state folder's name): the [sigma, q] it was planned with.
    plans: dict[str, list[float]] = field(default_factory=dict)

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
                   units=raw["units"], plans=raw.get("plans", {}))

    @staticmethod
    @contextlib.contextmanager
    def lock(path: Path) -> Iterator[None]:
        """Hold an exclusive lock on the ledger while reading, charging and writing it:
        two runs training on the same data at once must not lose each other's charges."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self), handle, indent=2)
        os.replace(tmp, path)


def check_dp_discriminator(disc: nn.Module, train: TrainConfig | None = None) -> None:
    """Refuse, before any training, a discriminator Opacus cannot make private, or a
    regulariser (``train``) that reads real images outside the per-sample clip.

    Raises
    ------
    PrivacyError
        Naming each offending layer (BatchNorm, spectral norm, minibatch std, in-place
        activations, ...) or setting.
    """
    if getattr(disc, "cycle", False):
        raise PrivacyError(
            "cyclegan cannot train under DP-SGD: its cycle-consistency and identity losses compare translated "
            "slices with the real slices they came from in the generator's update, so the generator that leaves "
            "the hospital carries gradients of patient images that the discriminator's clipping never bounds "
            "(epsilon would be under-reported)"
        )
    if getattr(disc, "paired", False):
        raise PrivacyError(
            "pix2pix cannot train under DP-SGD: its L1 loss compares each generated slice with the real slice of the "
            "same mask in the generator's update, so the generator that leaves the hospital carries gradients of "
            "patient images that the discriminator's clipping never bounds (epsilon would be under-reported)"
        )
    mixing = sorted(name for name, m in disc.named_modules() if getattr(m, "mixes_samples", False))
    if mixing:
        raise PrivacyError(
            f"the discriminator cannot be trained with DP-SGD: {', '.join(mixing)} (minibatch standard deviation) "
            "makes each image's output depend on the other real images in its batch, so no per-sample gradient "
            "exists to clip; set model.mbstd-group=0"
        )
    if train is not None and getattr(disc, "wants_r1", False) and train.r1_gamma > 0:
        raise PrivacyError(
            "R1 differentiates the discriminator at each real image, a second-order per-sample gradient that "
            "DP-SGD's clipping does not bound (it would leak unaccounted); set train.r1-gamma=0"
        )
    reparametrised = sorted({name.rsplit(".parametrizations", 1)[0] for name, _ in disc.named_modules()
                             if name.endswith(".parametrizations")})
    if reparametrised:
        raise PrivacyError(
            f"the discriminator cannot be trained with DP-SGD: spectral normalisation on {', '.join(reparametrised[:3])}"
            f"{' ...' if len(reparametrised) > 3 else ''} computes each weight from its parameter by a power "
            "iteration that has no per-sample gradient rule; set model.spectral-norm=false (the gradient penalty "
            "still constrains the critic)"
        )
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


def secure_generator() -> torch.Generator:
    """A torch generator seeded from the operating system's entropy, never stored: for
    the DP noise and the Poisson sampling, which a seed derived from the run config
    would let the server (or anyone with the config) reproduce and subtract."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def _conv_norm_sample(layer: nn.Conv2d, activations: torch.Tensor, backprops: torch.Tensor) -> dict:
    """Per-sample gradient norms of a Conv2d from its input and output gradient."""
    n = activations.shape[0]
    cols = F.unfold(activations, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                    stride=layer.stride)  # [n, K, T]
    g = backprops.reshape(n, backprops.shape[1], -1)  # [n, C, T]
    (k, t), c = cols.shape[1:], g.shape[1]
    norms = {}
    if layer.weight.requires_grad:
        if t * (k + c) < k * c:  # ghost norm: ||g a^T||_F^2 = <a^T a, g^T g>, never forming g a^T
            gram = (torch.bmm(cols.transpose(1, 2), cols) * torch.bmm(g.transpose(1, 2), g)).sum((1, 2))
            norms[layer.weight] = gram.clamp(min=0).sqrt()
        else:
            norms[layer.weight] = torch.bmm(g, cols.transpose(1, 2)).flatten(1).norm(dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(2).norm(dim=1)
    return norms


def _book_keeping_sampler(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Opacus norm sampler that also keeps what the clipped sum needs on the layer."""
    if type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros":
        layer._fedsynth_record = ("conv", activations[0], backprops)
        return _conv_norm_sample(layer, activations[0], backprops)
    grad_samples = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, activations, backprops)
    layer._fedsynth_record = ("samples", grad_samples)
    return {p: gs.reshape(len(gs), -1).norm(dim=1) for p, gs in grad_samples.items()}


class PerSampleClipper(GradSampleModuleFastGradientClipping):
    """A discriminator wrapper whose real-term backward gives the sum of per-sample
    gradients, each clipped to ``max_grad_norm``, in one backward pass.

    Use: ``out = clipper(real, labels)``; ``clipper.backward_real(per_sample_loss, real)``;
    then ``clipper.clipped_sum()`` maps each trainable parameter to sum_i c_i g_i with
    c_i = min(1, C / ||g_i||). Outside that (fake term, generator step) call
    ``disable_hooks()``.
    """

    NORM_SAMPLERS = {layer: _book_keeping_sampler for layer in GradSampleModule.GRAD_SAMPLERS}

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        super().__init__(module, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        unsupported = sorted({type(m).__name__ for m in module.modules()
                              if any(p.requires_grad for p in m.parameters(recurse=False))
                              and type(m) not in self.NORM_SAMPLERS})
        if unsupported:
            raise PrivacyError(f"DP-SGD has no per-sample gradients for layer type(s) {', '.join(unsupported)}")
        self._records_in = [p for m in module.modules() if not isinstance(m, nn.Conv2d)
                            for p in m.parameters(recurse=False) if p.requires_grad]

    def backward_real(self, per_sample_loss: torch.Tensor, inputs: torch.Tensor) -> None:
        """Run the real term's backward pass for its records only: the gradient is taken
        with respect to the input images and the small layers' parameters, so autograd
        computes every layer's output gradient but skips the convolutions' weight gradients
        (``clipped_sum`` forms those, already clipped)."""
        torch.autograd.grad(per_sample_loss.sum(), [inputs, *self._records_in])

    def clipped_sum(self) -> dict[nn.Parameter, torch.Tensor]:
        coef = self.get_clipping_coef()
        total: dict[nn.Parameter, torch.Tensor] = {}
        for layer in self._module.modules():
            record = layer.__dict__.pop("_fedsynth_record", None)
            if record is None:
                continue
            if record[0] == "conv":
                _, a, g = record
                g = g * coef.view(-1, 1, 1, 1)
                if layer.weight.requires_grad:
                    total[layer.weight] = torch.nn.grad.conv2d_weight(
                        a, layer.weight.shape, g, layer.stride, layer.padding, layer.dilation, layer.groups)
                if layer.bias is not None and layer.bias.requires_grad:
                    total[layer.bias] = g.sum((0, 2, 3))
            else:
                for p, gs in record[1].items():
                    total[p] = torch.einsum("n,n...->...", coef, gs)
        missing = [p for p in self.trainable_parameters if p not in total]
        for p in self.trainable_parameters:
            p.__dict__.pop("_norm_sample", None)
        if missing:
            raise RuntimeError(f"{len(missing)} discriminator parameters got no per-sample gradient "
                               "(a layer off the path from the input image?)")
        return total


def _real_loss_per_sample(out, labels: torch.Tensor, kind: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if kind == "wgan-gp":
        loss = -out.adv
    else:
        loss = F.relu(1 - out.adv) if kind == "hinge" else F.softplus(-out.adv)
    if out.class_logits is not None:
        loss = loss + F.cross_entropy(out.class_logits, labels, reduction="none")
    return loss


def _fake_loss(out, kind: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if kind == "wgan-gp":
        return out.adv.mean()
    return F.relu(1 + out.adv).mean() if kind == "hinge" else F.softplus(out.adv).mean()


def train_round_dp(
    gen: nn.Module,
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
    for reproducibility. The DP noise comes from ``noise_generator``, which must not be
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
        return _train_round_dp(gen, disc, opt_g, opt_d, images, labels, sampler, plan, cfg,
                               num_classes=num_classes, generator=generator,
                               noise_generator=noise_generator or secure_generator())


def _train_round_dp(
    gen: nn.Module,
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
                    other = gen(torch.randn(expected, gen.latent_dim, generator=generator).to(device), fake_labels)
                loss_fake = loss_fake + cfg.gp_weight * gradient_penalty(
                    disc, diff_augment(other, cfg.augment, generator), diff_augment(fake, cfg.augment, generator),
                    fake_labels, generator=generator)
            loss_fake.backward()
            disc.enable_hooks()
            fake_grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            for p in params:
                p.grad = None
            # --- real term: per-sample clip, sum, noise ---
            idx = sampler.sample().to(device)
            noisy = [torch.normal(0.0, sigma * C, size=p.shape, generator=noise_generator).to(device) for p in params]
            if len(idx):
                # Augmented per slice (from public randomness), before the per-sample clip:
                # each augmented slice depends on that slice alone, so the accounting holds.
                real = diff_augment(images[idx], cfg.augment, generator).requires_grad_(True)
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
        steps=cfg.local_steps, num_examples=len(images), images_seen=cfg.critic_steps * cfg.batch_size,  # nominal
        d_loss=math.nan, g_loss=mean(g_losses), d_real=math.nan, d_fake=mean(d_fake),
        seconds=seconds, images_per_second=cfg.critic_steps * expected / seconds if seconds > 0 else math.nan,
    )
    if not np.isfinite([stats.g_loss]).all():
        raise FloatingPointError(f"DP training diverged (g-loss {stats.g_loss}); lower train.lr-g / train.lr-d")
    return stats
