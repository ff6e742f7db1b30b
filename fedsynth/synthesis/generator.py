"""A run's generator, built and loaded once for whatever draws from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsynth.core.weights import load_weights
from fedsynth.models import Family, build_networks
from fedsynth.models.networks import GeneratorNet
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

__all__ = ["LoadedGenerator", "load_generator"]


@dataclass(frozen=True)
class LoadedGenerator:
    """A run's global generator after one round, with what it came from."""

    gen: GeneratorNet
    family: Family
    cfg: RunConfig
    round: int
    checkpoint: Path


def load_generator(run: RunDir, round_: int | str | None = "last") -> LoadedGenerator:
    """The run's global generator after ``round_`` (a number, ``"last"`` or ``"best"``).

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
    load_weights(gen, run.read_checkpoint(used)[0])
    return LoadedGenerator(gen, cfg.model.family, cfg, used, run.checkpoint(used))
