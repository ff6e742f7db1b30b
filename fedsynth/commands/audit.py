"""`fedsynth audit`: fidelity, utility, memorization and membership inference of a run's
generator, each judged against the hospitals' fresh real data (their holdout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..audit.features import FeatureError
from ..audit.membership import select_records
from ..audit.pipeline import AUDIT_FILE, AuditInputs, AuditOptions, Discriminator, run_audit
from ..shared.checkpoint import file_sha256, load_checkpoint
from ..shared.models import build_gan
from ..shared.rundir import HOSPITALS_MANIFEST, RunDir
from ..shared.sliceset import HOLDOUT, TRAIN, SliceSet
from ..shared.weights import load_weights
from .common import CommandError, console, setup_logging, user_errors
from .sample import sample_images

__all__ = ["audit"]

_COLOURS = {"green": "green", "amber": "yellow", "red": "red"}


@user_errors
def audit(
    run_dir: Path = typer.Option(None, "--run", "-r", help="Run directory whose global generator to audit (the last round by default)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for audit.json and figures/ (must not hold an audit already)."),
    data: Path = typer.Option(None, "--data", "-d", help="Slice set whose train split the generator was trained on and whose holdout is the fresh-data reference [default: the run's simulated hospitals' slices]."),
    hospital: str = typer.Option(None, help="Audit against one simulated hospital's slices only, adding the white-box attack with its discriminator."),
    synthetic: Path = typer.Option(None, "--synthetic", help="Audit these synthetic slices (a slice set, e.g. from `fedsynth sample --format npz`) instead of drawing from --run."),
    n_synthetic: int = typer.Option(None, "--n-synthetic", help="Synthetic images to draw from the run [default: twice the training images (at most 20,000), for the 2x utility condition]."),
    round_: str = typer.Option("last", "--round", help="Round whose generator to audit: a number or 'last'."),
    inception_weights: Path = typer.Option(None, "--inception-weights", help="pytorch-fid Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth) for FID; without them FID is reported as not computed."),
    utility: bool = typer.Option(True, "--utility/--no-utility", help="Train diagnostic classifiers with and without synthetic images (the slowest part)."),
    seeds: int = typer.Option(5, help="Classifier seeds per utility condition."),
    utility_steps: int = typer.Option(None, help="Optimiser steps per classifier [default: chosen for ~15 epochs of the real set]."),
    utility_model: str = typer.Option("cnn", help="Utility classifier: cnn (small CNN) or resnet18 (torchvision ResNet-18 from scratch)."),
    encoder_steps: int = typer.Option(500, help="Training steps of the audit's own encoder."),
    seed: int = typer.Option(0, help="Seed of the synthetic draw, the encoder, the attacks and the classifiers."),
    threads: int = typer.Option(0, help="CPU threads (0: all cores)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log fedsynth's progress messages."),
) -> None:
    """Audit a generator for an ethics board: does it copy, does it leak membership, is it
    realistic, does it help a classifier?

    Every figure is set beside what fresh real data (the holdout, patients never trained
    on) scores, and judged green/amber/red by the thresholds written into audit.json.
    Writes OUT/audit.json and OUT/figures/*.png (distance histograms, membership ROC,
    closest-pairs gallery, random synthetic and real grids, utility gain).
    """
    setup_logging(verbose)
    if run_dir is None and synthetic is None:
        raise CommandError("give --run (a run to draw synthetic images from) or --synthetic (a slice set of them)")
    if (out / AUDIT_FILE).exists():
        raise CommandError(f"{out} already holds an audit ({AUDIT_FILE}); choose another --out (nothing is overwritten)")
    if round_ != "last" and not round_.isdigit():
        raise CommandError(f"--round {round_!r}: a round number or 'last'")
    if utility_model not in ("cnn", "resnet18"):
        raise CommandError(f"--utility-model {utility_model!r}: use cnn or resnet18")
    run = RunDir(run_dir) if run_dir else None
    real, source = _real_slices(run, data, hospital)
    train, holdout = real.only(TRAIN), real.only(HOLDOUT)
    if len(holdout) == 0:
        raise CommandError(f"{source}: no holdout slices; the audit needs patients never trained on as its reference")
    provenance: dict[str, object] = {"real_slices": source}
    if synthetic is not None:
        syn = SliceSet.load(synthetic)
        if syn.class_names != real.class_names:
            raise CommandError(f"--synthetic {synthetic}: classes {syn.class_names} differ from the real slices' "
                               f"{real.class_names}")
        syn_images = syn.images
        # `fedsynth sample` cycles labels for unconditional models too; their meta says so
        syn_labels = syn.labels if syn.meta.get("conditional", True) else None
        provenance |= {"synthetic_file": str(synthetic), "synthetic_sha256": file_sha256(synthetic)}
        used_round = None
    else:
        assert run is not None
        n = n_synthetic or min(2 * len(train), 20000)
        cfg = run.load_config()
        if tuple(cfg.data.classes) != real.class_names:
            raise CommandError(f"{source}: classes {real.class_names} differ from the run's {tuple(cfg.data.classes)}")
        syn_images, labels, _, used_round, conditional = sample_images(
            run, n=n, label=None, round_=None if round_ == "last" else int(round_), seed=seed)
        syn_labels = labels.astype(np.int64) if conditional else None
        provenance |= {"run": str(run.root), "round": used_round,
                       "checkpoint_sha256": file_sha256(run.checkpoint(used_round)), "synthetic_seed": seed}
    if syn_images.shape[1:] != train.images.shape[1:]:
        raise CommandError(f"synthetic images are {syn_images.shape[1]} px but the real slices are "
                           f"{train.images.shape[1]} px")
    inputs = AuditInputs(
        train.images, train.labels, train.patient_ids, holdout.images, holdout.labels, holdout.patient_ids,
        syn_images, syn_labels, real.class_names, privacy_unit=real.privacy_unit, provenance=provenance)
    options = AuditOptions(seed=seed, encoder_steps=encoder_steps,
                           inception_weights=str(inception_weights) if inception_weights else None,
                           utility=utility, utility_seeds=seeds, utility_steps=utility_steps,
                           utility_model=utility_model, threads=threads or None)
    ledger = client = None
    if run is not None:
        def upto(rows: list[dict]) -> list[dict]:  # the spending up to the audited round
            return [r for r in rows if used_round is None or r.get("round", 0) <= used_round]

        ledger = [r for r in upto(run.read_privacy()) if hospital is None or r["hospital"] == hospital]
        client = upto(run.read_client_privacy())
    console.print(f"auditing {len(syn_images)} synthetic images against {len(train)} training and {len(holdout)} "
                  f"holdout slices ({source})")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, description=name, completed=done, total=max(total, 1))

        try:
            discriminators = _discriminators(run, real, hospital, seed) if run and hospital else []
            if run and hospital:
                inputs.provenance["white_box_attack"] = (
                    f"{hospital}'s latest local discriminator" if discriminators
                    else f"not run: no discriminator state for {hospital} in {run.hospitals_dir}")
            result = run_audit(inputs, out, options, privacy_ledger=ledger, client_privacy=client,
                               discriminators=discriminators, progress=progress)
        except (FeatureError, ValueError, KeyError, RuntimeError) as err:
            raise CommandError(f"audit stopped: {err}") from None
    if run and hospital and not discriminators:
        console.print(f"[yellow]no discriminator state for {hospital} in {run.hospitals_dir}: the white-box "
                      "attack was not run[/]")
    _print_summary(result, out)


def _real_slices(run: RunDir | None, data: Path | None, hospital: str | None) -> tuple[SliceSet, str]:
    """The real slices: --data, else the run's simulated hospitals (one, or all pooled)."""
    if data is not None:
        if hospital is not None:
            raise CommandError("--hospital picks a simulated hospital's own slices: drop --data")
        return SliceSet.load(data), str(data)
    if run is None:
        raise CommandError("--data is required with --synthetic and no --run")
    manifest = run.hospitals_dir / HOSPITALS_MANIFEST
    if not manifest.is_file():
        raise CommandError(f"{run.root}: no simulated hospitals' slices here ({manifest} missing); give --data")
    names = json.loads(manifest.read_text())["hospitals"]
    if hospital is not None:
        if hospital not in names:
            raise CommandError(f"--hospital {hospital}: not a hospital of this run ({', '.join(names)})")
        names = [hospital]
    parts = []
    for name in names:
        part = SliceSet.load(run.hospitals_dir / name / "slices.npz")
        # patient ids are only unique within a hospital
        parts.append((name, part))
    if len(parts) == 1:
        return parts[0][1], f"{run.hospitals_dir / names[0] / 'slices.npz'}"
    first = parts[0][1]
    pooled = SliceSet(
        images=np.concatenate([p.images for _, p in parts]),
        labels=np.concatenate([p.labels for _, p in parts]),
        class_names=first.class_names,
        patient_ids=np.concatenate([np.char.add(f"{n}/", p.patient_ids.astype(str)) for n, p in parts]),
        split=np.concatenate([p.split for _, p in parts]),
        source=np.concatenate([p.source for _, p in parts]),
        meta=dict(first.meta),
    )
    return pooled, f"{len(parts)} hospitals' slices in {run.hospitals_dir}"


def _discriminators(run: RunDir, real: SliceSet, hospital: str, seed: int) -> list[Discriminator]:
    """The hospital's own discriminator (its latest local state, whatever --round says),
    for the white-box attack, when its state is here."""
    path = run.hospitals_dir / hospital / "state" / "discriminator.safetensors"
    if not path.is_file():
        return []
    cfg = run.load_config()
    _, disc = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=len(cfg.data.classes))
    tensors, _ = load_checkpoint(path)
    load_weights(disc, tensors)
    train, holdout = real.only(TRAIN), real.only(HOLDOUT)
    records = select_records(train.images, train.labels, train.patient_ids,
                             holdout.images, holdout.labels, holdout.patient_ids, seed=seed)
    return [Discriminator(hospital, disc, records)]


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
            detail += f" (value {rows[0]['value']:.3g}" + (f", fresh real data {ref:.3g})" if ref is not None else ")")
        table.add_row(name.replace("_", " "), f"[{_COLOURS[verdict]}]{verdict}[/]", detail)
    console.print(table)
    console.print(f"audit in {out / AUDIT_FILE}; figures in {out / 'figures'} "
                  f"({result['seconds']['total']:.0f} s)")
