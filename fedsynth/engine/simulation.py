"""Set up a simulated federation: split a slice set into hospitals and fill the run directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedsynth.core.checkpoint import file_sha256
from fedsynth.core.device import available_cores
from fedsynth.core.errors import ConfigError
from fedsynth.data.partition import partition
from fedsynth.data.sliceset import HOLDOUT, TRAIN, VALIDATION, SliceSet, with_validation
from fedsynth.models import build_networks
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir, RunDirError, collect_manifest
from fedsynth.runs.tracking import check_tracking
from fedsynth.synthesis.generator import find_warm_start, load_warm_start

__all__ = ["available_cores", "hospital_summary", "plan_cores", "prepare_simulation"]

log = logging.getLogger(__name__)


def prepare_simulation(
    cfg: RunConfig,
    data_path: str | Path,
    run: RunDir,
    *,
    hospital_settings: dict[str, dict[str, object]] | None = None,
) -> RunConfig:
    """Partition ``data_path`` into ``cfg.simulation.hospitals`` hospitals under
    ``RUN/hospitals/<name>/slices.npz`` and write the resolved config and manifest.

    ``hospital_settings`` gives single hospitals their own ``dp.*`` settings (written to
    ``RUN/hospitals/<name>/hospital.yaml``, read by that hospital's ClientApp only).

    Returns the resolved config (data shape, paths and threads filled in, and what the
    model family fills from the slice set).

    Raises
    ------
    RunDirError
        The run directory already holds a run.
    ConfigError
        The config's data section contradicts the slice set, or the family cannot train on it.
    """
    if run.last_round() is not None or run.config_path.exists():
        raise RunDirError(f"{run.root} already holds a run: resume it with --resume, or choose a new --out")
    slices = SliceSet.load(data_path)
    check_tracking(cfg)
    classes = ",".join(slices.class_names)
    if cfg.data.class_names and cfg.data.class_names != classes:
        raise ConfigError(
            f"data.class-names {cfg.data.class_names!r} differs from {data_path}'s classes {classes!r}"
        )
    family = cfg.model.family
    # Patients kept out of training to score each round's generator (checkpoint choice),
    # drawn before partitioning so every hospital holds some; a slice set with its own
    # validation split (`fedsynth prepare --validation`) keeps it.
    slices = with_validation(slices, cfg.simulation.validation, seed=cfg.train.seed)
    overrides = {
        "data.image-size": slices.image_size,
        "data.class-names": classes,
        "output.run-dir": str(run.root),
        "output.resume": False,
        "simulation.hospitals-dir": str(run.hospitals_dir),
        **family.simulation_settings(cfg, slices, data_path=Path(data_path), samples_dir=run.samples_dir),
    }
    warm = None
    if cfg.train.init_from:
        warm = find_warm_start(cfg.train.init_from)
        if warm.data_sha256 is not None and warm.data_sha256 == file_sha256(data_path):
            raise ConfigError(
                f"train.init-from {warm.checkpoint}: its run trained on {data_path} itself; a warm start "
                "must come from data you declare public, never from the slices this run protects"
            )
        overrides["train.init-from"] = str(warm.checkpoint)
    parts = partition(slices, cfg.simulation.partition, cfg.simulation.hospitals, seed=cfg.train.seed)
    sim = cfg.simulation
    parallel, cpus = sim.parallel_hospitals, sim.client_cpus
    if sim.ray_address:  # the cluster's cores, not this machine's, decide how many train at once
        cpus = cpus or 1
        if parallel:
            log.warning(
                "simulation.parallel-hospitals=%d is not used on a Ray cluster: its cores decide how many "
                "hospitals train at once (simulation.client-cpus each)",
                parallel,
            )
            parallel = 0
    elif sim.client_gpus == 0 and (parallel == 0 or cpus == 0):
        auto_parallel, auto_cpus = plan_cores(sim.hospitals, available_cores())
        parallel, cpus = parallel or auto_parallel, cpus or auto_cpus
        log.info(
            "simulation: %d hospitals at once, %d core(s) each, on %d cores",
            parallel,
            cpus,
            available_cores(),
        )
    slow = cfg.simulation.rehearsed()["slow"]
    if slow and parallel and not sim.parallel_hospitals:
        parallel += len(slow)  # a waiting slow site holds a worker, not a core: one more worker each
    overrides["simulation.parallel-hospitals"] = parallel
    overrides["simulation.client-cpus"] = cpus or 1
    if cfg.train.threads == 0:
        overrides["train.threads"] = cpus or 1
    cfg = cfg.with_overrides(overrides)
    if warm is not None:
        gen, _ = build_networks(cfg)
        load_warm_start(cfg, gen)  # a checkpoint that does not fit fails here, not in the first round
    for key, named in cfg.simulation.rehearsed().items():
        for name in named:
            if name not in parts:
                raise ConfigError(
                    f"simulation.{key}: no such hospital {name!r} (hospitals: {', '.join(parts)})"
                )
    for name, settings in (hospital_settings or {}).items():
        if name not in parts:
            raise ConfigError(f"--hospital-set {name}: no such hospital (hospitals: {', '.join(parts)})")
        if any(not key.startswith("dp.") for key in settings):
            raise ConfigError(f"--hospital-set {name}: a hospital may only set dp.* keys")
        cfg.with_overrides(settings)  # validate now, not in the middle of a round
    run.root.mkdir(parents=True, exist_ok=True)
    hospitals = run.hospitals
    counts = {}
    for name, part in parts.items():
        part.save(hospitals.slices(name))
        if hospital_settings and name in hospital_settings:
            hospitals.write_settings(name, hospital_settings[name])
        counts[name] = {
            "train": int((part.split == TRAIN).sum()),
            "validation": int((part.split == VALIDATION).sum()),
            "holdout": int((part.split == HOLDOUT).sum()),
            "train_per_class": part.only(TRAIN).class_counts(),
        }
    run.write_json(
        hospitals.manifest_path,
        {
            "hospitals": list(parts),
            "partition": cfg.simulation.partition,
            "source": str(Path(data_path).resolve()),
            "counts": counts,
            "settings": hospital_settings or {},
        },
    )
    run.save_config(cfg)
    run.write_json(
        run.manifest_path,
        collect_manifest(
            seeds={"train": cfg.train.seed, "partition": cfg.train.seed},
            data={
                "path": str(Path(data_path).resolve()),
                "sha256": file_sha256(data_path),
                "images": len(slices),
                "privacy_unit": slices.privacy_unit,
            },
            hospitals=counts,
            **({"warm_start": warm.record()} if warm is not None else {}),
        ),
    )
    family.real_grid(
        slices.only(TRAIN), run.real_grid_path, per_class=cfg.output.grid_per_class, seed=cfg.train.seed
    )
    return cfg


def plan_cores(hospitals: int, cores: int) -> tuple[int, int]:
    """(hospitals training at once, cores and torch threads each) that keep every core
    busy for the whole round, for hospitals that take about as long as each other.

    - Fewer hospitals than cores: all at once, the cores split among them.
    - A multiple of the cores: waves of one hospital per core, one thread each.
    - Otherwise waves would leave cores idle (three hospitals on two cores: a second wave
      of one, one core idle a third of the round), so all train at once, one thread each,
      sharing the cores, up to four per core (each hospital is a process holding its own
      model, optimiser and data); beyond that, waves of one per core.
    """
    hospitals, cores = max(1, hospitals), max(1, cores)
    if hospitals < cores:
        return hospitals, cores // hospitals
    if hospitals % cores == 0 or hospitals > 4 * cores:
        return cores, 1
    return hospitals, 1


def hospital_summary(run: RunDir) -> dict[str, dict[str, Any]]:
    """Each simulated hospital's slice counts (train, validation, holdout, per class)."""
    return dict(run.hospitals.manifest().get("counts", {}))
