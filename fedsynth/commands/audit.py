"""`fedsynth audit`: fidelity, utility, memorization and membership inference of a run's
generator, each judged against the hospitals' fresh real data (their holdout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsynth.audit.federated import SHARE_FILE, combine_shares, load_share
from fedsynth.audit.pipeline import AUDIT_FILE, AuditOptions, run_audit
from fedsynth.audit.report import (
    CONSORTIUM_FILE,
    render_consortium_report,
    render_report,
)
from fedsynth.audit.runs import hospital_names, prepare_audit, real_slices
from fedsynth.commands.common import CommandError, console, setup_logging, user_errors
from fedsynth.core.device import available_cores
from fedsynth.data.sliceset import SliceSet
from fedsynth.metrics.features import FeatureError
from fedsynth.runs.rundir import RunDir
from fedsynth.runs.tracking import attach_files

__all__ = ["audit", "federated_audit"]

_COLOURS = {"green": "green", "amber": "yellow", "red": "red"}
HOSPITALS_DIR, CONSORTIUM_DIR = "hospitals", "consortium"


@user_errors
def audit(
    run_dir: Path = typer.Option(
        None, "--run", "-r", help="Run directory whose global generator to audit (the last round by default)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for audit.json and figures/ (must not hold an audit already)."
    ),
    data: Path = typer.Option(
        None,
        "--data",
        "-d",
        help="Slice set whose train split the generator was trained on and whose holdout is the fresh-data "
        "reference [default: the run's simulated hospitals' slices].",
    ),
    hospital: str = typer.Option(
        None,
        help="Whose data this is: a simulated hospital of --run (its slices, plus the white-box attack with "
        "its discriminator), or, with --data, the name the share and the local report carry.",
    ),
    synthetic: Path = typer.Option(
        None,
        "--synthetic",
        help="Audit these synthetic slices (a slice set, e.g. from `fedsynth sample --format npz`) instead "
        "of drawing from --run.",
    ),
    n_synthetic: int = typer.Option(
        None,
        "--n-synthetic",
        help="Synthetic images to draw from the run [default: twice the training images (at most 20,000), "
        "for the 2x utility condition].",
    ),
    round_: str = typer.Option(
        "last",
        "--round",
        help="Round whose generator to audit: a number, 'last', or 'best' (the lowest validation score).",
    ),
    inception_weights: Path = typer.Option(
        None,
        "--inception-weights",
        help="pytorch-fid Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth) for FID; without them "
        "FID is reported as not computed.",
    ),
    utility: bool = typer.Option(
        True,
        "--utility/--no-utility",
        help="Train diagnostic classifiers with and without synthetic images (the slowest part).",
    ),
    seeds: int = typer.Option(5, help="Classifier seeds per utility condition."),
    utility_steps: int = typer.Option(
        None, help="Optimiser steps per classifier [default: chosen for ~15 epochs of the real set]."
    ),
    utility_model: str = typer.Option(
        "cnn", help="Utility classifier: cnn (small CNN) or resnet18 (torchvision ResNet-18 from scratch)."
    ),
    utility_fraction: float = typer.Option(
        1.0,
        help="Below 1: the utility study plays a small hospital holding this share of the training "
        "patients, and adds an oracle condition (as many unseen real images of the other patients) that "
        "shows how much there was to gain.",
    ),
    encoder_steps: int = typer.Option(500, help="Training steps of the audit's own encoder."),
    classifier_steps: int = typer.Option(
        480,
        min=1,
        help="Training steps of the classifier (on the real train slices) whose features give the "
        "headline fidelity figures.",
    ),
    seed: int = typer.Option(
        0, help="Seed of the synthetic draw, the encoder, the attacks and the classifiers."
    ),
    threads: int = typer.Option(
        0, help="CPU threads (0: the cores this process may use: its affinity and its container's CPU quota)."
    ),
    federated: bool = typer.Option(
        False,
        "--federated",
        help="Audit each simulated hospital on its own slices (local reports with galleries in "
        "OUT/hospitals/NAME/) and combine only their aggregate statistics (share.json) into "
        "OUT/consortium/report.html, as a deployment would.",
    ),
    pdf: bool = typer.Option(
        True, "--pdf/--no-pdf", help="Also render report.pdf (WeasyPrint; needs Pango)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log fedsynth's progress messages."),
) -> None:
    """Audit a generator for an ethics board: does it copy, does it leak membership, is it
    realistic, does it help a classifier?

    Every figure is set beside what fresh real data (the holdout, patients never trained
    on) scores, and judged green/amber/red by the thresholds written into audit.json.
    Writes OUT/report.html (self-contained) and OUT/report.pdf for the ethics board,
    OUT/audit.json, OUT/share.json (the aggregate statistics a hospital may send the
    coordinator) and OUT/figures/*.png. With --federated: one local audit per simulated
    hospital and a consortium report built from their shares alone.
    """
    setup_logging(verbose)
    if run_dir is None and synthetic is None:
        raise CommandError(
            "give --run (a run to draw synthetic images from) or --synthetic (a slice set of them)"
        )
    if (out / AUDIT_FILE).exists() or (out / CONSORTIUM_DIR / CONSORTIUM_FILE).exists():
        raise CommandError(f"{out} already holds an audit; choose another --out (nothing is overwritten)")
    if round_ not in ("last", "best") and not round_.isdigit():
        raise CommandError(f"--round {round_!r}: a round number, 'last' or 'best'")
    if utility_model not in ("cnn", "resnet18"):
        raise CommandError(f"--utility-model {utility_model!r}: use cnn or resnet18")
    if not 0 < utility_fraction <= 1:
        raise CommandError(f"--utility-fraction {utility_fraction:g}: give a share above 0, at most 1")
    options = AuditOptions(
        seed=seed,
        encoder_steps=encoder_steps,
        classifier_steps=classifier_steps,
        inception_weights=str(inception_weights) if inception_weights else None,
        utility=utility,
        utility_seeds=seeds,
        utility_steps=utility_steps,
        utility_model=utility_model,
        utility_fraction=utility_fraction,
        threads=threads or available_cores(),
    )
    run = RunDir(run_dir) if run_dir else None
    if federated:
        if run is None or data is not None or synthetic is not None or hospital is not None:
            raise CommandError(
                "--federated audits a simulated run's hospitals one by one: give --run only (no --data, "
                "--synthetic or --hospital)"
            )
        federated_audit(run, out, options, n_synthetic=n_synthetic, round_=round_, pdf=pdf)
        _attach(run, out / CONSORTIUM_DIR)
        return
    real, source = real_slices(run, data, hospital)
    result = _audit_one(
        run,
        real,
        source,
        out,
        options,
        hospital=hospital,
        synthetic=synthetic,
        n_synthetic=n_synthetic,
        round_=round_,
        white_box=data is None,
    )
    _print_summary(result, out)
    _report(out, pdf)
    if run is not None:
        _attach(run, out)


def _attach(run: RunDir, folder: Path) -> None:
    """The report and audit.json also go to the run's MLflow run, if it logged to one."""
    names = ("report.html", "report.pdf", AUDIT_FILE, CONSORTIUM_FILE)
    where = attach_files(run, [folder / name for name in names], artifact_path=f"audit/{folder.name}")
    if where:
        console.print(f"  MLflow        {where}")


def _audit_one(
    run: RunDir | None,
    real: SliceSet,
    source: str,
    out: Path,
    options: AuditOptions,
    *,
    hospital: str | None,
    synthetic: Path | None,
    n_synthetic: int | None,
    round_: str,
    white_box: bool = True,
) -> dict[str, Any]:
    """One audit against one set of real slices, with a progress bar (see ``prepare_audit``)."""
    prepared = prepare_audit(
        run,
        real,
        source,
        options,
        hospital=hospital,
        synthetic=synthetic,
        n_synthetic=n_synthetic,
        round_=round_,
        white_box=white_box,
        notify=console.print,
    )
    inputs = prepared.inputs
    console.print(
        f"auditing {len(inputs.synthetic_images)} synthetic images against {len(inputs.train_images)} "
        f"training and {len(inputs.holdout_images)} holdout slices ({source})"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=1)

        def progress(done: int, total: int, stage: str = "") -> None:
            bar.update(task, description=stage, completed=done, total=max(total, 1))

        try:
            result = run_audit(
                inputs,
                out,
                options,
                privacy_ledger=prepared.ledger,
                client_privacy=prepared.client_privacy,
                discriminators=prepared.discriminators,
                progress=progress,
                context=prepared.context,
                hospital=hospital,
                paired=prepared.paired,
            )
        except (FeatureError, ValueError, KeyError, RuntimeError) as err:
            raise CommandError(f"audit stopped: {err}") from None
    if prepared.white_box and not prepared.discriminators:
        assert run is not None
        console.print(
            f"[yellow]no discriminator state for {hospital} in {run.hospitals_dir}: the white-box attack was "
            "not run[/]"
        )
    return result


def _report(folder: Path, pdf: bool) -> None:
    html, pdf_path, why = render_report(folder, pdf=pdf)
    console.print(f"report: {html}" + (f" and {pdf_path}" if pdf_path else ""))
    if why and pdf:
        console.print(f"[yellow]report.pdf not written: {why}[/]")


def federated_audit(
    run: RunDir,
    out: Path,
    options: AuditOptions,
    *,
    n_synthetic: int | None = None,
    round_: str = "last",
    pdf: bool = True,
) -> Path:
    """Each simulated hospital audits the generator on its own slices into its own folder,
    as it would at the hospital; the consortium report is built from their share.json
    files alone (what would cross the wire)."""
    names = hospital_names(run)
    done = [name for name in names if (out / HOSPITALS_DIR / name / AUDIT_FILE).exists()]
    if done:
        raise CommandError(
            f"{out / HOSPITALS_DIR} already holds audits of {', '.join(done)}; choose another --out (nothing "
            "is overwritten)"
        )
    for i, name in enumerate(names, start=1):
        console.rule(f"hospital {i}/{len(names)}: {name} (local audit, stays at the hospital)")
        real, source = real_slices(run, None, name)
        local = out / HOSPITALS_DIR / name
        result = _audit_one(
            run,
            real,
            source,
            local,
            options,
            hospital=name,
            synthetic=None,
            n_synthetic=n_synthetic,
            round_=round_,
            white_box=True,
        )
        _print_summary(result, local)
        _report(local, pdf)
    console.rule("consortium: combining the hospitals' shares (statistics only)")
    shares = [load_share(out / HOSPITALS_DIR / name / SHARE_FILE) for name in names]
    consortium = combine_shares(shares)
    html, pdf_path, why = render_consortium_report(consortium, out / CONSORTIUM_DIR, pdf=pdf)
    _print_consortium(consortium)
    console.print(
        f"consortium report: {html}"
        + (f" and {pdf_path}" if pdf_path else "")
        + f"; local reports in {out / HOSPITALS_DIR}/<hospital>/"
    )
    if why and pdf:
        console.print(f"[yellow]report.pdf not written: {why}[/]")
    return html


def _print_consortium(consortium: dict) -> None:
    table = Table(title="consortium audit (worst hospital per check)", title_justify="left")
    table.add_column("check")
    table.add_column("consortium")
    for name in consortium["hospitals"]:
        table.add_column(name)
    for check, verdict in consortium["summary"].items():
        cells = [
            consortium["by_hospital"][h]["checks"].get(check, {}).get("verdict", "-")
            for h in consortium["hospitals"]
        ]
        table.add_row(
            check.replace("_", " "),
            f"[{_COLOURS[verdict]}]{verdict}[/]",
            *[f"[{_COLOURS.get(c, 'white')}]{c}[/]" for c in cells],
        )
    console.print(table)


def _print_summary(result: dict, out: Path) -> None:
    table = Table(title="audit", title_justify="left")
    for column in ("check", "verdict", "worst figure"):
        table.add_column(column)
    for name, check in result["checks"].items():
        verdict = check["verdict"]
        rows = [r for r in check["figures"] if r["verdict"] == verdict]
        detail = rows[0]["meaning"] if rows else (check.get("note") or "")
        if rows and rows[0]["value"] is not None:
            ref = rows[0]["reference"]
            detail += f" (value {rows[0]['value']:.3g}" + (
                f", fresh real data {ref:.3g})" if ref is not None else ")"
            )
        table.add_row(name.replace("_", " "), f"[{_COLOURS[verdict]}]{verdict}[/]", detail)
    console.print(table)
    console.print(
        f"audit in {out / AUDIT_FILE}; figures in {out / 'figures'} ({result['seconds']['total']:.0f} s)"
    )
