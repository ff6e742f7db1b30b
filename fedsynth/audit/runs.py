"""The audit of a run's generator: the real slices (a hospital's, or pooled), the synthetic
slices drawn from the run (or given), the privacy ledger, the hospital's discriminator for
the white-box attack and what the report says of the run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedsynth.audit.membership import select_records
from fedsynth.audit.paired import paired_fidelity
from fedsynth.audit.pipeline import AuditInputs, AuditOptions, Discriminator
from fedsynth.audit.segmentation import segmentation_utility
from fedsynth.core.checkpoint import file_sha256, load_checkpoint
from fedsynth.core.errors import UserError
from fedsynth.core.weights import load_weights
from fedsynth.data.sliceset import HOLDOUT, TRAIN, SliceSet
from fedsynth.models import MASK, build_networks, count_parameters
from fedsynth.runs.rundir import RunDir, RunDirError
from fedsynth.synthesis.sample import load_synthetic, sample_images

__all__ = [
    "PreparedAudit",
    "audit_context",
    "hospital_discriminators",
    "hospital_names",
    "mask_conditioned_samples",
    "prepare_audit",
    "real_slices",
]


@dataclass
class PreparedAudit:
    """Everything one audit needs, gathered from a run directory and real slices."""

    inputs: AuditInputs
    ledger: list[dict[str, Any]] | None
    client_privacy: list[dict[str, Any]] | None
    discriminators: list[Discriminator]
    context: dict[str, Any]
    paired: dict[str, Any] | None
    white_box: bool  # the white-box attack was asked for (it runs when a discriminator was found)


def prepare_audit(
    run: RunDir | None,
    real: SliceSet,
    source: str,
    options: AuditOptions,
    *,
    hospital: str | None,
    synthetic: Path | None,
    n_synthetic: int | None,
    round_: str,
    white_box: bool = True,
    notify: Callable[[str], None] = lambda _: None,
) -> PreparedAudit:
    """One audit of the generator against one set of real slices (a hospital's, or pooled):
    the synthetic slices (``synthetic``, or drawn from the run), the privacy ledger up to
    the audited round, the hospital's discriminator and the report's context.

    ``white_box``: attack with the hospital's discriminator from the run, which is right
    only when the real slices are the ones the run gave that hospital (not --data).

    Raises
    ------
    UserError
        No holdout slices, classes or sizes that differ, or a synthetic set that is not synthetic.
    """
    seed = options.seed
    train, holdout = real.only(TRAIN), real.only(HOLDOUT)
    if len(holdout) == 0:
        raise UserError(
            f"{source}: no holdout slices; the audit needs patients never trained on as its reference"
        )
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
            raise UserError(
                f"{source}: classes {real.class_names} differ from the run's {tuple(cfg.data.classes)}"
            )
        if cfg.model.family.condition == MASK:
            syn_images, used_round, paired = mask_conditioned_samples(
                run, train, holdout, source, options, n=n, round_=round_, notify=notify
            )
            syn_labels = None
            provenance["synthetic_masks"] = "the training slices' masks, in turn"
        else:
            syn_images, labels, _, used_round, conditional = sample_images(
                run, n=n, label=None, round_=round_, seed=seed
            )
            syn_labels = labels.astype(np.int64) if conditional else None
        provenance |= {
            "run": str(run.root),
            "round": used_round,
            "checkpoint_sha256": file_sha256(run.checkpoint(used_round)),
            "synthetic_seed": seed,
        }
    if syn_images.shape[1:] != train.images.shape[1:]:
        raise UserError(
            f"synthetic images are {syn_images.shape[1]} px but the real slices are {train.images.shape[1]} "
            "px"
        )
    inputs = AuditInputs(
        train.images,
        train.labels,
        train.patient_ids,
        holdout.images,
        holdout.labels,
        holdout.patient_ids,
        syn_images,
        syn_labels,
        real.class_names,
        privacy_unit=real.privacy_unit,
        provenance=provenance,
    )
    ledger = client = None
    if run is not None:

        def upto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:  # the spending up to the audited round
            return [r for r in rows if used_round is None or r.get("round", 0) <= used_round]

        ledger = [r for r in upto(run.read_privacy()) if hospital is None or r["hospital"] == hospital]
        client = upto(run.read_client_privacy())
    white_box = bool(run and hospital and white_box) and paired is None
    if paired is not None and hospital:
        inputs.provenance["white_box_attack"] = (
            "not run: pix2pix's discriminator judges (mask, slice) pairs, and the attack scores slices "
            "alone; the paired train-vs-holdout SSIM gap is its membership signal"
        )
    discriminators: list[Discriminator] = []
    if white_box:
        assert run is not None and hospital is not None
        discriminators = hospital_discriminators(run, real, hospital, seed)
        inputs.provenance["white_box_attack"] = (
            f"{hospital}'s latest local discriminator"
            if discriminators
            else f"not run: no discriminator state for {hospital} in {run.hospitals_dir}"
        )
    return PreparedAudit(
        inputs, ledger, client, discriminators, audit_context(run, real, hospital), paired, white_box
    )


PAIRED_TRAIN_MASKS = 1000  # training masks (at most) for the paired train-vs-holdout comparison


def mask_conditioned_samples(
    run: RunDir,
    train: SliceSet,
    holdout: SliceSet,
    source: str,
    options: AuditOptions,
    *,
    n: int,
    round_: str,
    notify: Callable[[str], None] = lambda _: None,
) -> tuple[np.ndarray, int, dict[str, Any]]:
    """A mask-conditioned (pix2pix) generator's slices for the audit: ``n`` drawn for the **training** masks
    in turn, the paired (mask-conditioned) fidelity over holdout and training masks, and
    (unless ``--no-utility``) the segmentation utility of its (mask, slice) pairs.

    The audited set comes from the training masks because that is what a hospital would
    release (`fedsynth sample --masks` with its own masks), and it is the hardest case
    for the copying and membership checks: a slice drawn for a training patient's mask
    may bring back that patient's slice. Drawing for the holdout masks instead would make
    the synthetic set look like the holdout, the checks' "fresh data" reference, and pass
    them by construction."""
    seed = options.seed
    if holdout.masks is None or train.masks is None:
        raise UserError(
            f"{source}: a pix2pix run is audited against slices with masks (prepare the volumes with "
            "`fedsynth prepare ... --keep-masks`)"
        )
    cycle = np.arange(n) % len(train)
    images, _, _, used_round, _ = sample_images(
        run, n=n, label=None, round_=round_, seed=seed, masks=train.masks[cycle]
    )
    pick = np.random.default_rng(seed).permutation(len(train))[:PAIRED_TRAIN_MASKS]
    from_train, *_ = sample_images(
        run, n=len(pick), label=None, round_=used_round, seed=seed + 1, masks=train.masks[pick]
    )
    from_holdout, *_ = sample_images(
        run, n=len(holdout), label=None, round_=used_round, seed=seed + 2, masks=holdout.masks
    )
    paired = paired_fidelity(from_holdout, holdout.images, from_train, train.images[pick], seed=seed)
    paired["audited_set"] = (
        "drawn for the training masks in turn (what `fedsynth sample --masks` with the hospital's own masks "
        "releases)"
    )
    if options.utility:
        notify(f"segmentation utility: {options.utility_seeds} seeds x 3 training sets of a small U-Net")

        def synthesize(masks: np.ndarray, s: int) -> np.ndarray:
            return sample_images(run, n=len(masks), label=None, round_=used_round, seed=s, masks=masks)[0]

        paired["segmentation"] = segmentation_utility(
            train.images,
            train.masks,
            holdout.images,
            holdout.masks,
            synthesize,
            seeds=options.utility_seeds,
            steps=options.utility_steps or 300,
            seed=seed,
            threads=options.threads,
        )
    return images, used_round, paired


def hospital_names(run: RunDir) -> list[str]:
    """The run's simulated hospitals.

    Raises
    ------
    UserError
        The run has none (not a simulation).
    """
    try:
        return run.hospitals.names()
    except RunDirError as err:
        raise UserError(f"{run.root}: {err}") from None


def audit_context(run: RunDir | None, real: SliceSet, hospital: str | None) -> dict[str, Any]:
    """What the report says about scope, data and training, from the run and the slices."""
    context: dict[str, Any] = {
        "hospital": hospital,
        "preprocessing": list(real.meta.get("preprocessing", [])),
        "data_kind": real.meta.get("kind"),
        "hospitals": _scope(real, hospital),
    }
    if run is None:
        return context
    manifest = json.loads(run.manifest_path.read_text()) if run.manifest_path.is_file() else {}
    context["run"] = {k: v for k, v in manifest.items() if k != "hospitals"}
    if run.config_path.is_file():
        cfg = run.load_config()
        context["config_yaml"] = run.config_path.read_text()
        context["config_sha256"] = file_sha256(run.config_path)
        context["config"] = yaml.safe_load(context["config_yaml"])
        gen, disc = build_networks(cfg)
        context["model"] = {
            "name": cfg.model.name,
            "generator_parameters": count_parameters(gen),
            "discriminator_parameters": count_parameters(disc),
        }
    if run.curves_path.is_file():
        context["curves"] = str(run.curves_path)
    best = run.best_round()
    if best is not None:
        context["best_round"] = best
    return context


def _scope(real: SliceSet, hospital: str | None) -> dict[str, Any]:
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
        scope[site] = {
            "train_slices": int(train.sum()),
            "train_patients": int(len(np.unique(ids[train]))),
            "holdout_slices": int(hold.sum()),
            "holdout_patients": int(len(np.unique(ids[hold]))),
        }
    return scope


def real_slices(run: RunDir | None, data: Path | None, hospital: str | None) -> tuple[SliceSet, str]:
    """The real slices: ``data``, else the run's simulated hospitals (one, or all pooled)."""
    if data is not None:
        return SliceSet.load(data), str(data)
    if run is None:
        raise UserError("--data is required with --synthetic and no --run")
    if not run.hospitals.manifest_path.is_file():
        raise UserError(
            f"{run.root}: no simulated hospitals' slices here ({run.hospitals.manifest_path} missing); give "
            "--data"
        )
    names = hospital_names(run)
    if hospital is not None:
        if hospital not in names:
            raise UserError(f"--hospital {hospital}: not a hospital of this run ({', '.join(names)})")
        names = [hospital]
    parts = []
    for name in names:
        part = SliceSet.load(run.hospitals.slices(name))
        # patient ids are only unique within a hospital
        parts.append((name, part))
    if len(parts) == 1:
        return parts[0][1], f"{run.hospitals.slices(names[0])}"
    first = parts[0][1]
    pooled = SliceSet(
        images=np.concatenate([p.images for _, p in parts]),
        labels=np.concatenate([p.labels for _, p in parts]),
        class_names=first.class_names,
        patient_ids=np.concatenate([np.char.add(f"{n}/", p.patient_ids.astype(str)) for n, p in parts]),
        split=np.concatenate([p.split for _, p in parts]),
        source=np.concatenate([p.source for _, p in parts]),
        meta=dict(first.meta),
        masks=np.concatenate([p.masks for _, p in parts])
        if all(p.masks is not None for _, p in parts)
        else None,
    )
    return pooled, f"{len(parts)} hospitals' slices in {run.hospitals_dir}"


def hospital_discriminators(run: RunDir, real: SliceSet, hospital: str, seed: int) -> list[Discriminator]:
    """The hospital's own discriminator (its latest local state, whatever --round says),
    for the white-box attack, when its state is here."""
    path = run.hospitals.state(hospital).discriminator_path
    if not path.is_file():
        return []
    cfg = run.load_config()
    _, disc = build_networks(cfg)
    tensors, _ = load_checkpoint(path)
    load_weights(disc, tensors)
    train, holdout = real.only(TRAIN), real.only(HOLDOUT)
    records = select_records(
        train.images,
        train.labels,
        train.patient_ids,
        holdout.images,
        holdout.labels,
        holdout.patient_ids,
        seed=seed,
    )
    return [Discriminator(hospital, disc, records)]
