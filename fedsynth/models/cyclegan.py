"""CycleGAN (Zhu et al., ICCV 2017): unpaired translation between two imaging domains.

Two translators, A -> B and B -> A, and two PatchGAN discriminators, one per domain.
Trained with the adversarial loss of each translation, the cycle-consistency L1
(A -> B -> A returns A, and B -> A -> B returns B; ``train.cycle-weight``, 10 as in the
paper) and the identity L1 (a slice already in the target domain passes unchanged;
``train.identity-weight`` x the cycle weight, 0.5 as in the reference code).

Domains are the two values of a slice-set field (``data.domain-field``: the site, e.g.
the folder a CT or an MR volume sat in, or the class), named by ``data.domain-a`` and
``data.domain-b``.

In fedsynth's terms the *generator* is the pair of translators (``a2b``, ``b2a``), which
is what the server averages, and the *discriminator* is the pair of PatchGANs
(``a``, ``b``), which stays at each hospital (FedMed-GAN, Wang et al. 2022, aggregates
the two generators and keeps the discriminators local the same way). How a hospital
holding only one domain takes part, and how each half is weighted, is in
``train_round_cycle`` below and the part weights of :mod:`fedsynth.models.family`.

Differences from the paper, and why:

- The translators are fedsynth's pix2pix U-Net reading the slice instead of a mask,
  without dropout (translation is deterministic), rather than the paper's 9-block
  ResNet; the paper's code offers the U-Net too. GroupNorm, not InstanceNorm, for the
  same reason as pix2pix.
- The adversarial loss is the logistic (or hinge) loss rather than least squares, and
  there is no history buffer of generated images: each step judges the current fakes.

Not under DP-SGD: the cycle and identity losses read real slices in the *generator's*
update, and the generator leaves the hospital. The family's ``dp`` refuses it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from fedsynth.core.device import autocast_for
from fedsynth.core.errors import ConfigError, UserError
from fedsynth.core.grids import save_grid
from fedsynth.core.seeds import derive_seed
from fedsynth.data.domains import domain_values, domains_of, guess_domains
from fedsynth.data.sliceset import TRAIN, SliceSet, SliceSetError
from fedsynth.metrics.features import PixelSpace
from fedsynth.metrics.fidelity import frechet_distance
from fedsynth.models.augment import diff_augment
from fedsynth.models.family import (
    DOMAIN,
    VALIDATION_COMPONENTS,
    VALIDATION_SAMPLES,
    DPSupport,
    Drawn,
    Family,
)
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet, Networks
from fedsynth.models.pix2pix import PatchDiscriminator, UNetGenerator
from fedsynth.models.sampling import to_uint8
from fedsynth.models.training import (
    BatchSource,
    RoundStats,
    discriminator_loss,
    finite,
    generator_loss,
)

if TYPE_CHECKING:
    from fedsynth.models.family import PrivateRound
    from fedsynth.runs.config import ModelConfig, RunConfig, TrainConfig

__all__ = [
    "DIRECTIONS",
    "CycleDiscriminator",
    "CycleGAN",
    "CycleGenerator",
    "CycleRoundStats",
    "train_round_cycle",
    "translate",
]

DIRECTIONS = ("a2b", "b2a")


class CycleGenerator(GeneratorNet):
    """The two translators. ``gen(None, x, "a2b")`` (or ``gen.a2b(None, x)``) maps
    (N, 1, H, W) slices of domain A in [-1, 1] to domain B."""

    latent_dim = 0  # translates between domains; draws nothing from noise

    def __init__(self, *, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.a2b = UNetGenerator(image_size=image_size, width=width, mask_channels=0, dropout=0.0)
        self.b2a = UNetGenerator(image_size=image_size, width=width, mask_channels=0, dropout=0.0)

    def forward(self, z: torch.Tensor | None, x: torch.Tensor, direction: str = "a2b") -> torch.Tensor:
        del z
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: use a2b or b2a")
        return getattr(self, direction)(None, x)


class CycleDiscriminator(nn.Module):
    """One PatchGAN per domain: ``disc(x, "a")`` judges whether slices look like domain A."""

    def __init__(self, *, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.a = PatchDiscriminator(image_size=image_size, width=width, mask_channels=0)
        self.b = PatchDiscriminator(image_size=image_size, width=width, mask_channels=0)

    def forward(self, x: torch.Tensor, domain: str) -> DiscriminatorOutput:
        if domain not in ("a", "b"):
            raise ValueError(f"domain {domain!r}: use a or b")
        return getattr(self, domain)(x, None)


@dataclass(frozen=True)
class CycleRoundStats(RoundStats):
    """A cyclegan round's statistics, with each half's weight in the server's average. A
    translator's: the real slices its adversarial signal came from (0: not trained
    here); a domain's PatchGAN's: this hospital's real slices of that domain (0: not
    trained here). Reported as ``weight-a2b``, ``weight-b2a``, ``weight-a`` and
    ``weight-b``, which the strategy applies to ``generator.a2b.*``, ``generator.b2a.*``,
    ``discriminator.a.*`` and ``discriminator.b.*``."""

    weight_a2b: float = float("nan")
    weight_b2a: float = float("nan")
    weight_a: float = float("nan")
    weight_b: float = float("nan")


def train_round_cycle(
    gen: GeneratorNet,
    disc: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    domain_a: BatchSource | None,
    domain_b: BatchSource | None,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    shared_judges: bool = False,
) -> CycleRoundStats:
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
    present = domain_a if domain_a is not None else domain_b
    assert present is not None
    device = present.images.device
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
                        adv = adv + generator_loss(
                            disc(diff_augment(image, cfg.augment, generator), domain), real[d], cfg.objective
                        )
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

    stats = CycleRoundStats(
        steps=cfg.local_steps,
        num_examples=n,
        images_seen=images_seen,
        d_loss=mean(d_losses),
        g_loss=mean(g_losses),
        d_real=mean(d_real),
        d_fake=mean(d_fake),
        seconds=seconds,
        images_per_second=images_seen / seconds if seconds > 0 else float("nan"),
        l1=mean(cycles),
        weight_a2b=_translator_weight(domain_b, domain_a, shared_judges),
        weight_b2a=_translator_weight(domain_a, domain_b, shared_judges),
        weight_a=float(len(domain_a) if domain_a is not None else 0),
        weight_b=float(len(domain_b) if domain_b is not None else 0),
    )
    return finite(stats)


def _translator_weight(target: BatchSource | None, source: BatchSource | None, shared_judges: bool) -> float:
    """A translator's weight: the real slices of its target domain here, or, judged by a
    shared discriminator where there are none, the real slices it translated."""
    if target is not None:
        return float(len(target))
    return float(len(source)) if shared_judges and source is not None else 0.0


@torch.no_grad()
def translate(
    gen: GeneratorNet,
    images: np.ndarray,
    direction: str,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
) -> np.ndarray:
    """CycleGAN: uint8 slices (N, H, W) of one domain to the other (``a2b`` or ``b2a``),
    as uint8 (N, H, W). Deterministic: the translators have no noise."""
    was_training = gen.training
    gen.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].astype(np.float32) / 127.5 - 1.0)[:, None]
        out.append(gen(None, x.to(device), direction).float().cpu())
    gen.train(was_training)
    if not out:
        return np.zeros((0, *images.shape[1:]), dtype=np.uint8)
    return to_uint8(torch.cat(out))


def translate_grid(gen: GeneratorNet, cfg: RunConfig, path: str | Path, *, title: str) -> Path | None:
    """CycleGAN's round grid: up to ``output.grid-per-class`` slices of each domain from
    the preview set (``output.preview``), each row followed by its translation. None
    when the preview set holds no slice of either domain."""
    preview = SliceSet.load(cfg.output.preview)
    data, columns = cfg.data, cfg.output.grid_per_class
    domains = domains_of(preview, data, path=cfg.output.preview)
    rows, names = [], []
    for source, target, name in (("a", "b", data.domain_a), ("b", "a", data.domain_b)):
        index = np.flatnonzero(domains == source)
        if not len(index):
            continue
        pick = index[np.linspace(0, len(index) - 1, min(columns, len(index))).round().astype(int)]
        images = preview.images[pick]
        moved = translate(gen, images, f"{source}2{target}")
        pad = np.zeros((columns - len(pick), *images.shape[1:]), dtype=np.uint8)
        rows += [np.concatenate([images, pad]), np.concatenate([moved, pad])]
        names += [f"{source.upper()}: {name}", f"{source.upper()} -> {target.upper()}"]
    if not rows:
        return None
    return save_grid(
        np.concatenate(rows),
        path,
        columns=columns,
        row_names=names,
        title=title,
        scale=max(1, 128 // preview.image_size),
    )


class CycleGAN(Family):
    """Unpaired translation between two domains: two U-Net translators, two PatchGANs."""

    name = "cyclegan"
    description = (
        "unpaired translation between two domains (data.domain-a/-b, e.g. CT and MR): two U-Net "
        "translators, two PatchGANs, adversarial + cycle + identity losses; `fedsynth translate` applies it"
    )
    condition = DOMAIN
    default_loss = "bce"
    losses = ("bce", "hinge")
    dp = DPSupport(
        False,
        "no (the cycle and identity losses read real slices in the generator's update)",
        "cyclegan cannot train under DP-SGD: its cycle-consistency and identity losses compare translated "
        "slices with the real slices they came from in the generator's update, so the generator that "
        "leaves the hospital carries gradients of patient images that the discriminator's clipping never "
        "bounds (epsilon would be under-reported)",
    )

    def check_config(self, cfg: RunConfig) -> None:
        if cfg.federation.client_dp_noise_multiplier > 0:
            raise ValueError(
                "federation.client-dp-noise-multiplier: not with cyclegan (its translators are averaged "
                "over the hospitals holding each target domain; client-level DP averages every update with "
                "equal weight, untrained halves included)"
            )
        if cfg.train.loss == "wgan-gp":
            raise ValueError("train.loss: cyclegan trains with bce or hinge, not wgan-gp")
        if cfg.federation.secure_aggregation == "on":
            raise ValueError(
                "federation.secure-aggregation: not with cyclegan (each translator is averaged over the "
                "hospitals holding its domains, with a weight per part; a secure sum has one weight)"
            )

    def conditional(self, model: ModelConfig) -> bool:
        return False

    def build(self, model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
        del num_classes  # translates slices; no class input
        return (
            CycleGenerator(image_size=image_size, width=model.width),
            CycleDiscriminator(image_size=image_size, width=model.width),
        )

    # --- data
    def check_slices(self, slices: SliceSet, cfg: RunConfig, *, path: object, hospital: str) -> None:
        train = slices.only(TRAIN)
        if not (domains_of(train, cfg.data, path=path) != "").any():
            raise SliceSetError(
                f"{path}: no training slice of domain {cfg.data.domain_a!r} or {cfg.data.domain_b!r} at "
                f"{hospital}"
            )

    def simulation_settings(
        self, cfg: RunConfig, slices: SliceSet, *, data_path: Path, samples_dir: Path
    ) -> dict[str, object]:
        return _domain_settings(cfg, slices, data_path, samples_dir)

    def check_deployment(self, cfg: RunConfig) -> None:
        if not (cfg.data.domain_a and cfg.data.domain_b):
            raise ConfigError(
                "data.domain-a/data.domain-b are empty: a cyclegan run names its two domains, values of the "
                "hospitals' data.domain-field, e.g. --set data.domain-a=ct --set data.domain-b=mr"
            )
        if cfg.output.preview:
            domains_of(
                SliceSet.load(cfg.output.preview), cfg.data, path=f"output.preview {cfg.output.preview}"
            )

    def simulation_notes(self, cfg: RunConfig, hospitals: dict[str, SliceSet]) -> list[str]:
        """Which value is domain A and which B (what --direction a2b means), each
        hospital's training slices of each, and a warning when no hospital holds both."""
        data = cfg.data
        lines = [
            f"cyclegan domains ({data.domain_field}): A = {data.domain_a}, B = {data.domain_b} (a2b "
            f"translates {data.domain_a} to {data.domain_b})"
        ]
        held = []
        for name, slices in hospitals.items():
            domains = domains_of(slices.only(TRAIN), data, path=name)
            counts = {d: int((domains == d).sum()) for d in ("a", "b")}
            held.append(all(counts.values()))
            lines.append(f"  {name}: {counts['a']} A, {counts['b']} B training slices")
        if not any(held) and not cfg.federation.aggregate_discriminator:
            lines.append(
                "[yellow]no hospital holds both domains, and the discriminators stay local: nothing will "
                "judge A -> B translations of real A against real B, and translations can look right yet be "
                "wrong (see BENCHMARKS.md, CycleGAN on toy domains); --set "
                "federation.aggregate-discriminator=true shares each domain's PatchGAN, at a privacy "
                "price[/]"
            )
        return lines

    # --- training
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
        """The round on this hospital's slices of domain A and of domain B (either may be
        absent: ``train_round_cycle`` then trains the half it can, or with
        ``shared_discriminator``, the discriminators received from the server, both)."""
        images = torch.from_numpy(train.as_float()).to(device)
        domains = domains_of(train, cfg.data)
        sources = {}
        for d in ("a", "b"):
            index = torch.from_numpy(np.flatnonzero(domains == d)).to(images.device)
            sources[d] = (
                BatchSource(
                    images[index],
                    torch.zeros(len(index), device=images.device),
                    batch_size=cfg.train.batch_size,
                    generator=generator,
                )
                if len(index)
                else None
            )
        return train_round_cycle(
            gen,
            disc,
            opt_g,
            opt_d,
            sources["a"],
            sources["b"],
            cfg.train,
            generator=generator,
            shared_judges=shared_discriminator,
        )

    # --- pictures
    def round_grid(self, gen: GeneratorNet, cfg: RunConfig, path: Path, *, title: str) -> Path | None:
        """The server holds no slices: it translates the preview set (``output.preview``), if given."""
        if not cfg.output.preview:
            return None
        return translate_grid(gen, cfg, path, title=title)

    # --- validation score
    def validation_score(
        self, gen: GeneratorNet, validation: SliceSet, cfg: RunConfig, *, hospital: str
    ) -> dict[str, Any]:
        """The Fréchet distance (pixel PCA fitted on the target domain's validation
        slices) between each domain's validation slices translated and the other domain's,
        averaged over the two directions, and the mean cycle L1. Scored only where the
        hospital has at least 2 validation slices of each domain, on at most
        ``VALIDATION_SAMPLES`` of each (the same ones every round)."""
        domains = _domains_or_none(validation, cfg)
        real = {d: validation.images[domains == d] for d in ("a", "b")}
        if min(len(v) for v in real.values()) < 2:
            return {"val-n": int((domains != "").sum())}
        # The same subsample every round (at most VALIDATION_SAMPLES per domain), so scores compare.
        rng = np.random.default_rng(derive_seed(cfg.train.seed, "validation-translation"))
        real = {
            d: v[np.sort(rng.choice(len(v), size=VALIDATION_SAMPLES, replace=False))]
            if len(v) > VALIDATION_SAMPLES
            else v
            for d, v in real.items()
        }
        fds, cycles = [], []
        for source, target in (("a", "b"), ("b", "a")):
            moved = translate(gen, real[source], f"{source}2{target}")
            back = translate(gen, moved, f"{target}2{source}")
            cycles.append(float(np.abs(back.astype(np.float32) - real[source]).mean() / 127.5))
            space = PixelSpace(components=min(VALIDATION_COMPONENTS, len(real[target]) - 1)).fit(real[target])
            fds.append(float(frechet_distance(space.transform(real[target]), space.transform(moved))))
        return {
            "val-fd": float(np.mean(fds)),
            "val-cycle": float(np.mean(cycles)),
            "val-n": int((domains != "").sum()),
        }

    # --- synthesis
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
        raise UserError(
            f"model {cfg.model.name!r} translates slices rather than drawing them: `fedsynth translate --run "
            f"{where} --direction a2b --data SLICES.npz --out TRANSLATED.npz` (the translations show real "
            "patients' anatomy: `fedsynth audit` does not audit them as synthetic)"
        )

    def translate(self, gen: GeneratorNet, images: np.ndarray, direction: str) -> np.ndarray:
        return translate(gen, images, direction)


def _domains_or_none(slices: SliceSet, cfg: RunConfig) -> np.ndarray:
    """``domains_of``, or all ``""`` where no slice is of either domain."""
    try:
        return domains_of(slices, cfg.data)
    except SliceSetError:
        return np.full(len(slices), "")


def _domain_settings(
    cfg: RunConfig, slices: SliceSet, data_path: str | Path, samples_dir: Path
) -> dict[str, object]:
    """CycleGAN: the two domains (named by the config, or the two values of
    ``data.domain-field`` when it has exactly two) and the preview set the server
    translates for its round grids (a few training slices of each domain: in a
    simulation the operator holds all the data anyway).

    Raises
    ------
    ConfigError
        The domains are not named and cannot be inferred, or match no slice.
    """
    out: dict[str, object] = {}
    data = cfg.data
    if not data.domain_a and not data.domain_b:
        guess = guess_domains(slices, data.domain_field)
        if guess is None:
            try:
                values = ", ".join(sorted(set(domain_values(slices, data.domain_field).tolist()))[:8])
            except SliceSetError as err:
                raise ConfigError(f"{data_path}: {err}") from None
            raise ConfigError(
                f"model.name=cyclegan: set data.domain-a and data.domain-b to two values of {data_path}'s "
                f"{data.domain_field} field ({values})"
            )
        out["data.domain-a"], out["data.domain-b"] = guess
        data = data.model_copy(update={"domain_a": guess[0], "domain_b": guess[1]})
    try:
        domains = domains_of(slices, data, path=data_path)
    except SliceSetError as err:
        raise ConfigError(str(err)) from None
    train = np.flatnonzero(slices.split == TRAIN)
    for d, name in (("a", data.domain_a), ("b", data.domain_b)):
        if not (domains[train] == d).any():
            found = ", ".join(sorted(set(domain_values(slices, data.domain_field).tolist()))[:8])
            raise ConfigError(
                f"data.domain-{d} {name!r}: no training slice of {data_path} has that {data.domain_field} "
                f"(found: {found})"
            )
    if not cfg.output.preview:
        rng = np.random.default_rng(cfg.train.seed)
        pick = []
        for d in ("a", "b"):
            index = train[domains[train] == d]
            pick += sorted(rng.choice(index, size=min(cfg.output.grid_per_class, len(index)), replace=False))
        path = samples_dir / "preview.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        slices.subset(np.array(pick, dtype=int)).save(path)
        out["output.preview"] = str(path)
    return out
