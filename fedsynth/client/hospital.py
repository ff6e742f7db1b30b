"""One hospital's side of a federated round: its data, its local state, its training."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..audit.features import PixelSpace
from ..audit.fidelity import frechet_distance
from ..shared.checkpoint import load_checkpoint, load_torch_tensors, save_checkpoint, save_torch_atomic
from ..shared.config import RunConfig
from ..shared.device import pick_device
from ..shared.domains import domains_of
from ..shared.models import build_gan
from ..shared.sampling import generate
from ..shared.sliceset import TRAIN, VALIDATION, SliceSet, SliceSetError
from ..shared.weights import exchanged_state, load_weights
from .dp import (
    PatientSampler,
    PerSampleClipper,
    PrivacyError,
    PrivacyState,
    check_dp_discriminator,
    plan_privacy,
    secure_generator,
    train_round_dp,
)
from .train import BatchSource, RoundStats, make_optimizers, train_round, train_round_cycle

__all__ = ["HospitalSite", "LocalRoundResult", "derive_seed", "run_local_round"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HospitalSite:
    """Where a hospital's slice set and its local training state live."""

    name: str
    data_path: Path
    state_dir: Path
    # This hospital's own settings (``dp.*`` keys), over the run config's.
    overrides: dict[str, Any] = field(default_factory=dict)
    # The privacy ledger of this hospital's data set. In a deployment it lives outside
    # any one run (keyed by the data file's hash), so a new run cannot spend the same
    # patients' budget afresh; by default it is the run's own state folder.
    privacy_path: Path | None = None

    @property
    def ledger_path(self) -> Path:
        return self.privacy_path or self.state_dir / "privacy.json"

    def config(self, cfg: RunConfig) -> RunConfig:
        """The run config with this hospital's own ``dp.*`` settings applied.

        Raises
        ------
        ConfigError
            A hospital setting outside the ``dp`` section, or an invalid one.
        """
        if not self.overrides:
            return cfg
        foreign = sorted(k for k in self.overrides if not k.startswith("dp."))
        if foreign:
            from ..shared.config import ConfigError

            raise ConfigError(f"{self.name}: a hospital may only set dp.* keys, not {', '.join(foreign)}")
        return cfg.with_overrides(self.overrides)


@dataclass(frozen=True)
class LocalRoundResult:
    generator: dict[str, torch.Tensor] | None
    discriminator: dict[str, torch.Tensor] | None
    stats: RoundStats | None
    privacy: dict[str, Any] | None = None  # what this hospital has spent (DP runs)
    declined: str | None = None  # why the hospital did not train this round


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (base seed, hospital, round), stable across runs."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def load_hospital_slices(site: HospitalSite, cfg: RunConfig) -> SliceSet:
    """The hospital's slice set, checked against what the run expects.

    Raises
    ------
    SliceSetError
        Unreadable file, wrong image size, other classes, or no training slices.
    """
    slices = SliceSet.load(site.data_path)
    expected = cfg.data.classes
    if slices.image_size != cfg.data.image_size:
        raise SliceSetError(
            f"{site.data_path}: slices are {slices.image_size} px but the run expects "
            f"data.image-size {cfg.data.image_size}"
        )
    if expected and list(slices.class_names) != expected:
        raise SliceSetError(
            f"{site.data_path}: classes {list(slices.class_names)} differ from the run's "
            f"data.class-names {expected}"
        )
    if not (slices.split == TRAIN).any():
        raise SliceSetError(f"{site.data_path}: no training slices at {site.name}")
    if cfg.model.on_masks and slices.masks is None:
        raise SliceSetError(f"{site.data_path}: model.name=pix2pix needs each slice's mask; prepare the volumes with "
                            "`fedsynth prepare ... --keep-masks`")
    if cfg.model.on_domains:
        train = slices.only(TRAIN)
        if not (domains_of(train, cfg.data, path=site.data_path) != "").any():
            raise SliceSetError(f"{site.data_path}: no training slice of domain {cfg.data.domain_a!r} or "
                                f"{cfg.data.domain_b!r} at {site.name}")
    return slices


def conditions(slices: SliceSet, gen: torch.nn.Module) -> np.ndarray:
    """What the generator is conditioned on for these slices: their masks (N, H, W, uint8:
    the embedding reads them as ints) for pix2pix, else their class labels (N,)."""
    if getattr(gen, "paired", False):
        assert slices.masks is not None  # load_hospital_slices checked
        return slices.masks
    return slices.labels


class _LocalState:
    """The hospital's private training state between rounds: its discriminator and both
    optimizers' moments. Stored at the hospital, never sent."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.disc_path = folder / "discriminator.safetensors"
        self.optim_path = folder / "optimizers.pt"
        self.info_path = folder / "local.json"

    def exists(self) -> bool:
        return self.disc_path.is_file()

    def load(self, disc: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> int:
        tensors, _ = load_checkpoint(self.disc_path)
        load_weights(disc, tensors)
        if self.optim_path.is_file():
            states = load_torch_tensors(self.optim_path)
            assert isinstance(states, dict)
            opt_g.load_state_dict(states["generator"])
            opt_d.load_state_dict(states["discriminator"])
        info = json.loads(self.info_path.read_text()) if self.info_path.is_file() else {}
        return int(info.get("last_round", 0))

    def save(self, disc: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
             *, server_round: int, hospital: str) -> None:
        save_checkpoint(self.disc_path, exchanged_state(disc), {"round": str(server_round), "hospital": hospital})
        save_torch_atomic(self.optim_path, {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()})
        self.info_path.write_text(json.dumps({"last_round": server_round, "hospital": hospital}))


def run_local_round(
    site: HospitalSite,
    cfg: RunConfig,
    *,
    server_round: int,
    global_generator: dict[str, torch.Tensor],
    global_discriminator: dict[str, torch.Tensor] | None = None,
) -> LocalRoundResult:
    """Train the received global generator on this hospital's slices for one round.

    The discriminator is the hospital's own (restored from its state folder), unless the
    run aggregates discriminators, in which case the global one is used. With DP on
    (``dp.target-epsilon`` or ``dp.noise-multiplier``) the discriminator trains with
    DP-SGD, the round's steps are charged to the hospital's privacy history *before*
    training starts, and a round that would exceed ``dp.target-epsilon`` is declined.

    Returns
    -------
    The updated generator weights (and discriminator weights when aggregated), the
    round's statistics and, under DP, the privacy spent so far.

    Raises
    ------
    PrivacyError
        DP is on but the discriminator cannot be made private, or the budget cannot be met.
    """
    cfg = site.config(cfg)
    slices = load_hospital_slices(site, cfg)
    train = slices.only(TRAIN)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    seed = derive_seed(cfg.train.seed, site.name, server_round)
    torch.manual_seed(derive_seed(cfg.train.seed, site.name, "init"))
    gen, disc = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=len(train.class_names))
    torch.manual_seed(seed)  # what draws from torch's global generator (stylegan2-lite's noise) differs per round
    state = _LocalState(site.state_dir)
    privacy = plan = None
    if cfg.dp.enabled:
        check_dp_discriminator(disc, cfg.train)
        with PrivacyState.lock(site.ledger_path):
            privacy = PrivacyState.load(site.ledger_path)
            try:
                plan = _privacy_plan(cfg, train, privacy, run_key=site.state_dir.name)
            except PrivacyError as err:  # a budget no noise can meet: decline, saying why
                log.warning("%s declines round %d: %s", site.name, server_round, err)
                return LocalRoundResult(None, None, None, privacy=None, declined=f"privacy budget: {err}")
            step = (plan.noise_multiplier, plan.sample_rate, cfg.train.critic_steps)
            after = privacy.epsilon(extra=step)
            if plan.target_epsilon > 0 and after > plan.target_epsilon + 1e-9:
                reason = (f"privacy budget: another round would spend epsilon {after:.3g} > "
                          f"dp.target-epsilon {plan.target_epsilon:g} (spent {privacy.epsilon():.3g})")
                log.warning("%s declines round %d: %s", site.name, server_round, reason)
                return LocalRoundResult(None, None, None, privacy=_privacy_report(privacy, plan), declined=reason)
            # Charge the round before training: a crash part-way must not under-report.
            privacy.add(*step)
            privacy.save(site.ledger_path)
    load_weights(gen, global_generator)
    gen.to(device)
    disc.to(device)
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    if state.exists():
        last = state.load(disc, opt_g, opt_d)
        log.info("%s: restored local state from round %d", site.name, last)
    if global_discriminator:
        load_weights(disc, global_discriminator)
    rng = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(train.as_float()).to(device)
    if cfg.model.on_domains:
        stats = _cycle_round(gen, disc, opt_g, opt_d, images, domains_of(train, cfg.data), cfg, rng,
                             shared_judges=bool(global_discriminator))
    elif plan is not None:
        # Which patients are sampled and the noise must be unpredictable: not from the
        # run seed (the server knows it), and different if a round is re-run.
        labels = torch.from_numpy(conditions(train, gen)).to(device)  # class labels, or masks for pix2pix
        secure = secure_generator()
        sampler = PatientSampler(_unit_ids(train), plan.sample_rate, secure)
        private = PerSampleClipper(disc, max_grad_norm=plan.max_grad_norm)
        stats = train_round_dp(gen, private, opt_g, opt_d, images, labels, sampler, plan, cfg.train,
                               num_classes=len(train.class_names), generator=rng, noise_generator=secure)
    else:
        labels = torch.from_numpy(conditions(train, gen)).to(device)
        batches = BatchSource(images, labels, batch_size=cfg.train.batch_size, generator=rng)
        stats = train_round(gen, disc, opt_g, opt_d, batches, cfg.train, generator=rng)
    state.save(disc, opt_g, opt_d, server_round=server_round, hospital=site.name)
    log.info("%s round %d: d=%.3f g=%.3f %.0f img/s", site.name, server_round, stats.d_loss, stats.g_loss,
             stats.images_per_second)
    return LocalRoundResult(
        generator={k: v.cpu() for k, v in exchanged_state(gen).items()},
        discriminator={k: v.cpu() for k, v in exchanged_state(disc).items()}
        if cfg.federation.aggregate_discriminator else None,
        stats=stats,
        privacy=_privacy_report(privacy, plan) if privacy is not None and plan is not None else None,
    )


def _cycle_round(gen: torch.nn.Module, disc: torch.nn.Module, opt_g: torch.optim.Optimizer,
                 opt_d: torch.optim.Optimizer, images: torch.Tensor, domains: np.ndarray, cfg: RunConfig,
                 rng: torch.Generator, *, shared_judges: bool) -> RoundStats:
    """CycleGAN's round on this hospital's slices of domain A and of domain B (either may
    be absent: ``train_round_cycle`` then trains the half it can, or with
    ``shared_judges``, the discriminators received from the server, both)."""
    sources = {}
    for d in ("a", "b"):
        index = torch.from_numpy(np.flatnonzero(domains == d)).to(images.device)
        sources[d] = (BatchSource(images[index], torch.zeros(len(index), device=images.device),
                                  batch_size=cfg.train.batch_size, generator=rng) if len(index) else None)
    return train_round_cycle(gen, disc, opt_g, opt_d, sources["a"], sources["b"], cfg.train, generator=rng,
                             shared_judges=shared_judges)


VALIDATION_SAMPLES = 256  # generated images per validation score
VALIDATION_COMPONENTS = 16  # pixel PCA dimensions of the score's feature space


def score_validation(site: HospitalSite, cfg: RunConfig, global_generator: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The Fréchet distance between the generator's images and this hospital's validation
    slices, in a pixel space (PCA, up to 16 components) fitted on the validation slices
    themselves, so the score reads no training slice.

    The same noise, labels (drawn from the validation slices' classes) and feature space
    every round, so scores of successive rounds compare. Validation patients are never
    trained on: the score chooses a checkpoint without touching the holdout the audit
    uses. Returns ``{"val-n": 0}`` when the hospital has fewer than 2 validation slices.
    """
    cfg = site.config(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    slices = load_hospital_slices(site, cfg)
    validation = slices.only(VALIDATION)
    if len(validation) < 2:
        return {"val-n": len(validation)}
    gen, _ = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=len(slices.class_names))
    load_weights(gen, global_generator)
    if cfg.model.on_domains:
        return _score_translation(gen, validation, cfg)
    rng = np.random.default_rng(derive_seed(cfg.train.seed, site.name, "validation"))
    if getattr(gen, "paired", False):  # pix2pix: the validation slices' own masks
        labels = conditions(validation, gen)[rng.choice(len(validation), size=VALIDATION_SAMPLES)]
    elif getattr(gen, "conditional", False):
        labels = rng.choice(validation.labels, size=VALIDATION_SAMPLES)
    else:
        labels = np.zeros(VALIDATION_SAMPLES, dtype=np.int64)
    fake = generate(gen, labels, seed=derive_seed(cfg.train.seed, site.name, "validation-noise"))
    space = PixelSpace(components=min(VALIDATION_COMPONENTS, len(validation) - 1)).fit(validation.images)
    fd = frechet_distance(space.transform(validation.images), space.transform(fake))
    return {"val-fd": float(fd), "val-n": len(validation)}


def _score_translation(gen: torch.nn.Module, validation: SliceSet, cfg: RunConfig) -> dict[str, Any]:
    """CycleGAN's validation score: the Fréchet distance (pixel PCA fitted on the target
    domain's validation slices) between each domain's validation slices translated and
    the other domain's, averaged over the two directions, and the mean cycle L1. Scored
    only where the hospital has at least 2 validation slices of each domain, on at most
    ``VALIDATION_SAMPLES`` of each (the same ones every round)."""
    from ..shared.sampling import translate

    domains = domains_of_or_none(validation, cfg)
    real = {d: validation.images[domains == d] for d in ("a", "b")}
    if min(len(v) for v in real.values()) < 2:
        return {"val-n": int((domains != "").sum())}
    # The same subsample every round (at most VALIDATION_SAMPLES per domain), so scores compare.
    rng = np.random.default_rng(derive_seed(cfg.train.seed, "validation-translation"))
    real = {d: v[np.sort(rng.choice(len(v), size=VALIDATION_SAMPLES, replace=False))] if len(v) > VALIDATION_SAMPLES
            else v for d, v in real.items()}
    fds, cycles = [], []
    for source, target in (("a", "b"), ("b", "a")):
        moved = translate(gen, real[source], f"{source}2{target}")
        back = translate(gen, moved, f"{target}2{source}")
        cycles.append(float(np.abs(back.astype(np.float32) - real[source]).mean() / 127.5))
        space = PixelSpace(components=min(VALIDATION_COMPONENTS, len(real[target]) - 1)).fit(real[target])
        fds.append(float(frechet_distance(space.transform(real[target]), space.transform(moved))))
    return {"val-fd": float(np.mean(fds)), "val-cycle": float(np.mean(cycles)), "val-n": int((domains != "").sum())}


def domains_of_or_none(slices: SliceSet, cfg: RunConfig) -> np.ndarray:
    """``domains_of``, or all ``""`` where no slice is of either domain."""
    try:
        return domains_of(slices, cfg.data)
    except SliceSetError:
        return np.full(len(slices), "")


def _unit_ids(train: SliceSet) -> np.ndarray:
    """Privacy unit of each training slice: its patient, or itself where ids are unknown."""
    if train.patient_ids_known:
        return train.patient_ids.astype(str)
    return np.arange(len(train)).astype(str)


def _privacy_plan(cfg: RunConfig, train: SliceSet, privacy: PrivacyState, run_key: str):  # type: ignore[no-untyped-def]
    """The hospital's DP plan for this run.

    Sigma is chosen once, at the run's first round, and kept, so extending a run later
    cannot quietly lower the noise. With a target and spending from earlier runs on the
    same data, sigma is chosen so that the earlier spending plus this run's planned
    steps stay within the target.
    """
    units = len(np.unique(_unit_ids(train)))
    planned = cfg.federation.rounds * cfg.train.critic_steps  # DP steps: one per critic update

    def plan_with(sigma: float | None):  # type: ignore[no-untyped-def]
        dp = cfg.dp if sigma is None else cfg.dp.model_copy(update={"noise_multiplier": sigma})
        return plan_privacy(dp, units=units, unit=train.privacy_unit, batch_size=cfg.train.batch_size,
                            planned_steps=planned)

    kept = privacy.plans.get(run_key)
    if kept is None and privacy.history and not privacy.plans:  # a ledger written by fedsynth 0.1.0
        kept = list(privacy.history[0][:2])
    if kept is not None:
        sigma, q = kept
        return replace(plan_with(sigma), sample_rate=q, delta=privacy.delta)
    if privacy.history and cfg.dp.target_epsilon > 0 and cfg.dp.noise_multiplier == 0:
        plan = plan_with(1.0)  # for q; sigma follows from what earlier runs left
        sigma = sigma_for_remaining(privacy, plan.sample_rate, planned, cfg.dp.target_epsilon)
        plan = replace(plan, noise_multiplier=sigma, delta=privacy.delta)
    else:
        plan = plan_with(None)
        if privacy.history:
            plan = replace(plan, delta=privacy.delta)
    if not privacy.history:
        privacy.delta, privacy.unit, privacy.units = plan.delta, plan.unit, plan.units
    privacy.plans[run_key] = [plan.noise_multiplier, plan.sample_rate]
    return plan


def sigma_for_remaining(privacy: PrivacyState, q: float, steps: int, target: float) -> float:
    """The smallest sigma (to 1%) whose ``steps`` more steps keep the ledger's epsilon
    within ``target``; 1000 if none does (the hospital will then decline)."""
    def fits(sigma: float) -> bool:
        return privacy.epsilon(extra=(sigma, q, steps)) <= target

    low, high = 0.3, 1000.0
    if not fits(high):
        return high
    if fits(low):
        return low
    while high / low > 1.01:
        mid = (low * high) ** 0.5
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high


def _privacy_report(privacy: PrivacyState, plan) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """What the hospital tells the server about its privacy spending."""
    return {
        "dp-epsilon": privacy.epsilon("rdp"),
        "dp-epsilon-prv": _prv(privacy),
        "dp-delta": privacy.delta,
        "dp-noise-multiplier": plan.noise_multiplier,
        "dp-sample-rate": plan.sample_rate,
        "dp-steps": privacy.steps,
        "dp-max-grad-norm": plan.max_grad_norm,
        "dp-units": plan.units,
        "dp-target-epsilon": plan.target_epsilon,
        "dp-unit": plan.unit,
    }


def _prv(privacy: PrivacyState) -> float:
    try:
        return privacy.epsilon("prv")
    except Exception as err:  # PRV's numerical domain is narrower than RDP's
        log.warning("PRV accountant failed (%s); reporting RDP only", err)
        return float("nan")
