"""A run's generator, built and loaded once for whatever draws from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from fedsynth.core.checkpoint import CheckpointError, file_sha256, load_checkpoint
from fedsynth.core.errors import ConfigError
from fedsynth.core.weights import load_weights, sampling_state, split_model
from fedsynth.models import Family, build_networks
from fedsynth.models.networks import GeneratorNet
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

__all__ = ["LoadedGenerator", "WarmStart", "find_warm_start", "load_generator", "load_warm_start"]


@dataclass(frozen=True)
class LoadedGenerator:
    """A run's global generator after one round, with what it came from."""

    gen: GeneratorNet
    family: Family
    cfg: RunConfig
    round: int
    checkpoint: Path


def load_generator(run: RunDir, round_: int | str | None = "last") -> LoadedGenerator:
    """The run's global generator after ``round_`` (a number, ``"last"`` or ``"best"``):
    the server's running average of it over rounds where the checkpoint holds one
    (``federation.generator-average``), else the round's generator itself.

    Raises
    ------
    RunDirError
        No config, no checkpoint, or none for that round.
    CheckpointError
        The checkpoint cannot be read.
    """
    cfg = run.load_config()
    used = run.resolve_round(round_)
    gen, _ = build_networks(cfg)
    tensors, _ = load_checkpoint(run.checkpoint(used))
    load_weights(gen, sampling_state(tensors))
    return LoadedGenerator(gen, cfg.model.family, cfg, used, run.checkpoint(used))


@dataclass(frozen=True)
class WarmStart:
    """The checkpoint a run's generator starts from (``train.init-from``): its file, its
    hash, and the hash of the slice set its own run trained on, where that run says."""

    checkpoint: Path
    sha256: str
    data_sha256: str | None

    def record(self) -> dict[str, object]:
        """What the privacy ledger and the report say of it."""
        return {"checkpoint": str(self.checkpoint), "sha256": self.sha256, "declared_public": True}


def find_warm_start(path: str | Path) -> WarmStart:
    """The checkpoint ``train.init-from`` names: a run directory's last round, or a
    checkpoint file (in a run's ``checkpoints/`` folder, its run's data hash is known).

    Raises
    ------
    ConfigError
        No such run directory or checkpoint, or a folder without checkpoints.
    """
    path = Path(path)
    root: Path | None
    if path.is_dir():
        run = RunDir(path)
        last = run.last_round()
        if last is None:
            raise ConfigError(
                f"train.init-from {path}: a folder without checkpoints (give a run directory or a "
                ".safetensors checkpoint)"
            )
        checkpoint, root = run.checkpoint(last), path
    elif path.is_file():
        checkpoint, root = path, (path.parent.parent if path.parent.name == "checkpoints" else None)
    else:
        raise ConfigError(f"train.init-from {path}: no such run directory or checkpoint")
    data_sha256 = None
    manifest = RunDir(root).manifest_path if root is not None else None
    if manifest is not None and manifest.is_file():
        data_sha256 = json.loads(manifest.read_text()).get("data", {}).get("sha256")
    return WarmStart(checkpoint, file_sha256(checkpoint), data_sha256)


def load_warm_start(cfg: RunConfig, gen: GeneratorNet, disc: nn.Module | None = None) -> WarmStart | None:
    """Load ``train.init-from`` into the run's initial generator (and its discriminator,
    where one is given and the checkpoint holds one); None without a warm start.

    Raises
    ------
    ConfigError
        The checkpoint cannot be found or read, or does not fit the run's model.
    """
    if not cfg.train.init_from:
        return None
    warm = find_warm_start(cfg.train.init_from)
    try:
        tensors, _ = load_checkpoint(warm.checkpoint)
        gen_state, disc_state = split_model(tensors)
        load_weights(gen, gen_state)
        if disc is not None and disc_state:
            load_weights(disc, disc_state)
    except (CheckpointError, KeyError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"train.init-from {warm.checkpoint}: does not fit model.name {cfg.model.name} at "
            f"{cfg.data.image_size} px with these keys ({first})"
        ) from None
    return warm
