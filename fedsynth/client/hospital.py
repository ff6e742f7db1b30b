"""One hospital's side of a federated round: its data, its local state, its training.

What differs between model families is asked of the run's family (``cfg.model.family``);
what is the same for all (restoring the hospital's discriminator and optimizers, DP-SGD's
plan and charge before the round, what is sent back) is here."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.core.checkpoint import (
    load_checkpoint,
    load_torch_tensors,
    save_checkpoint,
    save_torch_atomic,
)
from fedsynth.core.device import available_cores, pick_device
from fedsynth.core.errors import ConfigError
from fedsynth.core.files import write_json_atomic
from fedsynth.core.seeds import derive_seed
from fedsynth.core.weights import exchanged_state, load_weights
from fedsynth.data.sliceset import TRAIN, VALIDATION, SliceSet, SliceSetError
from fedsynth.models import PrivateRound, build_networks
from fedsynth.models.training import RoundStats, make_optimizers
from fedsynth.privacy import (
    PatientSampler,
    PrivacyError,
    PrivacyState,
    plan_for_run,
    privacy_report,
    secure_generator,
)
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import HospitalState

__all__ = [
    "HospitalSite",
    "LocalRoundResult",
    "load_hospital_slices",
    "release_summary",
    "run_local_round",
    "score_validation",
]

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
    def state(self) -> HospitalState:
        return HospitalState(self.state_dir)

    @property
    def ledger_path(self) -> Path:
        return self.privacy_path or self.state.ledger_path

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
            raise ConfigError(f"{self.name}: a hospital may only set dp.* keys, not {', '.join(foreign)}")
        return cfg.with_overrides(self.overrides)


@dataclass(frozen=True)
class LocalRoundResult:
    generator: dict[str, torch.Tensor] | None
    discriminator: dict[str, torch.Tensor] | None
    stats: RoundStats | None
    privacy: dict[str, Any] | None = None  # what this hospital has spent (DP runs)
    declined: str | None = None  # why the hospital did not train this round
    # A family that federates a summary (dp-merf): what the hospital sends instead of weights.
    release: dict[str, torch.Tensor] | None = None
    release_metrics: dict[str, float | int] | None = None


def load_hospital_slices(site: HospitalSite, cfg: RunConfig) -> SliceSet:
    """The hospital's slice set, checked against what the run expects.

    Raises
    ------
    SliceSetError
        Unreadable file, wrong image size, other classes, no training slices, or what
        the run's family needs missing (masks, slices of its domains).
    """
    slices = SliceSet.load(site.data_path)
    expected = cfg.data.classes
    if slices.image_size != cfg.data.image_size:
        raise SliceSetError(
            f"{site.data_path}: slices are {slices.image_size} px but the run expects data.image-size "
            f"{cfg.data.image_size}"
        )
    if expected and list(slices.class_names) != expected:
        raise SliceSetError(
            f"{site.data_path}: classes {list(slices.class_names)} differ from the run's data.class-names "
            f"{expected}"
        )
    if not (slices.split == TRAIN).any():
        raise SliceSetError(f"{site.data_path}: no training slices at {site.name}")
    cfg.model.family.check_slices(slices, cfg, path=site.data_path, hospital=site.name)
    return slices


def _with_classes(cfg: RunConfig, slices: SliceSet) -> RunConfig:
    """The run config naming the slice set's classes where it names none (the networks'
    class embeddings are sized from ``data.class-names``)."""
    if cfg.data.class_names:
        return cfg
    return cfg.with_overrides({"data.class-names": ",".join(slices.class_names)})


def restore_local_state(
    state: HospitalState, disc: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer
) -> int | None:
    """The hospital's private training state between rounds (its discriminator and both
    optimizers' moments, stored at the hospital, never sent) into the networks' places;
    returns the round it was saved after, or None when there is none yet."""
    if not state.discriminator_path.is_file():
        return None
    tensors, _ = load_checkpoint(state.discriminator_path)
    load_weights(disc, tensors)
    if state.optimizers_path.is_file():
        states = load_torch_tensors(state.optimizers_path)
        assert isinstance(states, dict)
        opt_g.load_state_dict(states["generator"])
        opt_d.load_state_dict(states["discriminator"])
    info = json.loads(state.info_path.read_text()) if state.info_path.is_file() else {}
    return int(info.get("last_round", 0))


def save_local_state(
    state: HospitalState,
    disc: torch.nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    *,
    server_round: int,
    hospital: str,
) -> None:
    save_checkpoint(
        state.discriminator_path, exchanged_state(disc), {"round": str(server_round), "hospital": hospital}
    )
    save_torch_atomic(
        state.optimizers_path, {"generator": opt_g.state_dict(), "discriminator": opt_d.state_dict()}
    )
    write_json_atomic(state.info_path, {"last_round": server_round, "hospital": hospital})


def scaled_learning_rates(cfg: RunConfig, hospitals_asked: int) -> RunConfig:
    """``cfg`` with the learning rates ``federation.lr-scaling`` gives a round that asked
    ``hospitals_asked`` hospitals."""
    if cfg.federation.lr_scaling == "none" or hospitals_asked <= 1:
        return cfg
    scale = math.sqrt(hospitals_asked)
    return cfg.with_overrides({"train.lr-g": cfg.train.lr_g * scale, "train.lr-d": cfg.train.lr_d * scale})


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def run_local_round(
    site: HospitalSite,
    cfg: RunConfig,
    *,
    server_round: int,
    global_generator: dict[str, torch.Tensor],
    global_discriminator: dict[str, torch.Tensor] | None = None,
    hospitals_asked: int = 1,
) -> LocalRoundResult:
    """Train the received global generator on this hospital's slices for one round.

    ``hospitals_asked`` is how many hospitals the round asked: with ``federation.lr-scaling``
    at ``sqrt-hospitals`` the learning rates are multiplied by its square root (the
    averaged update is one over that many hospitals' batches).

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
    cfg = scaled_learning_rates(site.config(cfg), hospitals_asked)
    slices = load_hospital_slices(site, cfg)
    train = slices.only(TRAIN)
    torch.set_num_threads(cfg.train.threads or available_cores())
    device = pick_device(cfg.train.device)
    seed = derive_seed(cfg.train.seed, site.name, server_round)
    torch.manual_seed(derive_seed(cfg.train.seed, site.name, "init"))
    family = cfg.model.family
    cfg = _with_classes(cfg, slices)
    gen, disc = build_networks(cfg)
    torch.manual_seed(
        seed
    )  # what draws from torch's global generator (stylegan2-lite's noise) differs per round
    privacy = plan = None
    if cfg.dp.enabled:
        family.check_dp(disc, cfg.train)
        with PrivacyState.lock(site.ledger_path):
            privacy = PrivacyState.load(site.ledger_path)
            try:
                plan = plan_for_run(
                    cfg.dp,
                    privacy,
                    run_key=site.state_dir.name,
                    units=len(np.unique(_unit_ids(train))),
                    unit=train.privacy_unit,
                    batch_size=cfg.train.batch_size,
                    planned_steps=cfg.federation.rounds * cfg.train.critic_steps,
                )
            except PrivacyError as err:  # a budget no noise can meet: decline, saying why
                log.warning("%s declines round %d: %s", site.name, server_round, err)
                return LocalRoundResult(None, None, None, privacy=None, declined=f"privacy budget: {err}")
            step = (plan.noise_multiplier, plan.sample_rate, cfg.train.critic_steps)
            after = privacy.epsilon(extra=step)
            if plan.target_epsilon > 0 and after > plan.target_epsilon + 1e-9:
                reason = (
                    f"privacy budget: another round would spend epsilon {after:.3g} > dp.target-epsilon "
                    f"{plan.target_epsilon:g} (spent {privacy.epsilon():.3g})"
                )
                log.warning("%s declines round %d: %s", site.name, server_round, reason)
                return LocalRoundResult(
                    None, None, None, privacy=privacy_report(privacy, plan), declined=reason
                )
            # Charge the round before training: a crash part-way must not under-report.
            privacy.add(*step)
            privacy.save(site.ledger_path)
    load_weights(gen, global_generator)
    gen.to(device)
    disc.to(device)
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    last = restore_local_state(site.state, disc, opt_g, opt_d)
    if last is not None:
        log.info("%s: restored local state from round %d", site.name, last)
        # The moments carry over; the rates are this round's (the number of hospitals asked,
        # or the config after a resume, may have changed).
        set_learning_rate(opt_g, cfg.train.lr_g)
        set_learning_rate(opt_d, cfg.train.lr_d)
    if global_discriminator:
        load_weights(disc, global_discriminator)
    rng = torch.Generator().manual_seed(seed)
    private = None
    if plan is not None:
        # Which patients are sampled and the noise must be unpredictable: not from the
        # run seed (the server knows it), and different if a round is re-run.
        secure = secure_generator()
        private = PrivateRound(plan, PatientSampler(_unit_ids(train), plan.sample_rate, secure), secure)
    stats = family.local_round(
        gen,
        disc,
        opt_g,
        opt_d,
        train,
        cfg,
        device=device,
        generator=rng,
        private=private,
        shared_discriminator=bool(global_discriminator),
    )
    save_local_state(site.state, disc, opt_g, opt_d, server_round=server_round, hospital=site.name)
    log.info(
        "%s round %d: d=%.3f g=%.3f %.0f img/s (lr-g %.3g, lr-d %.3g)",
        site.name,
        server_round,
        stats.d_loss,
        stats.g_loss,
        stats.images_per_second,
        cfg.train.lr_g,
        cfg.train.lr_d,
    )
    return LocalRoundResult(
        generator={k: v.cpu() for k, v in exchanged_state(gen).items()},
        discriminator={k: v.cpu() for k, v in exchanged_state(disc).items()}
        if cfg.federation.aggregate_discriminator
        else None,
        stats=stats,
        privacy=privacy_report(privacy, plan) if privacy is not None and plan is not None else None,
    )


def release_summary(site: HospitalSite, cfg: RunConfig, *, server_round: int) -> LocalRoundResult:
    """The hospital's one release for a family that federates a summary (dp-merf): its
    training slices summarised with the run's fixed feature map and, with DP on, Gaussian
    noise for ``dp.target-epsilon`` (or ``dp.noise-multiplier``) charged to the ledger as
    one full-batch step *before* the summary is computed. A hospital that has released for
    this run already (a re-sent round) is charged again: every release spends.

    Returns
    -------
    ``release``: the summary's tensors; ``privacy``: what has been spent, under DP; or
    ``declined`` with the reason, when the budget cannot be met.
    """
    cfg = site.config(cfg)
    slices = load_hospital_slices(site, cfg)
    train = slices.only(TRAIN)
    torch.set_num_threads(cfg.train.threads or available_cores())
    family = cfg.model.family
    cfg = _with_classes(cfg, slices)
    _, features = build_networks(cfg)
    units = _unit_ids(train)
    started = time.perf_counter()
    privacy = plan = None
    noise_std = 0.0
    if cfg.dp.enabled:
        with PrivacyState.lock(site.ledger_path):
            privacy = PrivacyState.load(site.ledger_path)
            count = len(np.unique(units))
            try:
                plan = plan_for_run(
                    cfg.dp,
                    privacy,
                    run_key=site.state_dir.name,
                    units=count,
                    unit=train.privacy_unit,
                    batch_size=count,  # one full-batch release: sample rate 1
                    planned_steps=1,
                )
            except PrivacyError as err:
                log.warning("%s declines the release: %s", site.name, err)
                return LocalRoundResult(None, None, None, declined=f"privacy budget: {err}")
            step = (plan.noise_multiplier, plan.sample_rate, 1)
            after = privacy.epsilon(extra=step)
            if plan.target_epsilon > 0 and after > plan.target_epsilon + 1e-9:
                reason = (
                    f"privacy budget: releasing would spend epsilon {after:.3g} > dp.target-epsilon "
                    f"{plan.target_epsilon:g} (spent {privacy.epsilon():.3g})"
                )
                log.warning("%s declines the release: %s", site.name, reason)
                return LocalRoundResult(
                    None, None, None, privacy=privacy_report(privacy, plan), declined=reason
                )
            privacy.add(*step)
            privacy.save(site.ledger_path)
        noise_std = plan.noise_multiplier * family.release_sensitivity
    released = family.release(
        features,
        train,
        units,
        conditional=family.conditional(cfg.model),
        noise_std=noise_std,
        noise=secure_generator() if noise_std > 0 else None,
    )
    seconds = time.perf_counter() - started
    log.info("%s released its summary of %d slices in %.1f s", site.name, len(train), seconds)
    report = None
    if privacy is not None and plan is not None:
        report = {
            **privacy_report(privacy, plan),
            "dp-sensitivity": family.release_sensitivity,
            "dp-noise-std": noise_std,
        }
    return LocalRoundResult(
        None,
        None,
        None,
        privacy=report,
        release={k: v.cpu() for k, v in released.items()},
        release_metrics={"num-examples": len(train), "seconds": round(seconds, 3)},
    )


def score_validation(
    site: HospitalSite, cfg: RunConfig, global_generator: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The family's validation score of the received generator on this hospital's
    validation slices (patients never trained on: the score chooses a checkpoint without
    touching the holdout the audit uses). Returns ``{"val-n": N}`` alone when the
    hospital has fewer than 2 validation slices."""
    cfg = site.config(cfg)
    torch.set_num_threads(cfg.train.threads or available_cores())
    slices = load_hospital_slices(site, cfg)
    validation = slices.only(VALIDATION)
    if len(validation) < 2:
        return {"val-n": len(validation)}
    cfg = _with_classes(cfg, slices)
    gen, _ = build_networks(cfg)
    load_weights(gen, global_generator)
    return cfg.model.family.validation_score(gen, validation, cfg, hospital=site.name)


def _unit_ids(train: SliceSet) -> np.ndarray:
    """Privacy unit of each training slice: its patient, or itself where ids are unknown."""
    if train.patient_ids_known:
        return train.patient_ids.astype(str)
    return np.arange(len(train)).astype(str)
