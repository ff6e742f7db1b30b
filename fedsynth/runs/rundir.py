"""The run directory: where a federated run keeps its config, checkpoints, grids and metrics.

Layout::

    RUN/config.yaml                  the resolved configuration
    RUN/manifest.json                versions, seeds, git revision, data hashes
    RUN/status.json                  running / finished / failed (with the error)
    RUN/rounds.jsonl                 one JSON line per finished round, per-hospital metrics
    RUN/checkpoints/round-NNNN.safetensors   global generator after round NNNN (0 = initial),
                                     and its running average over rounds (sampled from)
    RUN/samples/round-NNNN.png       fixed-noise sample grid (of the average), one row per class
    RUN/curves.png                   losses per hospital over rounds
    RUN/tensorboard/                 TensorBoard event files (see fedsynth.runs.tracking)
    RUN/tracking.json                the MLflow run this run logs to (with output.mlflow)
    RUN/messages.jsonl               what every hospital's reply carried (names, shapes, types; no values)
    RUN/nodes.json                   (deployment) registered hospital names by SuperNode id
    RUN/hospitals/hospitals.json     (simulation only) the hospitals in partition order, their counts
    RUN/hospitals/NAME/slices.npz    (simulation only) the hospital's slice set
    RUN/hospitals/NAME/hospital.yaml (simulation only) the hospital's own dp.* settings, if any
    RUN/hospitals/NAME/state/        (simulation only) its local state (see HospitalState)
    RUN/logs/                        Flower and SuperLink logs
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from fedsynth.core.checkpoint import load_checkpoint
from fedsynth.core.errors import ConfigError
from fedsynth.core.files import to_json, write_json_atomic, write_text_atomic
from fedsynth.core.weights import split_model
from fedsynth.runs.config import RunConfig

__all__ = ["HOSPITALS_MANIFEST", "HospitalState", "Hospitals", "RunDir", "RunDirError", "collect_manifest"]

HOSPITALS_MANIFEST = "hospitals.json"  # in RUN/hospitals/: hospital names in partition order

_CHECKPOINT_RE = re.compile(r"^round-(\d{4,})\.safetensors$")


class RunDirError(ValueError):
    """A run directory that is missing or incomplete for what was asked."""


class HospitalState:
    """A hospital's private training state folder, kept at the hospital and never sent::

    STATE/discriminator.safetensors  its discriminator after its last round
    STATE/optimizers.pt              both optimizers' moments
    STATE/local.json                 the round they were saved after
    STATE/privacy.json               its privacy ledger (unless the deployment keeps it with the data)
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def discriminator_path(self) -> Path:
        return self.folder / "discriminator.safetensors"

    @property
    def optimizers_path(self) -> Path:
        return self.folder / "optimizers.pt"

    @property
    def info_path(self) -> Path:
        return self.folder / "local.json"

    @property
    def ledger_path(self) -> Path:
        return self.folder / "privacy.json"


class Hospitals:
    """A simulation's hospitals folder (``RUN/hospitals``): each hospital's slice set, own
    settings and local state, and the manifest naming them in partition order."""

    SETTINGS = "hospital.yaml"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @property
    def manifest_path(self) -> Path:
        return self.folder / HOSPITALS_MANIFEST

    def manifest(self) -> dict[str, Any]:
        """The manifest (empty when there is none)."""
        return json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {}

    def names(self) -> list[str]:
        """The hospitals in partition order.

        Raises
        ------
        RunDirError
            No manifest here.
        """
        if not self.manifest_path.is_file():
            raise RunDirError(f"no simulated hospitals' slices here ({self.manifest_path} missing)")
        return list(self.manifest()["hospitals"])

    def slices(self, name: str) -> Path:
        return self.folder / name / "slices.npz"

    def settings_path(self, name: str) -> Path:
        return self.folder / name / self.SETTINGS

    def settings(self, name: str) -> dict[str, Any]:
        """A hospital's own ``dp.*`` settings (empty when it has none)."""
        path = self.settings_path(name)
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def write_settings(self, name: str, settings: dict[str, Any]) -> None:
        write_text_atomic(self.settings_path(name), yaml.safe_dump(settings))

    def state(self, name: str) -> HospitalState:
        return HospitalState(self.folder / name / "state")


class RunDir:
    """Paths and small file operations of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    # --- paths -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    @property
    def rounds_path(self) -> Path:
        return self.root / "rounds.jsonl"

    @property
    def curves_path(self) -> Path:
        return self.root / "curves.png"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard event files (``fedsynth.runs.tracking``)."""
        return self.root / "tensorboard"

    @property
    def tracking_path(self) -> Path:
        """The MLflow run this run logs to (with ``output.mlflow``)."""
        return self.root / "tracking.json"

    @property
    def hospitals_dir(self) -> Path:
        return self.root / "hospitals"

    @property
    def hospitals(self) -> Hospitals:
        """The simulated hospitals' folder."""
        return Hospitals(self.hospitals_dir)

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def real_grid_path(self) -> Path:
        """A grid of randomly drawn real training slices (simulation), to compare with the rounds'."""
        return self.samples_dir / "real.png"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def checkpoint(self, round_: int) -> Path:
        return self.root / "checkpoints" / f"round-{round_:04d}.safetensors"

    def grid(self, round_: int) -> Path:
        return self.samples_dir / f"round-{round_:04d}.png"

    def read_checkpoint(self, round_: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """A round's checkpoint as (generator state, discriminator state; may be empty).

        Raises
        ------
        CheckpointError
            Missing or unreadable.
        """
        tensors, _ = load_checkpoint(self.checkpoint(round_))
        return split_model(tensors)

    # --- state -------------------------------------------------------------------------
    def checkpoint_rounds(self) -> list[int]:
        folder = self.root / "checkpoints"
        if not folder.is_dir():
            return []
        rounds = [int(m.group(1)) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
        return sorted(rounds)

    def last_round(self) -> int | None:
        """The last round with a checkpoint (0 = initial weights), or None."""
        rounds = self.checkpoint_rounds()
        return rounds[-1] if rounds else None

    def best_round(self) -> int | None:
        """The round whose global generator scored the lowest validation Fréchet distance
        (``validation.fd`` in ``rounds.jsonl``) among rounds with a checkpoint, or None.
        Only rounds scored by the same hospitals compete (those scored by the set of
        hospitals that scored most often): a round in which a badly scoring hospital
        failed to answer would otherwise look better than it is."""
        have = set(self.checkpoint_rounds())
        scored = [
            (r["validation"]["fd"], r["round"], frozenset(r["validation"].get("hospitals", {})))
            for r in self.read_rounds()
            if r.get("round") in have and isinstance(r.get("validation"), dict) and "fd" in r["validation"]
        ]
        if not scored:
            return None
        sets = [who for _, _, who in scored]
        usual = max(set(sets), key=lambda who: (sets.count(who), len(who)))
        return min((fd, round_) for fd, round_, who in scored if who == usual)[1]

    def resolve_round(self, round_: int | str | None) -> int:
        """A round number, ``"last"`` (or None: the last checkpointed round) or ``"best"``
        (the best validation score).

        Raises
        ------
        RunDirError
            No checkpoint, not for that round, or no validation scores for ``best``.
        """
        rounds = self.checkpoint_rounds()
        if not rounds:
            raise RunDirError(f"{self.root}: no checkpoints (is this a fedsynth run directory?)")
        if round_ is None or round_ == "last":
            return rounds[-1]
        if round_ == "best":
            best = self.best_round()
            if best is None:
                raise RunDirError(
                    f"{self.root}: no round has a validation score (the hospitals hold no validation slices: "
                    "prepare with --validation, or simulate with simulation.validation > 0; cyclegan: only "
                    "a hospital with validation slices of both domains scores)"
                )
            return best
        if isinstance(round_, str):
            if not round_.isdigit():
                raise RunDirError(f"round {round_!r}: a round number, 'last' or 'best'")
            round_ = int(round_)
        if round_ not in rounds:
            raise RunDirError(
                f"{self.root}: no checkpoint for round {round_} (have {rounds[0]}..{rounds[-1]})"
            )
        return round_

    @property
    def privacy_path(self) -> Path:
        """The privacy ledger: one line per hospital per round (append-only)."""
        return self.root / "privacy.jsonl"

    @property
    def client_privacy_path(self) -> Path:
        """Client-level DP ledger: one line per released round (append-only)."""
        return self.root / "client_privacy.jsonl"

    def append_client_privacy(self, record: dict[str, Any]) -> None:
        _append_line(self.client_privacy_path, record)

    def read_client_privacy(self) -> list[dict[str, Any]]:
        return _read_lines(self.client_privacy_path)

    @property
    def messages_path(self) -> Path:
        """Every reply the server received: record names, array shapes and dtypes, metric
        types (append-only, like the privacy ledger: a reply received in a round that
        was later lost to a crash was still received)."""
        return self.root / "messages.jsonl"

    def append_message(self, record: dict[str, Any]) -> None:
        _append_line(self.messages_path, record)

    def read_messages(self) -> list[dict[str, Any]]:
        return _read_lines(self.messages_path)

    @property
    def nodes_path(self) -> Path:
        """Deployment: the hospital names registered for SuperNode ids."""
        return self.root / "nodes.json"

    def node_names(self) -> dict[int, str]:
        if not self.nodes_path.is_file():
            return {}
        return {int(k): str(v) for k, v in json.loads(self.nodes_path.read_text()).items()}

    def append_round(self, record: dict[str, Any]) -> None:
        """Append one round's record as a JSON line, flushed to disk."""
        _append_line(self.rounds_path, record)

    def append_privacy(self, record: dict[str, Any]) -> None:
        """Append one ledger line; the ledger is never rewritten, not even on resume."""
        _append_line(self.privacy_path, record)

    def read_privacy(self) -> list[dict[str, Any]]:
        return _read_lines(self.privacy_path)

    def read_rounds(self) -> list[dict[str, Any]]:
        """All complete round records (a torn last line from a crash is ignored)."""
        return _read_lines(self.rounds_path)

    def truncate_rounds_after(self, round_: int) -> None:
        """Drop records of rounds after ``round_`` (before resuming from it)."""
        kept = [r for r in self.read_rounds() if r.get("round", 0) <= round_]
        write_text_atomic(self.rounds_path, "".join(_json_line(r) for r in kept))

    def set_status(self, state: str, **fields: Any) -> None:
        write_json_atomic(
            self.status_path, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        )

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        write_json_atomic(path, payload)

    def save_config(self, cfg: RunConfig) -> None:
        """Write the resolved config (``config.yaml``), atomically."""
        write_text_atomic(self.config_path, cfg.to_yaml())

    def resume_config(self, overrides: dict[str, object]) -> RunConfig:
        """The saved config with ``output.resume`` on and the few overrides that may change
        on resume (more rounds, a longer timeout, another Ray cluster), saved again.

        Raises
        ------
        RunDirError
            Nothing to resume.
        ConfigError
            An override of a key that must not change mid-run.
        """
        cfg = self.load_config()
        # more rounds, a longer timeout, or another place to run (what is trained is unchanged)
        allowed = {"federation.rounds", "federation.round-timeout", "simulation.ray-address"}
        current = cfg.to_run_config()
        frozen = sorted(k for k, v in overrides.items() if k not in allowed and current.get(k) != v)
        if frozen:
            raise ConfigError(
                f"cannot change {', '.join(frozen)} when resuming (only {', '.join(sorted(allowed))})"
            )
        if self.last_round() is None:
            raise RunDirError(f"{self.root}: no checkpoint to resume from")
        cfg = cfg.with_overrides(
            {**{k: v for k, v in overrides.items() if k in allowed}, "output.resume": True}
        )
        self.save_config(cfg)
        return cfg

    def load_config(self) -> RunConfig:
        """The resolved config the run was started with.

        Raises
        ------
        RunDirError
            No config.yaml here.
        """
        if not self.config_path.is_file():
            raise RunDirError(f"{self.root}: no config.yaml (is this a fedsynth run directory?)")
        cfg = RunConfig.from_yaml(self.config_path)
        # Keys added since a run was started take the value that run trained with, not
        # today's default (its checkpoints and discriminators have that shape).
        saved = yaml.safe_load(self.config_path.read_text()) or {}
        if "d-readout" not in (saved.get("model") or {}):
            cfg = cfg.with_overrides({"model.d-readout": "mean"})
        return cfg


def _append_line(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(_json_line(record))
        handle.flush()
        os.fsync(handle.fileno())


def _json_line(record: dict[str, Any]) -> str:
    """One line of an append-only ledger: strict JSON (``to_json``: NaN is null), sorted keys."""
    return json.dumps(to_json(record), sort_keys=True, allow_nan=False) + "\n"


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _git_revision() -> str | None:
    package_dir = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(package_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(package_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def collect_manifest(**extra: Any) -> dict[str, Any]:
    """Versions, platform and git revision, plus whatever the caller adds (seeds, hashes)."""
    versions: dict[str, str | None] = {}
    for package in ("fedsynth", "flwr", "torch", "opacus", "numpy", "nibabel", "pydicom", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": {"cpus": os.cpu_count()},
        "git_revision": _git_revision(),
        "command": sys.argv,
        **extra,
    }
