"""Set up a simulated federation: split a slice set into hospitals and fill the run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import yaml

from ..shared.checkpoint import file_sha256
from ..shared.config import ConfigError, RunConfig
from ..shared.domains import domain_values, domains_of, guess_domains
from ..shared.partition import partition
from ..shared.rundir import HOSPITALS_MANIFEST, RunDir, RunDirError, collect_manifest
from ..shared.sampling import paired_grid, save_grid
from ..shared.sliceset import HOLDOUT, TRAIN, VALIDATION, SliceSet, SliceSetError, with_validation

__all__ = ["hospital_summary", "prepare_simulation", "resume_config", "write_real_grid"]

log = logging.getLogger(__name__)


def prepare_simulation(
    cfg: RunConfig, data_path: str | Path, run: RunDir, *, hospital_settings: dict[str, dict[str, object]] | None = None,
) -> RunConfig:
    """Partition ``data_path`` into ``cfg.simulation.hospitals`` hospitals under
    ``RUN/hospitals/<name>/slices.npz`` and write the resolved config and manifest.

    ``hospital_settings`` gives single hospitals their own ``dp.*`` settings (written to
    ``RUN/hospitals/<name>/hospital.yaml``, read by that hospital's ClientApp only).

    Returns the resolved config (data shape, paths and threads filled in).

    Raises
    ------
    RunDirError
        The run directory already holds a run.
    ConfigError
        The config's data section contradicts the slice set.
    """
    if run.last_round() is not None or run.config_path.exists():
        raise RunDirError(f"{run.root} already holds a run: resume it with --resume, or choose a new --out")
    slices = SliceSet.load(data_path)
    classes = ",".join(slices.class_names)
    if cfg.data.class_names and cfg.data.class_names != classes:
        raise ConfigError(f"data.class-names {cfg.data.class_names!r} differs from {data_path}'s classes {classes!r}")
    if cfg.model.on_masks and slices.masks is None:
        raise ConfigError(f"model.name=pix2pix needs each slice's mask, and {data_path} has none: prepare the volumes "
                          "with `fedsynth prepare VOLUMES --keep-masks`")
    # Patients kept out of training to score each round's generator (checkpoint choice),
    # drawn before partitioning so every hospital holds some; a slice set with its own
    # validation split (`fedsynth prepare --validation`) keeps it.
    slices = with_validation(slices, cfg.simulation.validation, seed=cfg.train.seed)
    parts = partition(slices, cfg.simulation.partition, cfg.simulation.hospitals, seed=cfg.train.seed)
    overrides = {
        "data.image-size": slices.image_size,
        "data.class-names": classes,
        "output.run-dir": str(run.root),
        "output.resume": False,
        "simulation.hospitals-dir": str(run.hospitals_dir),
    }
    if cfg.model.on_masks and not cfg.data.mask_labels:
        assert slices.masks is not None
        overrides["data.mask-labels"] = ",".join(str(v) for v in np.unique(slices.masks) if v != 0)
    if cfg.model.on_domains:
        overrides.update(_domain_settings(cfg, slices, data_path, run))
    if cfg.train.threads == 0:
        overrides["train.threads"] = cfg.simulation.client_cpus
    cfg = cfg.with_overrides(overrides)
    for name, settings in (hospital_settings or {}).items():
        if name not in parts:
            raise ConfigError(f"--hospital-set {name}: no such hospital (hospitals: {', '.join(parts)})")
        if any(not key.startswith("dp.") for key in settings):
            raise ConfigError(f"--hospital-set {name}: a hospital may only set dp.* keys")
        cfg.with_overrides(settings)  # validate now, not in the middle of a round
    run.root.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in parts.items():
        part.save(run.hospitals_dir / name / "slices.npz")
        if hospital_settings and name in hospital_settings:
            (run.hospitals_dir / name / "hospital.yaml").write_text(yaml.safe_dump(hospital_settings[name]))
        counts[name] = {
            "train": int((part.split == TRAIN).sum()),
            "validation": int((part.split == VALIDATION).sum()),
            "holdout": int((part.split == HOLDOUT).sum()),
            "train_per_class": part.only(TRAIN).class_counts(),
        }
    run.write_json(run.hospitals_dir / HOSPITALS_MANIFEST, {
        "hospitals": list(parts), "partition": cfg.simulation.partition, "source": str(Path(data_path).resolve()),
        "counts": counts, "settings": hospital_settings or {},
    })
    run.config_path.write_text(cfg.to_yaml())
    run.write_json(run.manifest_path, collect_manifest(
        seeds={"train": cfg.train.seed, "partition": cfg.train.seed},
        data={"path": str(Path(data_path).resolve()), "sha256": file_sha256(data_path),
              "images": len(slices), "privacy_unit": slices.privacy_unit},
        hospitals=counts,
    ))
    write_real_grid(slices.only(TRAIN), run.root / "samples" / "real.png", per_class=cfg.output.grid_per_class,
                    seed=cfg.train.seed, paired=cfg.model.on_masks)
    return cfg


def _domain_settings(cfg: RunConfig, slices: SliceSet, data_path: str | Path, run: RunDir) -> dict[str, object]:
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
            raise ConfigError(f"model.name=cyclegan: set data.domain-a and data.domain-b to two values of "
                              f"{data_path}'s {data.domain_field} field ({values})")
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
            raise ConfigError(f"data.domain-{d} {name!r}: no training slice of {data_path} has that "
                              f"{data.domain_field} (found: {found})")
    if not cfg.output.preview:
        rng = np.random.default_rng(cfg.train.seed)
        pick = []
        for d in ("a", "b"):
            index = train[domains[train] == d]
            pick += sorted(rng.choice(index, size=min(cfg.output.grid_per_class, len(index)), replace=False))
        path = run.root / "samples" / "preview.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        slices.subset(np.array(pick, dtype=int)).save(path)
        out["output.preview"] = str(path)
    return out


def write_real_grid(slices: SliceSet, path: Path, *, per_class: int, seed: int, paired: bool = False) -> Path:
    """A grid of randomly drawn (not chosen) real training slices, one row per class, laid
    out like the generated grids for side-by-side viewing; for pix2pix (``paired``),
    rows of masks alternating with their slices."""
    rng = np.random.default_rng(seed)
    if paired and slices.masks is not None:
        pick = np.sort(rng.choice(len(slices), size=min(4 * per_class, len(slices)), replace=False))
        return paired_grid(slices.masks[pick], slices.images[pick], path, columns=per_class,
                           title="real training slices and masks (random)", scale=max(1, 128 // slices.image_size))
    rows = []
    size = slices.image_size
    for label in range(len(slices.class_names)):
        idx = np.flatnonzero(slices.labels == label)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        row = [slices.images[i] for i in pick]
        row += [np.zeros((size, size), dtype=np.uint8)] * (per_class - len(row))
        rows.extend(row)
    return save_grid(np.stack(rows).astype(np.uint8), path, columns=per_class, row_names=list(slices.class_names),
                     title="real training slices (random)", scale=max(1, 128 // size))


def resume_config(run: RunDir, overrides: dict[str, object]) -> RunConfig:
    """The saved config of ``run`` with ``output.resume`` on and the few overrides that
    may change on resume (more rounds, a longer timeout).

    Raises
    ------
    RunDirError
        Nothing to resume.
    ConfigError
        An override of a key that must not change mid-run.
    """
    cfg = run.load_config()
    allowed = {"federation.rounds", "federation.round-timeout"}
    frozen = sorted(k for k, v in overrides.items() if k not in allowed and _differs(cfg, k, v))
    if frozen:
        raise ConfigError(f"cannot change {', '.join(frozen)} when resuming (only {', '.join(sorted(allowed))})")
    if run.last_round() is None:
        raise RunDirError(f"{run.root}: no checkpoint to resume from")
    cfg = cfg.with_overrides({**{k: v for k, v in overrides.items() if k in allowed}, "output.resume": True})
    run.config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg


def _differs(cfg: RunConfig, key: str, value: object) -> bool:
    return cfg.to_run_config().get(key) != value


def hospital_summary(run: RunDir) -> dict[str, dict[str, object]]:
    path = run.hospitals_dir / HOSPITALS_MANIFEST
    return json.loads(path.read_text())["counts"] if path.is_file() else {}
