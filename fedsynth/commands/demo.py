"""`fedsynth demo`: the whole loop on built-in phantom hospitals, about 7 minutes on an idle 2-core CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from fedsynth.audit.pipeline import AuditOptions
from fedsynth.commands.audit import federated_audit
from fedsynth.commands.common import CommandError, console, setup_logging, user_errors
from fedsynth.commands.prepare import card_path_for, print_card
from fedsynth.commands.progress import run_with_progress
from fedsynth.commands.simulate import print_hospitals
from fedsynth.data.phantoms import (
    DEFAULT_HOSPITALS,
    LESION,
    LIVER,
    write_phantom_hospitals,
)
from fedsynth.data.volumes import MaskClasses, ingest_volumes
from fedsynth.engine.simulation import prepare_simulation
from fedsynth.runs.config import RunConfig, parse_overrides
from fedsynth.runs.rundir import RunDir

__all__ = ["DEMO_SETTINGS", "demo"]

# The demo's training settings: small enough for about 7 minutes on an idle 2-core CPU (435 s measured), large
# enough that later rounds' grids clearly look like the phantoms.
DEMO_SETTINGS = {
    "federation.rounds": 6,
    "train.local-steps": 300,
    "train.batch-size": 32,
}
# The demo's audit: lighter than `fedsynth audit`'s defaults (5 seeds, ~15 epochs, 500
# encoder steps) so three local audits take about two minutes; its intervals are wider.
DEMO_AUDIT: dict[str, Any] = {"utility_seeds": 2, "utility_steps": 240, "encoder_steps": 300}


@user_errors
def demo(
    out: Path = typer.Option(
        Path("fedsynth-demo"), "--out", "-o", help="Folder for the phantom data, slice set and run."
    ),
    rounds: int = typer.Option(DEMO_SETTINGS["federation.rounds"], help="Federated rounds."),
    size: int = typer.Option(
        32, help="Slice size in pixels (32 keeps the demo to minutes; 64 takes about 4x longer)."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override any config key, e.g. --set train.local-steps=50."
    ),
    audit: bool = typer.Option(
        True, "--audit/--no-audit", help="End with the federated audit and its reports."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log fedsynth's progress messages."),
) -> None:
    """The whole loop, about 7 minutes on 2 idle cores: phantom hospitals, training, an ethics report.

    Ingestion, federated training and a federated audit ending in an ethics report.

    Generates three phantom hospitals (CT-like NIfTI volumes with liver-lesion masks,
    each with its own scanner character), ingests them like real scans, and federates a
    conditional GAN across them through Flower's simulation engine. Each hospital then
    audits the generator on its own slices (local report) and the consortium report is
    built from their aggregate statistics alone.
    """
    setup_logging(verbose)
    started = time.monotonic()
    if out.exists() and any(out.iterdir()):
        raise CommandError(f"{out} is not empty: choose a new --out (or remove it)")
    phantoms = out / "phantoms"
    console.rule("1. phantom hospitals")
    with console.status("rendering phantom CT volumes"):
        volumes = write_phantom_hospitals(phantoms, seed=0)
    for profile in DEFAULT_HOSPITALS:
        console.print(
            f"  {profile.name}: {profile.patients} patients, noise {profile.noise_hu:g} HU, contrast "
            f"x{profile.contrast:g}, lesion prevalence {profile.lesion_prevalence:.0%}"
        )
    console.print(f"  {len(volumes)} NIfTI volumes with masks in {phantoms}")
    console.rule("2. prepare: volumes to a slice set")
    slices_path = out / "phantoms.npz"
    lesion = MaskClasses("no_lesion", (("lesion", (LESION,)),), min_voxels=max(1, (size // 32) ** 2 * 4))
    slices, card = ingest_volumes(
        phantoms,
        size=size,
        window="ct-abdomen",
        classes=lesion,
        keep_slices_with=[LIVER],
        holdout_fraction=0.2,
        seed=0,
    )
    slices.save(slices_path)
    card.output = str(slices_path)
    print_card(card, card.write(card_path_for(slices_path)))
    console.rule("3. simulate: three hospitals federate through Flower")
    # simulate's default plan trains all three at once on 2 cores (no core idles)
    overrides = {
        **DEMO_SETTINGS,
        "federation.rounds": rounds,
        "simulation.hospitals": len(DEFAULT_HOSPITALS),
        "simulation.partition": "by-site",
        **parse_overrides(set_),
    }
    run = RunDir(out / "run")
    cfg = prepare_simulation(RunConfig.from_overrides(overrides), slices_path, run)
    print_hospitals(run)
    if not run_with_progress(cfg, run):
        raise typer.Exit(1)
    report = None
    if audit:
        console.rule(
            "4. audit: each hospital audits the generator locally; the consortium sees statistics only"
        )
        report = federated_audit(run, out / "audit", AuditOptions(**DEMO_AUDIT))
    console.rule("done")
    console.print(f"demo finished in {time.monotonic() - started:.0f} s. Look at:", soft_wrap=True)
    last = run.last_round() or 0
    if last > 1:
        console.print(f"  {run.grid(1)}  vs  {run.grid(last)}  (first and last round)", soft_wrap=True)
    else:
        console.print(f"  {run.grid(last)}  (the generator after round {last})", soft_wrap=True)
    console.print(
        f"  {run.root / 'samples' / 'real.png'}  (real phantom slices, for comparison)", soft_wrap=True
    )
    console.print(
        f"  {run.curves_path}  (losses per hospital; or tensorboard --logdir {run.root})", soft_wrap=True
    )
    if report is not None:
        console.print(
            f"  {report}  (the consortium's ethics report; each hospital's own report with its galleries is "
            f"in {out / 'audit' / 'hospitals'})",
            soft_wrap=True,
        )
    console.print(
        f"  fedsynth sample --run {run.root} --n 64 --label lesion --out {out / 'samples'}", soft_wrap=True
    )
