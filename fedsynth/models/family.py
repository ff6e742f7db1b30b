"""The contract of a GAN family: everything that differs between families, in one object.

A family is one :class:`Family` subclass in its own module (``models/cdcgan.py``,
``models/pix2pix.py``, ...), registered in :mod:`fedsynth.models.registry`. Callers never
ask a network what it is or compare ``model.name``: they look the family up and ask it.
The defaults below are those of a noise-and-class GAN (cdcgan); a family overrides what
it does differently. The guide ``docs/adding-a-family.md`` walks through a new one.

What a family owns, and who asks:

======================  ===============================================  =====================
concern                 method or attribute                              asked by
======================  ===============================================  =====================
identity                ``name``, ``description``, ``sizes``             ``fedsynth models``
what conditions G       ``condition``, ``conditional(model)``            sampling, grids, audit
configuration           ``default_loss``, ``presets``, ``check_config``  the run config
networks                ``build``                                        ``registry.build_gan``
its data                ``check_slices``, ``conditions``,                hospital, simulation,
                        ``simulation_settings``, ``check_deployment``    ``fedsynth run``
DP-SGD                  ``dp``, ``uses_r1``, ``check_dp``                hospital, ``simulate``
the local round         ``local_round`` and the step hooks               hospital
server side             ``after_noised_update``; part weights (below)    ServerApp, strategy
one-shot federation     ``federation``, ``release``, ``release_shapes``, hospital, ServerApp
                        ``fit``
pictures                ``round_grid``, ``real_grid``                    ServerApp, simulation
validation score        ``validation_score``                             hospital
synthesis               ``sample``, ``translate``                        ``fedsynth sample``,
                                                                         ``translate``, audit
======================  ===============================================  =====================

What the server averages: every tensor of the generator (and of the discriminator when
``federation.aggregate-discriminator`` is on), weighted by ``num-examples``. A family
whose networks have parts trained by only some hospitals reports a ``weight-<part>``
metric per part (its :class:`~fedsynth.models.training.RoundStats` subclass carries
them); the strategy then averages the tensors under ``generator.<part>.`` and
``discriminator.<part>.`` with those weights (cyclegan's two translators and two
PatchGANs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from fedsynth.core.errors import UserError
from fedsynth.core.grids import grid_labels, save_grid
from fedsynth.core.seeds import derive_seed
from fedsynth.data.sliceset import SliceSet
from fedsynth.metrics.features import PixelSpace
from fedsynth.metrics.fidelity import frechet_distance
from fedsynth.models.networks import GeneratorNet, Networks
from fedsynth.models.sampling import generate
from fedsynth.models.training import (
    BatchSource,
    RoundStats,
    generator_step,
    train_round,
)
from fedsynth.privacy.accounting import PrivacyError

if TYPE_CHECKING:
    from fedsynth.privacy.accounting import PrivacyPlan
    from fedsynth.privacy.sampling import PatientSampler
    from fedsynth.runs.config import ModelConfig, RunConfig, TrainConfig

__all__ = [
    "CLASS",
    "DOMAIN",
    "EMBEDDING",
    "GRID_SEED_OFFSET",
    "MASK",
    "NONE",
    "VALIDATION_COMPONENTS",
    "VALIDATION_SAMPLES",
    "WEIGHTS",
    "Condition",
    "DPSupport",
    "Drawn",
    "Family",
    "Federation",
    "Preset",
    "PrivateRound",
    "recompute_batchnorm",
]

# What a family's generator reads besides noise.
Condition = Literal["class", "none", "mask", "domain"]
CLASS: Condition = "class"
NONE: Condition = "none"
MASK: Condition = "mask"
DOMAIN: Condition = "domain"

# How a family federates: hospitals train and send weights that the server averages, every
# round (``weights``); or each hospital releases a summary of its slices once and the server
# fits the generator to the summaries (``embedding``: dp-merf), one round.
Federation = Literal["weights", "embedding"]
WEIGHTS: Federation = "weights"
EMBEDDING: Federation = "embedding"

GRID_SEED_OFFSET = 7919  # round grids use seed + this, so they never share noise with training
VALIDATION_SAMPLES = 256  # generated images per validation score
VALIDATION_COMPONENTS = 16  # pixel PCA dimensions of the score's feature space


@dataclass(frozen=True)
class DPSupport:
    """Whether the family can train under DP-SGD on its discriminator.

    ``summary`` is what ``fedsynth models`` prints; ``refusal`` is the error a hospital
    (and ``fedsynth simulate``) gives when DP is asked of a family that cannot have it.
    """

    ok: bool
    summary: str
    refusal: str = ""


@dataclass(frozen=True)
class Preset:
    """A named recipe on a family: ``model.name: NAME`` expands to ``settings`` (keys the
    user gives explicitly win)."""

    name: str
    settings: dict[str, Any]
    dp_summary: str
    dp_ok: bool = False  # whether the preset as given trains under DP-SGD


@dataclass(frozen=True)
class PrivateRound:
    """What a DP round needs from the hospital: the plan, the Poisson sampler of privacy
    units and the unpredictable generator of the DP noise."""

    plan: PrivacyPlan
    sampler: PatientSampler
    noise: torch.Generator


@dataclass(frozen=True)
class Drawn:
    """Images a generator drew, with the class label of each (0 where it has none)."""

    images: np.ndarray
    labels: np.ndarray
    conditional: bool


class Family:
    """One GAN family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    description: ClassVar[str]
    sizes: ClassVar[tuple[int, ...]] = (32, 64, 128, 256)
    condition: ClassVar[Condition] = CLASS
    default_loss: ClassVar[str] = "hinge"
    losses: ClassVar[tuple[str, ...]] = ("hinge", "bce", "wgan-gp")
    dp: ClassVar[DPSupport] = DPSupport(True, "yes")
    presets: ClassVar[tuple[Preset, ...]] = ()
    uses_r1: ClassVar[bool] = False  # the discriminator is regularised with (lazy) R1
    truncation: ClassVar[bool] = False  # sampling offers the truncation trick
    federation: ClassVar[Federation] = WEIGHTS

    # --- configuration ---------------------------------------------------------------
    def check_config(self, cfg: RunConfig) -> None:
        """Refuse settings this family cannot train with (a ``ValueError`` naming the key)."""
        if cfg.train.loss != "auto" and cfg.train.loss not in self.losses:
            raise ValueError(
                f"train.loss: {self.name} trains with {' or '.join(self.losses)}, not {cfg.train.loss}"
            )

    def conditional(self, model: ModelConfig) -> bool:
        """Whether the generator draws a chosen class."""
        return self.condition == CLASS and model.conditioning != "none"

    # --- networks ----------------------------------------------------------------------
    def build(self, model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
        """(generator, discriminator) for a model config; call ``registry.build_gan``,
        which checks the size and names the family first."""
        raise NotImplementedError

    # --- data ----------------------------------------------------------------------------
    def check_slices(self, slices: SliceSet, cfg: RunConfig, *, path: object, hospital: str) -> None:
        """Refuse a hospital's slice set this family cannot train on (``SliceSetError``)."""

    def conditions(self, slices: SliceSet) -> np.ndarray:
        """What the generator is conditioned on for these slices: their class labels."""
        return slices.labels

    def simulation_settings(
        self, cfg: RunConfig, slices: SliceSet, *, data_path: Path, samples_dir: Path
    ) -> dict[str, object]:
        """Config keys a simulation fills from the whole slice set (``ConfigError`` when
        it cannot). ``samples_dir`` is the run's samples folder."""
        return {}

    def check_deployment(self, cfg: RunConfig) -> None:
        """Refuse a deployment's run config that lacks what the server needs of this
        family (the server holds no slices): a ``ConfigError``."""

    def simulation_notes(self, cfg: RunConfig, hospitals: dict[str, SliceSet]) -> list[str]:
        """Lines ``fedsynth simulate`` prints about the hospitals' training slices (rich markup)."""
        return []

    # --- DP-SGD --------------------------------------------------------------------------
    def check_dp(self, disc: nn.Module, train: TrainConfig | None = None) -> None:
        """Refuse, before any training, DP-SGD this family cannot have, a discriminator
        Opacus cannot make private, or a regulariser (``train``) that reads real images
        outside the per-sample clip.

        Raises
        ------
        PrivacyError
            Naming the family's reason, or each offending layer or setting.
        """
        if not self.dp.ok:
            raise PrivacyError(self.dp.refusal)
        from fedsynth.privacy.clipping import check_private_layers  # Opacus: loaded only under DP

        check_private_layers(disc)
        if train is not None and self.uses_r1 and train.r1_gamma > 0:
            raise PrivacyError(
                "R1 differentiates the discriminator at each real image, a second-order per-sample gradient "
                "that DP-SGD's clipping does not bound (it would leak unaccounted); set train.r1-gamma=0"
            )

    # --- the local round -------------------------------------------------------------------
    def local_round(
        self,
        gen: GeneratorNet,
        disc: nn.Module,
        opt_g: torch.optim.Optimizer,
        opt_d: torch.optim.Optimizer,
        train: SliceSet,
        cfg: RunConfig,
        *,
        device: torch.device,
        generator: torch.Generator,
        private: PrivateRound | None = None,
        shared_discriminator: bool = False,
    ) -> RoundStats:
        """One hospital's local round on its training slices: ``train_round``, or with
        ``private`` the DP-SGD round (``train_round_dp``). ``shared_discriminator``: the
        discriminator came from the server (``federation.aggregate-discriminator``)."""
        images = torch.from_numpy(train.as_float()).to(device)
        conditions = torch.from_numpy(self.conditions(train)).to(device)
        if private is not None:
            from fedsynth.models.training_dp import train_round_dp  # Opacus: loaded only under DP
            from fedsynth.privacy.clipping import PerSampleClipper

            clipper = PerSampleClipper(disc, max_grad_norm=private.plan.max_grad_norm)
            return train_round_dp(
                gen,
                clipper,
                opt_g,
                opt_d,
                images,
                conditions,
                private.sampler,
                private.plan,
                cfg.train,
                num_classes=len(train.class_names),
                generator=generator,
                noise_generator=private.noise,
            )
        batches = BatchSource(images, conditions, batch_size=cfg.train.batch_size, generator=generator)
        return train_round(gen, disc, opt_g, opt_d, batches, cfg.train, generator=generator)

    # Step hooks of ``train_round`` (and of ``train_round_dp``'s generator step).
    def augment(
        self, x: torch.Tensor, condition: torch.Tensor, policy: str, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DiffAugment of what the discriminator sees: the slice alone."""
        from fedsynth.models.augment import diff_augment

        return diff_augment(x, policy, generator), condition

    def generator_update(
        self,
        gen: GeneratorNet,
        disc: nn.Module,
        opt_g: torch.optim.Optimizer,
        real: torch.Tensor,
        condition: torch.Tensor,
        cfg: TrainConfig,
        *,
        generator: torch.Generator,
        autocast: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One generator update through the frozen discriminator; returns (adversarial
        loss, L1 to the real slices or None)."""
        return generator_step(gen, disc, opt_g, condition, cfg, generator=generator, autocast=autocast), None

    def after_generator_step(self, gen: GeneratorNet) -> None:
        """Called after every generator update (stylegan2-lite moves its EMA)."""

    # --- server side -----------------------------------------------------------------------
    def after_noised_update(self, gen: GeneratorNet, *, num_classes: int, seed: int) -> None:
        """Client-level DP: after the server noised the averaged weights, recompute
        what was averaged from un-noised updates (BatchNorm statistics) from the
        generator's own output on fresh noise; reads no hospital data."""
        recompute_batchnorm(gen, num_classes, seed=seed)

    # --- one-shot federation (``federation = EMBEDDING``) ---------------------------------------
    def release(
        self,
        features: nn.Module,
        train: SliceSet,
        units: np.ndarray,
        *,
        conditional: bool,
        noise_std: float,
        noise: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """What a hospital sends instead of weights: a summary of its training slices
        (``units``: each slice's privacy unit), with Gaussian noise of std ``noise_std``
        (0: none) on every entry; its L2 sensitivity to one unit is ``release_sensitivity``."""
        raise NotImplementedError(f"model {self.name!r} federates weights, not a released summary")

    release_sensitivity: ClassVar[float] = 0.0

    def release_shapes(self, cfg: RunConfig) -> dict[str, tuple[int, ...]]:
        """The tensors of one release, by name, with their shapes (what the server accepts)."""
        raise NotImplementedError(f"model {self.name!r} federates weights, not a released summary")

    def fit(
        self,
        gen: GeneratorNet,
        features: nn.Module,
        released: dict[str, np.ndarray],
        cfg: RunConfig,
        *,
        progress: Any = None,
    ) -> dict[str, float]:
        """Train the generator on the server from the hospitals' summed releases alone;
        returns what to record of the fit."""
        raise NotImplementedError(f"model {self.name!r} federates weights, not a released summary")

    # --- pictures --------------------------------------------------------------------------
    def round_grid(self, gen: GeneratorNet, cfg: RunConfig, path: Path, *, title: str) -> Path | None:
        """The server's grid of a round: fixed noise, one row per class."""
        classes = cfg.data.classes
        conditional = self.conditional(cfg.model)
        images = generate(
            gen, grid_labels(len(classes), cfg.output.grid_per_class), seed=cfg.train.seed + GRID_SEED_OFFSET
        )
        return save_grid(
            images,
            path,
            columns=cfg.output.grid_per_class,
            row_names=classes if conditional else None,
            title=title + ("" if conditional else " (unconditional)"),
            scale=max(1, 128 // cfg.data.image_size),
        )

    def real_grid(self, slices: SliceSet, path: Path, *, per_class: int, seed: int) -> Path:
        """Randomly drawn (not chosen) real training slices, one row per class, laid out
        like the round grids for side-by-side viewing."""
        rng = np.random.default_rng(seed)
        rows = []
        size = slices.image_size
        for label in range(len(slices.class_names)):
            idx = np.flatnonzero(slices.labels == label)
            pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else idx
            row = [slices.images[i] for i in pick]
            row += [np.zeros((size, size), dtype=np.uint8)] * (per_class - len(row))
            rows.extend(row)
        return save_grid(
            np.stack(rows).astype(np.uint8),
            path,
            columns=per_class,
            row_names=list(slices.class_names),
            title="real training slices (random)",
            scale=max(1, 128 // size),
        )

    # --- validation score ------------------------------------------------------------------
    def validation_score(
        self, gen: GeneratorNet, validation: SliceSet, cfg: RunConfig, *, hospital: str
    ) -> dict[str, Any]:
        """The Fréchet distance between the generator's images and a hospital's validation
        slices (at least 2), in a pixel space (PCA, up to 16 components) fitted on the
        validation slices themselves, so the score reads no training slice. The same
        noise, labels (drawn from the validation slices' classes) and feature space every
        round, so scores of successive rounds compare."""
        rng = np.random.default_rng(derive_seed(cfg.train.seed, hospital, "validation"))
        labels = self.validation_conditions(validation, cfg, rng)
        fake = generate(gen, labels, seed=derive_seed(cfg.train.seed, hospital, "validation-noise"))
        space = PixelSpace(components=min(VALIDATION_COMPONENTS, len(validation) - 1)).fit(validation.images)
        fd = frechet_distance(space.transform(validation.images), space.transform(fake))
        return {"val-fd": float(fd), "val-n": len(validation)}

    def validation_conditions(
        self, validation: SliceSet, cfg: RunConfig, rng: np.random.Generator
    ) -> np.ndarray:
        """What the validation images are drawn for: classes drawn from the validation
        slices' own, or all zeros for an unconditional generator."""
        if self.conditional(cfg.model):
            return rng.choice(validation.labels, size=VALIDATION_SAMPLES)
        return np.zeros(VALIDATION_SAMPLES, dtype=np.int64)

    # --- synthesis ---------------------------------------------------------------------------
    def sample(
        self,
        gen: GeneratorNet,
        cfg: RunConfig,
        *,
        n: int,
        label: str | None,
        seed: int,
        truncation: float = 1.0,
        masks: np.ndarray | None = None,
        where: object = "this run",
    ) -> Drawn:
        """``n`` images; without a label they cycle through the classes, so each gets an
        equal share.

        Raises
        ------
        UserError
            Unknown label, a label asked of an unconditional model, truncation asked of a
            family without it, or masks given to a family that draws from noise.
        """
        name = cfg.model.name
        classes = cfg.data.classes
        conditional = self.conditional(cfg.model)
        if masks is not None:
            raise UserError(
                f"--masks/--random-masks: model {name!r} draws from noise, not masks (pix2pix draws from "
                "masks)"
            )
        if truncation != 1.0 and not self.truncation:
            raise UserError(f"--truncation: model {name!r} has no truncation trick (stylegan2-lite has)")
        if label is not None:
            if label not in classes:
                raise UserError(f"--label {label!r}: not a class of this run (classes: {', '.join(classes)})")
            if not conditional:
                raise UserError(f"--label: model {name!r} is unconditional and cannot draw a chosen class")
            labels = np.full(n, classes.index(label))
        else:
            labels = np.arange(n) % len(classes)
        return Drawn(generate(gen, labels, seed=seed, truncation=truncation), labels, conditional)

    def translate(self, gen: GeneratorNet, images: np.ndarray, direction: str) -> np.ndarray:
        """uint8 slices (N, H, W) of one domain moved to the other (``a2b`` or ``b2a``);
        only families whose ``condition`` is ``domain`` translate."""
        raise NotImplementedError(f"model {self.name!r} does not translate")


def recompute_batchnorm(
    gen: GeneratorNet, num_classes: int, *, seed: int, batches: int = 8, batch: int = 64
) -> None:
    """Recompute the generator's BatchNorm statistics from its own output on fresh noise
    (a cumulative average over ``batches`` batches). Used under client-level DP, where
    the hospitals' statistics are not averaged: this reads no hospital data."""
    norms = [m for m in gen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    rng = torch.Generator().manual_seed(seed)
    was_training = gen.training
    gen.train()
    with torch.no_grad():
        for _ in range(batches):
            z = torch.randn(batch, gen.latent_dim, generator=rng)
            gen(z, torch.randint(num_classes, (batch,), generator=rng))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    gen.train(was_training)
