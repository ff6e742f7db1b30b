"""`fedsynth simulate`: N simulated hospitals federate through Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fedsynth.commands.common import CommandError, console, setup_logging, user_errors
from fedsynth.commands.progress import run_with_progress
from fedsynth.data.sliceset import SliceSet
from fedsynth.engine.simulation import hospital_summary, prepare_simulation
from fedsynth.models import build_gan
from fedsynth.privacy import PrivacyError
from fedsynth.runs.config import RunConfig, parse_overrides
from fedsynth.runs.rundir import RunDir

__all__ = ["print_hospitals", "simulate"]


@user_errors
def simulate(
    data: Path = typer.Option(
        None, "--data", "-d", help="Slice set (.npz) from `fedsynth prepare` to split into hospitals."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run directory to create (or to continue, with --resume)."
    ),
    hospitals: int = typer.Option(None, help="Number of simulated hospitals [default: 3]."),
    partition: str = typer.Option(
        None,
        help="How to split the data: iid, dirichlet:ALPHA (non-IID by class; 0.5 is strongly skewed; "
        "dirichlet:0.5,min=20 gives every hospital at least 20 training slices) or by-site (the slice set's "
        "site column) [default: iid].",
    ),
    rounds: int = typer.Option(None, help="Federated rounds [default: 5]."),
    local_steps: int = typer.Option(None, help="GAN steps per hospital per round [default: 50]."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file (see `fedsynth config`)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override any config key, e.g. --set model.width=64 (repeatable)."
    ),
    hospital_set: list[str] = typer.Option(
        [],
        "--hospital-set",
        help="One hospital's own privacy setting, HOSPITAL:dp.KEY=VALUE, e.g. hospital-b:dp.target-epsilon=1 "
        "(repeatable).",
    ),
    ray_address: str = typer.Option(
        None,
        "--ray-address",
        help="Run the hospitals on a running Ray cluster, HOST:PORT (as `ray start --head` prints); every "
        "node needs fedsynth and the run directory at the same path [default: Ray on this machine].",
    ),
    resume: bool = typer.Option(
        False, help="Continue the run in --out from its last checkpoint (add --rounds to extend it)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log fedsynth's progress messages."),
) -> None:
    """Federate a GAN across simulated hospitals on this machine.

    Each hospital gets its own slice set (a partition of --data) and trains locally;
    the server averages generator weights each round and writes, in --out, a checkpoint
    and a sample grid per round, rounds.jsonl (metrics per hospital) and curves.png.
    """
    setup_logging(verbose)
    run = RunDir(out)
    overrides = parse_overrides(set_)
    for key, value in (
        ("simulation.hospitals", hospitals),
        ("simulation.partition", partition),
        ("federation.rounds", rounds),
        ("train.local-steps", local_steps),
        ("simulation.ray-address", ray_address),
    ):
        if value is not None:
            overrides[key] = value
    if resume:
        if data is not None or config is not None or hospital_set:
            raise CommandError(
                "--resume continues with the run's saved data and config: drop --data/--config/--hospital-set"
            )
        cfg = run.resume_config(overrides)
        console.print(f"resuming {run.root} after round {run.last_round()} of {cfg.federation.rounds}")
    else:
        if data is None:
            raise CommandError("--data is required (a slice set from `fedsynth prepare`)")
        cfg = RunConfig.from_yaml(config, overrides) if config else RunConfig.from_overrides(overrides)
        settings = parse_hospital_settings(hospital_set)
        if cfg.dp.enabled or any(k.startswith("dp.") for s in settings.values() for k in s):
            refuse_unsupported_dp(cfg)
        cfg = prepare_simulation(cfg, data, run, hospital_settings=settings)
        print_hospitals(run)
        folder = run.hospitals
        for line in cfg.model.family.simulation_notes(
            cfg, {name: SliceSet.load(folder.slices(name)) for name in hospital_summary(run)}
        ):
            console.print(line)
    outcome_ok = run_with_progress(cfg, run)
    if not outcome_ok:
        raise typer.Exit(1)


def refuse_unsupported_dp(cfg: RunConfig) -> None:
    """Stop before anything starts when DP-SGD cannot train this model's discriminator
    (the hospitals would refuse it at their first round anyway)."""
    _, disc = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=2)
    try:
        cfg.model.family.check_dp(disc, cfg.train)
    except PrivacyError as err:
        raise CommandError(f"DP with model.name={cfg.model.name}: {err}") from None


def parse_hospital_settings(items: list[str]) -> dict[str, dict[str, object]]:
    """``hospital-b:dp.target-epsilon=1`` items to {hospital: {key: value}}.

    Raises
    ------
    CommandError
        An item not of the form HOSPITAL:dp.KEY=VALUE.
    """
    settings: dict[str, dict[str, object]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not rest.startswith("dp.") or "=" not in rest:
            raise CommandError(
                f"--hospital-set {item!r}: expected HOSPITAL:dp.KEY=VALUE, e.g. "
                "hospital-b:dp.target-epsilon=1"
            )
        settings.setdefault(name.strip(), {}).update(parse_overrides([rest]))
    return settings


def print_hospitals(run: RunDir) -> None:
    table = Table(title="simulated hospitals", title_justify="left")
    for column in ("hospital", "train slices", "validation slices", "holdout slices", "train per class"):
        table.add_column(column)
    for name, counts in hospital_summary(run).items():
        per_class = ", ".join(f"{k} {v}" for k, v in counts["train_per_class"].items())
        table.add_row(
            name, str(counts["train"]), str(counts.get("validation", 0)), str(counts["holdout"]), per_class
        )
    console.print(table)
