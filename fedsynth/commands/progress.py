"""What the long commands show while a federated run goes on: a progress bar, one line per
round, and where the results are when it ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedsynth.commands.common import CommandError, console
from fedsynth.core.device import CpuWatch, available_cores
from fedsynth.engine.launcher import EngineError, RunOutcome, run_simulation_engine
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir
from fedsynth.runs.tracking import end_interrupted

__all__ = ["run_with_progress"]

# Other processes using this many cores' worth of CPU, over two samples in a row of at
# least SAMPLE_SECONDS each, make the machine oversubscribed.
FOREIGN_CORES = 0.5
SAMPLE_SECONDS = 5.0


class _Busy:
    """Whether other processes share the cores (:class:`CpuWatch`), in words for the
    progress line: torch in two processes on the same cores runs many times slower."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.streak = 0
        self.warning = ""
        self.said = False

    def check(self, watch: CpuWatch) -> str:
        if time.monotonic() - self.last < SAMPLE_SECONDS:
            return self.warning
        self.last = time.monotonic()
        foreign = watch.foreign_cores()
        self.streak = self.streak + 1 if foreign >= FOREIGN_CORES else 0
        cores = available_cores()
        self.warning = (
            f"machine oversubscribed: other processes use {foreign:.1f} of its {cores} cores; "
            "training runs several times slower until they finish"
            if self.streak >= 2
            else ""
        )
        return self.warning


def _round_line(record: dict[str, Any], total: int, privacy: list[dict[str, Any]] | None = None) -> str:
    spent = {p["hospital"]: p for p in privacy or []}

    def eps(name: str) -> str:
        row = spent.get(name)
        if not row or row.get("epsilon_rdp") is None:
            return ""
        target = f"/{row['target_epsilon']:g}" if row.get("target_epsilon") else ""
        return f" ε={row['epsilon_rdp']:.2f}{target}"

    parts = []
    for name, m in sorted(record.get("hospitals", {}).items()):
        if "g-loss" not in m:  # a released summary (dp-merf), not a training round
            parts.append(f"{name} released a summary of {m.get('num-examples', 0):.0f} slices{eps(name)}")
            continue
        d = f"d={m['d-loss']:.2f} " if "d-loss" in m else ""  # withheld under DP
        parts.append(
            f"{name} {d}g={m.get('g-loss', float('nan')):.2f} {m.get('images-per-second', 0):.0f} "
            f"img/s{eps(name)}"
        )
    for failure in record.get("failures", []):
        who = failure.get("hospital") or f"node {failure['node']}"
        parts.append(f"[red]{who} failed: {failure['reason']}[/]")
    for rejected in record.get("rejected", []):
        parts.append(f"[red]{rejected['hospital']} rejected: {rejected['reason']}[/]")
    for declined in record.get("declined", []):
        parts.append(
            f"[yellow]{declined['hospital']}{eps(declined['hospital'])} declined: {declined['reason']}[/]"
        )
    fit = record.get("fit")
    if fit:
        parts.append(f"generator fitted to their sum: {fit['fit-steps']} steps in {fit['fit-seconds']:.0f} s")
    validation = record.get("validation") or {}
    if "fd" in validation:
        parts.append(f"validation FD {validation['fd']:.1f}")
    for failure in validation.get("failures", []):
        parts.append(f"[yellow]{failure['hospital']} could not score validation: {failure['reason']}[/]")
    line = f"round {record['round']}/{total} ({record.get('seconds', 0):.1f} s): " + " | ".join(parts)
    if spent:
        first = next(iter(spent.values()))
        line += (
            f"  [dim](ε per {first.get('privacy_unit') or 'slice'}, RDP accountant, "
            f"δ={first.get('delta'):.0e})[/]"
        )
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
    watch, busy = CpuWatch(), _Busy()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
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
                        line += (
                            f"  [dim]client-level DP: ε={c['epsilon_rdp']:.2f} per hospital "
                            f"(δ={c['delta']:.0e}), {c['clipped']} of {c['hospitals']} updates clipped[/]"
                        )
                    progress.console.print(line, highlight=False)
            done = len(seen)
            status = run.status()
            label = "training" if status.get("state") == "running" else starting
            description = f"{label}: round {min(done + 1, total)}/{total}"
            if status.get("state") == "running" and status.get("fitting"):  # dp-merf's server-side fit
                step, steps = status["fitting"]
                description = f"fitting the generator to the releases: step {step}/{steps}"
            warning = busy.check(watch)
            if warning and not busy.said:
                progress.console.print(f"[yellow]{warning}[/]", highlight=False)
                busy.said = True
            if warning:
                description += f" [yellow]({warning.split(':')[0]})[/]"
            progress.update(task, completed=done, description=description)

        try:
            outcome = engine(on_poll=poll)
        except EngineError as err:
            raise CommandError(str(err)) from None
        except KeyboardInterrupt:
            # The engine has stopped every process of the run by now; nothing else writes the status.
            run.set_status("interrupted", rounds=run.last_round() or 0, resume=resume)
            end_interrupted(run)
            console.print(
                f"[yellow]interrupted[/]; finished rounds are kept. Continue with: {resume}", soft_wrap=True
            )
            raise typer.Exit(130) from None
    elapsed = time.monotonic() - start
    if not outcome.ok:
        error = outcome.status.get("error") or f"Flower exited with code {outcome.returncode}"
        console.print(f"[bold red]error:[/] the run did not finish: {escape(str(error))}", highlight=False)
        console.print(f"Flower's log: {outcome.log_path}")
        last = run.last_round()
        if last is not None and last > 0:
            console.print(f"rounds up to {last} are saved; continue with: {resume}", soft_wrap=True)
        return False
    last = run.last_round()
    stopped = outcome.status.get("stopped_early")
    if stopped:
        console.print(f"[yellow]stopped early[/] after round {last}: {stopped}", highlight=False)
    console.print(
        f"[green]finished[/] {last} of {total} rounds in {elapsed:.0f} s. Run directory: {run.root}"
    )
    console.print(f"  checkpoints   {run.root / 'checkpoints'}  (round-0000 = initial weights)")
    real = "; real.png for comparison" if (run.root / "samples" / "real.png").is_file() else ""
    console.print(f"  sample grids  {run.grid(last or 0)}  (one per round{real})")
    console.print(f"  metrics       {run.rounds_path}, {run.curves_path}")
    if run.tensorboard_dir.is_dir():
        console.print(f"  tensorboard   tensorboard --logdir {run.root}")
    if run.tracking_path.is_file():
        console.print(f"  MLflow        {run.tracking_path}  (the MLflow run logged to)")
    best = run.best_round()
    if best is not None:
        console.print(
            f"  best round    {best} by the hospitals' validation score (fedsynth sample --run {run.root} "
            "--round best)"
        )
    if run.privacy_path.is_file():
        console.print(f"  privacy       {run.privacy_path}  (epsilon per hospital per round)")
    if run.client_privacy_path.is_file():
        console.print(f"  client DP     {run.client_privacy_path}  (client-level epsilon per round)")
    if run.messages_path.is_file():
        console.print(
            f"  received      {run.messages_path}  (what each hospital's replies carried: shapes and types)"
        )
    return True
