"""`fedsynth audit`: fidelity, utility, memorization and membership inference of a run's
generator, each judged against the hospitals' fresh real data (their holdout)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..audit.features import FeatureError
from ..audit.federated import SHARE_FILE, combine_shares, load_share
from ..audit.membership import select_records
from ..audit.pipeline import AUDIT_FILE, AuditInputs, AuditOptions, Discriminator, run_audit
from ..audit.report import CONSORTIUM_FILE, render_consortium_report, render_report
from ..shared.checkpoint import file_sha256, load_checkpoint
from ..shared.models import build_gan, count_parameters
from ..shared.rundir import HOSPITALS_MANIFEST, RunDir
from ..shared.sliceset import HOLDOUT, TRAIN, SliceSet
from ..shared.weights import load_weights
from .common import CommandError, console, setup_logging, user_errors
from .sample import load_synthetic, sample_images

__all__ = ["audit", "federated_audit"]

_COLOURS = {"green": "green", "amber": "yellow", "red": "red"}
HOSPITALS_DIR, CONSORTIUM_DIR = "hospitals", "consortium"


@user_errors
def audit(
    run_dir: Path = typer.Option(None, "--run", "-r", help="Run directory whose global generator to audit (the last round by default)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for audit.json and figures/ (must not hold an audit already)."),
    data: Path = typer.Option(None, "--data", "-d", help="Slice set whose train split the generator was trained on and whose holdout is the fresh-data reference [default: the run's simulated hospitals' slices]."),
    hospital: str = typer.Option(None, help="Whose data this is: a simulated hospital of --run (its slices, plus the white-box attack with its discriminator), or, with --data, the name the share and the local report carry."),
    synthetic: Path = typer.Option(None, "--synthetic", help="Audit these synthetic slices (a slice set, e.g. from `fedsynth sample --format npz`) instead of drawing from --run."),
    n_synthetic: int = typer.Option(None, "--n-synthetic", help="Synthetic images to draw from the run [default: twice the training images (at most 20,000), for the 2x utility condition]."),
    round_: str = typer.Option("last", "--round", help="Round whose generator to audit: a number, 'last', or 'best' (the lowest validation score)."),
    inception_weights: Path = typer.Option(None, "--inception-weights", help="pytorch-fid Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth) for FID; without them FID is reported as not computed."),
    utility: bool = typer.Option(True, "--utility/--no-utility", help="Train diagnostic classifiers with and without synthetic images (the slowest part)."),
    seeds: int = typer.Option(5, help="Classifier seeds per utility condition."),
    utility_steps: int = typer.Option(None, help="Optimiser steps per classifier [default: chosen for ~15 epochs of the real set]."),
    utility_model: str = typer.Option("cnn", help="Utility classifier: cnn (small CNN) or resnet18 (torchvision ResNet-18 from scratch)."),
    encoder_steps: int = typer.Option(500, help="Training steps of the audit's own encoder."),
    seed: int = typer.Option(0, help="Seed of the synthetic draw, the encoder, the attacks and the classifiers."),
    threads: int = typer.Option(0, help="CPU threads (0: all cores)."),
    federated: bool = typer.Option(False, "--federated", help="Audit each simulated hospital on its own slices (local reports with galleries in OUT/hospitals/NAME/) and combine only their aggregate statistics (share.json) into OUT/consortium/report.html, as a deployment would."),
    pdf: bool = typer.Option(True, "--pdf/--no-pdf", help="Also render report.pdf (WeasyPrint; needs Pango)."),
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
        raise CommandError("give --run (a run to draw synthetic images from) or --synthetic (a slice set of them)")
    if (out / AUDIT_FILE).exists() or (out / CONSORTIUM_DIR / CONSORTIUM_FILE).exists():
        raise CommandError(f"{out} already holds an audit; choose another --out (nothing is overwritten)")
    if round_ not in ("last", "best") and not round_.isdigit():
        raise CommandError(f"--round {round_!r}: a round number, 'last' or 'best'")
    if utility_model not in ("cnn", "resnet18"):
        raise CommandError(f"--utility-model {utility_model!r}: use cnn or resnet18")
    options = AuditOptions(seed=seed, encoder_steps=encoder_steps,
                           inception_weights=str(inception_weights) if inception_weights else None,
                           utility=utility, utility_seeds=seeds, utility_steps=utility_steps,
                           utility_model=utility_model, threads=threads or None)
    run = RunDir(run_dir) if run_dir else None
    if federated:
        if run is None or data is not None or synthetic is not None or hospital is not None:
            raise CommandError("--federated audits a simulated run's hospitals one by one: give --run only "
                               "(no --data, --synthetic or --hospital)")
        federated_audit(run, out, options, n_synthetic=n_synthetic, round_=round_, pdf=pdf)
        return
    real, source = _real_slices(run, data, hospital)
    result = _audit_one(run, real, source, out, options, hospital=hospital, synthetic=synthetic,
                        n_synthetic=n_synthetic, round_=round_, white_box=data is None)
    _print_summary(result, out)
    _report(out, pdf)


def _audit_one(run: RunDir | None, real: SliceSet, source: str, out: Path, options: AuditOptions, *,
               hospital: str | None, synthetic: Path | None, n_synthetic: int | None, round_: str,
               white_box: bool = True) -> dict:
    """One audit of the generator against one set of real slices (a hospital's, or pooled).

    ``white_box``: attack with the hospital's discriminator from the run, which is right
    only when the real slices are the ones the run gave that hospital (not --data)."""
    seed = options.seed
    train, holdout = real.only(TRAIN), real.only(HOLDOUT)
    if len(holdout) == 0:
        raise CommandError(f"{source}: no holdout slices; the audit needs patients never trained on as its reference")
    provenance: dict[str, object] = {"real_slices": source}
    paired = None
    if synthetic is not None:
        syn_images, syn_labels, where = load_synthetic(synthetic, real.class_names, translated_ok=False)
        provenance |= where
        used_round = None
    else:
        assert run is not None
        n = n_synthetic or min(2 * len(train), 20000)
        cfg = run.load_config()
        if tuple(cfg.data.classes) != real.class_names:
            raise CommandError(f"{source}: classes {real.class_names} differ from the run's {tuple(cfg.data.classes)}")
        if cfg.model.on_masks:
            syn_images, used_round, paired = _pix2pix_samples(run, train, holdout, source, options, n=n,
                                                              round_=round_)
            syn_labels = None
            provenance["synthetic_masks"] = "the training slices' masks, in turn"
        else:
            syn_images, labels, _, used_round, conditional = sample_images(
                run, n=n, label=None, round_=round_, seed=seed)
            syn_labels = labels.astype(np.int64) if conditional else None
        provenance |= {"run": str(run.root), "round": used_round,
                       "checkpoint_sha256": file_sha256(run.checkpoint(used_round)), "synthetic_seed": seed}
    if syn_images.shape[1:] != train.images.shape[1:]:
        raise CommandError(f"synthetic images are {syn_images.shape[1]} px but the real slices are "
                           f"{train.images.shape[1]} px")
    inputs = AuditInputs(
        train.images, train.labels, train.patient_ids, holdout.images, holdout.labels, holdout.patient_ids,
        syn_images, syn_labels, real.class_names, privacy_unit=real.privacy_unit, provenance=provenance)
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
            white_box = bool(run and hospital and white_box) and paired is None
            if paired is not None and hospital:
                inputs.provenance["white_box_attack"] = (
                    "not run: pix2pix's discriminator judges (mask, slice) pairs, and the attack scores slices "
                    "alone; the paired train-vs-holdout SSIM gap is its membership signal")
            discriminators = _discriminators(run, real, hospital, seed) if white_box else []
            if white_box:
                inputs.provenance["white_box_attack"] = (
                    f"{hospital}'s latest local discriminator" if discriminators
                    else f"not run: no discriminator state for {hospital} in {run.hospitals_dir}")
            result = run_audit(inputs, out, options, privacy_ledger=ledger, client_privacy=client,
                               discriminators=discriminators, progress=progress,
                               context=_context(run, real, hospital), hospital=hospital, paired=paired)
        except (FeatureError, ValueError, KeyError, RuntimeError) as err:
            raise CommandError(f"audit stopped: {err}") from None
    if white_box and not discriminators:
        console.print(f"[yellow]no discriminator state for {hospital} in {run.hospitals_dir}: the white-box "
                      "attack was not run[/]")
    return result


PAIRED_TRAIN_MASKS = 1000  # training masks (at most) for the paired train-vs-holdout comparison


def _pix2pix_samples(run: RunDir, train: SliceSet, holdout: SliceSet, source: str, options: AuditOptions, *,
                     n: int, round_: str) -> tuple[np.ndarray, int, dict]:
    """A pix2pix generator's slices for the audit: ``n`` drawn for the **training** masks
    in turn, the paired (mask-conditioned) fidelity over holdout and training masks, and
    (unless ``--no-utility``) the segmentation utility of its (mask, slice) pairs.

    The audited set comes from the training masks because that is what a hospital would
    release (`fedsynth sample --masks` with its own masks), and it is the hardest case
    for the copying and membership checks: a slice drawn for a training patient's mask
    may bring back that patient's slice. Drawing for the holdout masks instead would make
    the synthetic set look like the holdout, the checks' "fresh data" reference, and pass
    them by construction."""
    from ..audit.paired import paired_fidelity
    from ..audit.segmentation import segmentation_utility

    seed = options.seed
    if holdout.masks is None or train.masks is None:
        raise CommandError(f"{source}: a pix2pix run is audited against slices with masks (prepare the volumes with "
                           "`fedsynth prepare ... --keep-masks`)")
    cycle = np.arange(n) % len(train)
    images, _, _, used_round, _ = sample_images(run, n=n, label=None, round_=round_, seed=seed,
                                                masks=train.masks[cycle])
    pick = np.random.default_rng(seed).permutation(len(train))[:PAIRED_TRAIN_MASKS]
    from_train, *_ = sample_images(run, n=len(pick), label=None, round_=used_round, seed=seed + 1,
                                   masks=train.masks[pick])
    from_holdout, *_ = sample_images(run, n=len(holdout), label=None, round_=used_round, seed=seed + 2,
                                     masks=holdout.masks)
    paired = paired_fidelity(from_holdout, holdout.images, from_train, train.images[pick], seed=seed)
    paired["audited_set"] = "drawn for the training masks in turn (what `fedsynth sample --masks` with the " \
                            "hospital's own masks releases)"
    if options.utility:
        console.print(f"segmentation utility: {options.utility_seeds} seeds x 3 training sets of a small U-Net")

        def synthesize(masks: np.ndarray, s: int) -> np.ndarray:
            return sample_images(run, n=len(masks), label=None, round_=used_round, seed=s, masks=masks)[0]

        paired["segmentation"] = segmentation_utility(
            train.images, train.masks, holdout.images, holdout.masks, synthesize, seeds=options.utility_seeds,
            steps=options.utility_steps or 300, seed=seed, threads=options.threads)
    return images, used_round, paired


def _report(folder: Path, pdf: bool) -> None:
    html, pdf_path, why = render_report(folder, pdf=pdf)
    console.print(f"report: {html}" + (f" and {pdf_path}" if pdf_path else ""))
    if why and pdf:
        console.print(f"[yellow]report.pdf not written: {why}[/]")


def federated_audit(run: RunDir, out: Path, options: AuditOptions, *, n_synthetic: int | None = None,
                    round_: str = "last", pdf: bool = True) -> Path:
    """Each simulated hospital audits the generator on its own slices into its own folder,
    as it would at the hospital; the consortium report is built from their share.json
    files alone (what would cross the wire)."""
    names = _hospital_names(run)
    done = [name for name in names if (out / HOSPITALS_DIR / name / AUDIT_FILE).exists()]
    if done:
        raise CommandError(f"{out / HOSPITALS_DIR} already holds audits of {', '.join(done)}; choose another --out "
                           "(nothing is overwritten)")
    for i, name in enumerate(names, start=1):
        console.rule(f"hospital {i}/{len(names)}: {name} (local audit, stays at the hospital)")
        real, source = _real_slices(run, None, name)
        local = out / HOSPITALS_DIR / name
        result = _audit_one(run, real, source, local, options, hospital=name, synthetic=None,
                            n_synthetic=n_synthetic, round_=round_, white_box=True)
        _print_summary(result, local)
        _report(local, pdf)
    console.rule("consortium: combining the hospitals' shares (statistics only)")
    shares = [load_share(out / HOSPITALS_DIR / name / SHARE_FILE) for name in names]
    consortium = combine_shares(shares)
    html, pdf_path, why = render_consortium_report(consortium, out / CONSORTIUM_DIR, pdf=pdf)
    _print_consortium(consortium)
    console.print(f"consortium report: {html}" + (f" and {pdf_path}" if pdf_path else "")
                  + f"; local reports in {out / HOSPITALS_DIR}/<hospital>/")
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
        cells = [consortium["by_hospital"][h]["checks"].get(check, {}).get("verdict", "-")
                 for h in consortium["hospitals"]]
        table.add_row(check.replace("_", " "), f"[{_COLOURS[verdict]}]{verdict}[/]",
                      *[f"[{_COLOURS.get(c, 'white')}]{c}[/]" for c in cells])
    console.print(table)


def _hospital_names(run: RunDir) -> list[str]:
    manifest = run.hospitals_dir / HOSPITALS_MANIFEST
    if not manifest.is_file():
        raise CommandError(f"{run.root}: no simulated hospitals' slices here ({manifest} missing)")
    return list(json.loads(manifest.read_text())["hospitals"])


def _context(run: RunDir | None, real: SliceSet, hospital: str | None) -> dict:
    """What the report says about scope, data and training, from the run and the slices."""
    context: dict = {"hospital": hospital, "preprocessing": list(real.meta.get("preprocessing", [])),
                     "data_kind": real.meta.get("kind"), "hospitals": _scope(real, hospital)}
    if run is None:
        return context
    manifest = json.loads(run.manifest_path.read_text()) if run.manifest_path.is_file() else {}
    context["run"] = {k: v for k, v in manifest.items() if k != "hospitals"}
    if run.config_path.is_file():
        cfg = run.load_config()
        context["config_yaml"] = run.config_path.read_text()
        context["config_sha256"] = file_sha256(run.config_path)
        context["config"] = yaml.safe_load(context["config_yaml"])
        gen, disc = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=len(cfg.data.classes))
        context["model"] = {"name": cfg.model.name, "generator_parameters": count_parameters(gen),
                            "discriminator_parameters": count_parameters(disc)}
    if run.curves_path.is_file():
        context["curves"] = str(run.curves_path)
    best = run.best_round()
    if best is not None:
        context["best_round"] = best
    return context


def _scope(real: SliceSet, hospital: str | None) -> dict:
    """Slices and patients per hospital (patient ids of pooled sets are 'hospital/id')."""
    ids = real.patient_ids.astype(str)
    if hospital is not None or not all("/" in i for i in ids):
        sites = np.full(len(ids), hospital or "all")
    else:
        sites = np.array([i.split("/", 1)[0] for i in ids])
    scope = {}
    for site in dict.fromkeys(sites.tolist()):
        here = sites == site
        train, hold = here & (real.split == TRAIN), here & (real.split == HOLDOUT)
        scope[site] = {"train_slices": int(train.sum()), "train_patients": int(len(np.unique(ids[train]))),
                       "holdout_slices": int(hold.sum()), "holdout_patients": int(len(np.unique(ids[hold])))}
    return scope


def _real_slices(run: RunDir | None, data: Path | None, hospital: str | None) -> tuple[SliceSet, str]:
    """The real slices: --data, else the run's simulated hospitals (one, or all pooled)."""
    if data is not None:
        return SliceSet.load(data), str(data)
    if run is None:
        raise CommandError("--data is required with --synthetic and no --run")
    manifest = run.hospitals_dir / HOSPITALS_MANIFEST
    if not manifest.is_file():
        raise CommandError(f"{run.root}: no simulated hospitals' slices here ({manifest} missing); give --data")
    names = _hospital_names(run)
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
        masks=np.concatenate([p.masks for _, p in parts]) if all(p.masks is not None for _, p in parts) else None,
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
