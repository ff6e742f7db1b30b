"""`fedsynth simulate`: N simulated hospitals federate through Flower's simulation engine."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..client.dp import PrivacyError, check_dp_discriminator
from ..server.launcher import EngineError, RunOutcome, run_simulation_engine
from ..server.simulate import hospital_summary, prepare_simulation, resume_config
from ..shared.config import RunConfig, parse_overrides
from ..shared.models import build_gan
from ..shared.rundir import RunDir
from .common import CommandError, console, setup_logging, user_errors

__all__ = ["run_with_progress", "simulate"]


@user_errors
def simulate(
    data: Path = typer.Option(None, "--data", "-d", help="Slice set (.npz) from `fedsynth prepare` to split into hospitals."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to create (or to continue, with --resume)."),
    hospitals: int = typer.Option(None, help="Number of simulated hospitals [default: 3]."),
    partition: str = typer.Option(None, help="How to split the data: iid, dirichlet:ALPHA (non-IID by class; 0.5 is strongly skewed) or by-site (the slice set's site column) [default: iid]."),
    rounds: int = typer.Option(None, help="Federated rounds [default: 5]."),
    local_steps: int = typer.Option(None, help="GAN steps per hospital per round [default: 50]."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file (see `fedsynth config`)."),
    set_: list[str] = typer.Option([], "--set", help="Override any config key, e.g. --set model.width=64 (repeatable)."),
    hospital_set: list[str] = typer.Option([], "--hospital-set", help="One hospital's own privacy setting, HOSPITAL:dp.KEY=VALUE, e.g. hospital-b:dp.target-epsilon=1 (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint (add --rounds to extend it)."),
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
    for key, value in (("simulation.hospitals", hospitals), ("simulation.partition", partition),
                       ("federation.rounds", rounds), ("train.local-steps", local_steps)):
        if value is not None:
            overrides[key] = value
    if resume:
        if data is not None or config is not None or hospital_set:
            raise CommandError("--resume continues with the run's saved data and config: "
                               "drop --data/--config/--hospital-set")
        cfg = resume_config(run, overrides)
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
        if cfg.model.on_domains:
            print_domains(cfg, run)
    outcome_ok = run_with_progress(cfg, run)
    if not outcome_ok:
        raise typer.Exit(1)


def refuse_unsupported_dp(cfg: RunConfig) -> None:
    """Stop before anything starts when DP-SGD cannot train this model's discriminator
    (the hospitals would refuse it at their first round anyway)."""
    _, disc = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=2)
    try:
        check_dp_discriminator(disc, cfg.train)
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
            raise CommandError(f"--hospital-set {item!r}: expected HOSPITAL:dp.KEY=VALUE, "
                               "e.g. hospital-b:dp.target-epsilon=1")
        settings.setdefault(name.strip(), {}).update(parse_overrides([rest]))
    return settings


def print_hospitals(run: RunDir) -> None:
    table = Table(title="simulated hospitals", title_justify="left")
    for column in ("hospital", "train slices", "validation slices", "holdout slices", "train per class"):
        table.add_column(column)
    for name, counts in hospital_summary(run).items():
        per_class = ", ".join(f"{k} {v}" for k, v in counts["train_per_class"].items())
        table.add_row(name, str(counts["train"]), str(counts.get("validation", 0)), str(counts["holdout"]), per_class)
    console.print(table)


def print_domains(cfg: RunConfig, run: RunDir) -> None:
    """cyclegan: which value is domain A and which B (what --direction a2b means), each
    hospital's training slices of each, and a warning when no hospital holds both."""
    from ..shared.domains import domains_of
    from ..shared.sliceset import TRAIN, SliceSet

    data = cfg.data
    console.print(f"cyclegan domains ({data.domain_field}): A = {data.domain_a}, B = {data.domain_b} "
                  f"(a2b translates {data.domain_a} to {data.domain_b})")
    held = []
    for name in hospital_summary(run):
        train = SliceSet.load(run.hospitals_dir / name / "slices.npz").only(TRAIN)
        domains = domains_of(train, data, path=name)
        counts = {d: int((domains == d).sum()) for d in ("a", "b")}
        held.append(all(counts.values()))
        console.print(f"  {name}: {counts['a']} A, {counts['b']} B training slices")
    if not any(held) and not cfg.federation.aggregate_discriminator:
        console.print("[yellow]no hospital holds both domains, and the discriminators stay local: nothing will judge "
                      "A -> B translations of real A against real B, and translations can look right yet be wrong "
                      "(see BENCHMARKS.md, CycleGAN on toy domains); --set federation.aggregate-discriminator=true "
                      "shares each domain's PatchGAN, at a privacy price[/]")


def _round_line(record: dict, total: int, privacy: list[dict] | None = None) -> str:
    spent = {p["hospital"]: p for p in privacy or []}

    def eps(name: str) -> str:
        row = spent.get(name)
        if not row or row.get("epsilon_rdp") is None:
            return ""
        target = f"/{row['target_epsilon']:g}" if row.get("target_epsilon") else ""
        return f" ε={row['epsilon_rdp']:.2f}{target}"

    parts = []
    for name, m in sorted(record.get("hospitals", {}).items()):
        d = f"d={m['d-loss']:.2f} " if "d-loss" in m else ""  # withheld under DP
        parts.append(f"{name} {d}g={m.get('g-loss', float('nan')):.2f} "
                     f"{m.get('images-per-second', 0):.0f} img/s{eps(name)}")
    for failure in record.get("failures", []):
        who = failure.get("hospital") or f"node {failure['node']}"
        parts.append(f"[red]{who} failed: {failure['reason']}[/]")
    for rejected in record.get("rejected", []):
        parts.append(f"[red]{rejected['hospital']} rejected: {rejected['reason']}[/]")
    for declined in record.get("declined", []):
        parts.append(f"[yellow]{declined['hospital']}{eps(declined['hospital'])} declined: {declined['reason']}[/]")
    validation = record.get("validation") or {}
    if "fd" in validation:
        parts.append(f"validation FD {validation['fd']:.1f}")
    for failure in validation.get("failures", []):
        parts.append(f"[yellow]{failure['hospital']} could not score validation: {failure['reason']}[/]")
    line = f"round {record['round']}/{total} ({record.get('seconds', 0):.1f} s): " + " | ".join(parts)
    if spent:
        first = next(iter(spent.values()))
        line += f"  [dim](ε per {first.get('privacy_unit') or 'slice'}, RDP accountant, δ={first.get('delta'):.0e})[/]"
    return line


def run_with_progress(
    cfg: RunConfig,
    run: RunDir,
    engine: Callable[..., RunOutcome] | None = None,
    *,
    starting: str = "starting Flower's simulation engine",
    resume: str | None = None,
) -> bool:
    """Run with a progress bar and a line per finished round; print where the results
    are. Returns whether the run finished.

    ``engine(on_poll=...)`` runs it (the simulation engine by default); ``resume`` is the
    command that continues the run, shown when it stops half-way."""
    engine = engine or (lambda on_poll: run_simulation_engine(cfg, run, on_poll=on_poll))
    resume = resume or f"fedsynth simulate --out {run.root} --resume"
    total = cfg.federation.rounds
    seen = {r["round"] for r in run.read_rounds()}
    start = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task(starting, total=total, completed=len(seen))

        def poll() -> None:
            for record in run.read_rounds():
                if record["round"] not in seen:
                    seen.add(record["round"])
                    spent = [p for p in run.read_privacy() if p["round"] == record["round"]]
                    line = _round_line(record, total, spent)
                    client = [c for c in run.read_client_privacy() if c["round"] == record["round"]]
                    if client:
                        c = client[-1]
                        line += (f"  [dim]client-level DP: ε={c['epsilon_rdp']:.2f} per hospital (δ={c['delta']:.0e}), "
                                 f"{c['clipped']} of {c['hospitals']} updates clipped[/]")
                    progress.console.print(line, highlight=False)
            done = len(seen)
            label = "training" if run.status().get("state") == "running" else starting
            progress.update(task, completed=done, description=f"{label}: round {min(done + 1, total)}/{total}")

        try:
            outcome = engine(on_poll=poll)
        except EngineError as err:
            raise CommandError(str(err)) from None
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]; finished rounds are kept. Continue with: {resume}")
            raise typer.Exit(130) from None
    elapsed = time.monotonic() - start
    if not outcome.ok:
        error = outcome.status.get("error") or f"Flower exited with code {outcome.returncode}"
        console.print(f"[bold red]error:[/] the run did not finish: {error}", highlight=False)
        console.print(f"Flower's log: {outcome.log_path}")
        last = run.last_round()
        if last is not None and last > 0:
            console.print(f"rounds up to {last} are saved; continue with: {resume}")
        return False
    last = run.last_round()
    stopped = outcome.status.get("stopped_early")
    if stopped:
        console.print(f"[yellow]stopped early[/] after round {last}: {stopped}", highlight=False)
    console.print(f"[green]finished[/] {last} of {total} rounds in {elapsed:.0f} s. Run directory: {run.root}")
    console.print(f"  checkpoints   {run.root / 'checkpoints'}  (round-0000 = initial weights)")
    real = "; real.png for comparison" if (run.root / "samples" / "real.png").is_file() else ""
    console.print(f"  sample grids  {run.grid(last)}  (one per round{real})")
    console.print(f"  metrics       {run.rounds_path}, {run.curves_path}")
    best = run.best_round()
    if best is not None:
        console.print(f"  best round    {best} by the hospitals' validation score "
                      f"(fedsynth sample --run {run.root} --round best)")
    if run.privacy_path.is_file():
        console.print(f"  privacy       {run.privacy_path}  (epsilon per hospital per round)")
    if run.client_privacy_path.is_file():
        console.print(f"  client DP     {run.client_privacy_path}  (client-level epsilon per round)")
    if run.messages_path.is_file():
        console.print(f"  received      {run.messages_path}  (what each hospital's replies carried: shapes and types)")
    return True
