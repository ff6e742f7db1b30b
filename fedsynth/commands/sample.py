"""`fedsynth sample`: synthetic slices from a run's global generator, as PNG, a slice set, NIfTI or DICOM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer
from PIL import Image

from ..shared.checkpoint import file_sha256, load_checkpoint
from ..shared.models import build_gan
from ..shared.rundir import RunDir
from ..shared.sampling import generate, paired_grid, save_grid, shape_masks
from ..shared.sliceset import SYNTHETIC, SliceSet, SliceSetError
from ..shared.weights import load_weights, split_model
from .common import CommandError, console, user_errors

__all__ = ["load_masks", "load_synthetic", "sample", "sample_images"]


def load_masks(path: Path, image_size: int) -> tuple[np.ndarray, SliceSet | None]:
    """Masks to draw pix2pix slices for: a slice set prepared with ``--keep-masks`` (its
    labels come along), or any ``.npz`` with a ``masks`` array (N, H, W) of label values.

    Raises
    ------
    CommandError
        Unreadable file, no masks in it, or masks of another size than the run's.
    """
    slices = None
    try:
        slices = SliceSet.load(path)
        masks = slices.masks
    except SliceSetError:
        try:
            with np.load(path) as data:
                masks = data["masks"] if "masks" in data.files else None
        except Exception as err:  # not an npz at all
            raise CommandError(f"--masks {path}: not readable as .npz ({err})") from None
    if masks is None:
        raise CommandError(f"--masks {path}: holds no masks (a slice set from `fedsynth prepare --keep-masks`, or "
                           "an .npz with a 'masks' array)")
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != (image_size, image_size) or masks.min() < 0 or masks.max() > 255:
        raise CommandError(f"--masks {path}: masks must be (N, {image_size}, {image_size}) label values 0-255 for "
                           f"this run, got {masks.shape} {masks.dtype}")
    return masks.astype(np.uint8), slices


def sample_images(run: RunDir, *, n: int, label: str | None, round_: int | str | None, seed: int,
                  truncation: float = 1.0,
                  masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, list[str], int, bool]:
    """Draw ``n`` images from a run's generator (for pix2pix, one per mask in ``masks``).

    Returns (images, labels, class names, round used, conditional). Without a label,
    images cycle through the classes so each gets an equal share.

    Raises
    ------
    CommandError
        Unknown label, a label asked of an unconditional model, truncation asked of a
        model without it, or masks missing for pix2pix (or given to another model).
    """
    cfg = run.load_config()
    round_ = run.resolve_round(round_)
    classes = cfg.data.classes
    gen, _ = build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=len(classes))
    tensors, _ = load_checkpoint(run.checkpoint(round_))
    load_weights(gen, split_model(tensors)[0])
    conditional = bool(getattr(gen, "conditional", False))
    if getattr(gen, "cycle", False):
        raise CommandError(f"model {cfg.model.name!r} translates slices rather than drawing them: `fedsynth translate "
                           f"--run {run.root} --direction a2b --data SLICES.npz --out TRANSLATED.npz` (the translations show "
                           "real patients' anatomy: `fedsynth audit` does not audit them as synthetic)")
    if getattr(gen, "paired", False):
        if masks is None:
            raise CommandError(f"model {cfg.model.name!r} draws a slice for each mask: `fedsynth sample --run "
                               f"{run.root} --masks FILE.npz` (or --random-masks) draws them; other commands take "
                               "the result with --synthetic")
        if label is not None or truncation != 1.0:
            raise CommandError(f"--label/--truncation: model {cfg.model.name!r} is conditioned on masks, not classes")
        return generate(gen, masks, seed=seed), np.zeros(len(masks), dtype=np.int64), classes, round_, False
    if masks is not None:
        raise CommandError(f"--masks/--random-masks: model {cfg.model.name!r} draws from noise, not masks (pix2pix "
                           "draws from masks)")
    if truncation != 1.0 and not getattr(gen, "supports_truncation", False):
        raise CommandError(f"--truncation: model {cfg.model.name!r} has no truncation trick (stylegan2-lite has)")
    if label is not None:
        if label not in classes:
            raise CommandError(f"--label {label!r}: not a class of this run (classes: {', '.join(classes)})")
        if not conditional:
            raise CommandError(f"--label: model {cfg.model.name!r} is unconditional and cannot draw a chosen class")
        labels = np.full(n, classes.index(label))
    else:
        labels = np.arange(n) % len(classes)
    return generate(gen, labels, seed=seed, truncation=truncation), labels, classes, round_, conditional


def load_synthetic(path: Path, class_names: tuple[str, ...], *,
                   translated_ok: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, str]]:
    """Synthetic slices from a slice set file (``--synthetic``), for audits and Turing tests.

    Returns (images, labels or None for an unconditional generator, provenance).

    Raises
    ------
    CommandError
        Its classes differ from the real slices', or (``translated_ok=False``, the
        audit) it holds real slices translated by a cyclegan run.
    """
    syn = SliceSet.load(path)
    if "translated" in syn.meta and not translated_ok:
        raise CommandError(f"--synthetic {path}: these are real patients' slices translated by a cyclegan run "
                           "(meta.translated), not synthetic ones; the audit's copying and membership checks would "
                           "compare patients with themselves, so it does not audit them")
    if syn.class_names != class_names:
        raise CommandError(f"--synthetic {path}: classes {syn.class_names} differ from the real slices' {class_names}")
    # `fedsynth sample` cycles labels for unconditional models too; their meta says so
    labels = syn.labels if syn.meta.get("conditional", True) else None
    where = {"synthetic_file": str(path), "synthetic_sha256": file_sha256(path)}
    if "translated" in syn.meta:  # `fedsynth translate`: real anatomy in another domain's contrast
        where["translated_by"] = json.dumps(syn.meta["translated"])
    return syn.images, labels, where


@user_errors
def sample(
    run_dir: Path = typer.Option(..., "--run", "-r", help="Run directory of a finished (or partial) run."),
    n: int = typer.Option(64, "--n", help="Number of synthetic slices."),
    label: str = typer.Option(None, help="Class to draw (a class name of the run); default: all classes in equal shares."),
    round_: str = typer.Option("last", "--round", help="Round whose global generator to use: a number, 'last', or 'best' (the lowest validation score)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    output_format: str = typer.Option("png", "--format", help="png (one file per slice plus grid.png), npz (a slice set marked synthetic), nifti (synthetic.nii.gz, one slice per axial position) or dicom (dicom/, a Secondary Capture series whose headers say SYNTHETIC)."),
    seed: int = typer.Option(0, help="Seed of the noise; the same seed gives the same images."),
    truncation: float = typer.Option(
        1.0, help="stylegan2-lite: pull each style towards its class's average (the truncation trick); "
        "below 1 trades diversity for typicality, e.g. 0.7. 1: off."),
    masks_path: Path = typer.Option(
        None, "--masks", help="pix2pix: draw one slice per mask in this file (a slice set from `fedsynth prepare "
        "--keep-masks`, e.g. this hospital's own, or an .npz with a 'masks' array); --n is ignored."),
    random_masks: bool = typer.Option(
        False, "--random-masks", help="pix2pix: draw --n masks from a simple shape model (ellipses of 1 to 4 label "
        "values of the run's data.mask-labels; reads no patient data), and a slice for each."),
) -> None:
    """Write synthetic slices from a run's global generator (the final round by default).

    pix2pix runs draw a slice for each mask (--masks or --random-masks) and write the
    masks with them."""
    if n < 1:
        raise CommandError("--n must be at least 1")
    if output_format not in ("png", "npz", "nifti", "dicom"):
        raise CommandError(f"--format {output_format!r}: use png, npz, nifti or dicom")
    if round_ not in ("last", "best") and not round_.isdigit():
        raise CommandError(f"--round {round_!r}: a round number, 'last' or 'best'")
    if not 0 < truncation <= 1:
        raise CommandError(f"--truncation {truncation}: use a value in (0, 1]")
    if (out / "manifest.json").exists():
        raise CommandError(f"{out} already holds a sample (manifest.json); choose another --out (nothing is overwritten)")
    if masks_path is not None and random_masks:
        raise CommandError("--masks and --random-masks: give one")
    run = RunDir(run_dir)
    masks = mask_source = None
    if masks_path is not None or random_masks:
        cfg = run.load_config()
        if masks_path is not None:
            masks, mask_source = load_masks(masks_path, cfg.data.image_size)
        else:
            masks = shape_masks(n, cfg.data.image_size, cfg.data.mask_values, seed=seed)
        n = len(masks)
    if output_format == "dicom" and masks is not None:
        raise CommandError("--format dicom: pix2pix samples come with masks, which fedsynth writes as png, npz or "
                           "nifti (no DICOM SEG writer)")
    images, labels, classes, used_round, conditional = sample_images(
        run, n=n, label=label, round_=round_, seed=seed, truncation=truncation, masks=masks,
    )
    if mask_source is not None and mask_source.class_names == tuple(classes):
        labels, conditional = mask_source.labels, True  # the masks' own classes (derived from the masks)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = run.checkpoint(used_round)
    provenance = {
        "synthetic": True,
        "run": str(run.root),
        "round": used_round,
        "checkpoint_sha256": file_sha256(checkpoint),
        "seed": seed,
        "truncation": truncation,
        "n": n,
        "label": label,
        "conditional": conditional,
    }
    if masks is not None:
        provenance["masks"] = str(masks_path) if masks_path is not None else "shape model (--random-masks)"
        provenance["masks_are_real"] = masks_path is not None
        provenance.pop("truncation")
        if masks_path is not None:
            console.print(f"[yellow]the masks are real patients' label maps from {masks_path} and are written "
                          "unchanged beside the slices: they are not synthetic, and a slice drawn for a training "
                          "patient's mask can resemble that patient's slice (see the audit's mask-conditioned "
                          "fidelity); keep this output where the masks may be[/]")
    names = [classes[i] if conditional else "unconditional" for i in labels]
    if output_format == "png" and masks is not None:
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            Image.fromarray(image).save(out / f"synthetic-{i:05d}.png")
            Image.fromarray(mask).save(out / f"synthetic-{i:05d}-mask.png")  # the label values themselves
        grid = paired_grid(masks, images, out / "grid.png", columns=min(8, n),
                           title=f"synthetic, round {used_round}: masks and their slices",
                           scale=max(1, 128 // images.shape[1]))
        written = f"{n} PNG slices with their masks (*-mask.png, label values) and {grid}"
    elif output_format == "png":
        for i, (image, name) in enumerate(zip(images, names, strict=True)):
            Image.fromarray(image).save(out / f"synthetic-{i:05d}-{name}.png")
        columns = min(16, n)
        grid = save_grid(images, out / "grid.png", columns=columns,
                         title=f"synthetic, round {used_round}" + (f", {label}" if label else ""),
                         scale=max(1, 128 // images.shape[1]))
        written = f"{n} PNG files and {grid}"
    elif output_format == "nifti":
        from ..shared.export import write_nifti_stack

        if (out / "synthetic.nii.gz").exists():
            raise CommandError(f"{out / 'synthetic.nii.gz'} already exists; choose another --out (nothing is overwritten)")
        path = write_nifti_stack(images, out / "synthetic.nii.gz",
                                 description=f"fedsynth round {used_round} seed {seed}")
        provenance["slice_labels"] = names
        written = f"{path} ({n} axial slices; class of each slice in manifest.json)"
        if masks is not None:
            mask_path = write_nifti_stack(masks, out / "synthetic-masks.nii.gz",
                                          description=f"fedsynth round {used_round} seed {seed} masks")
            written += f" and {mask_path} (their masks, same geometry)"
    elif output_format == "dicom":
        from ..shared.export import write_dicom_series

        folder = out / "dicom"
        if folder.exists() and any(folder.iterdir()):
            raise CommandError(f"{folder} already holds files; choose another --out (nothing is overwritten)")
        files = write_dicom_series(images, folder, labels=names, description=f"fedsynth round {used_round}",
                                   generator_info={k: provenance[k] for k in ("run", "round", "checkpoint_sha256",
                                                                               "seed")})
        provenance["slice_labels"] = names
        written = f"{len(files)} DICOM files in {folder} (one series, headers marked SYNTHETIC)"
    else:
        synthetic = SliceSet(
            images=images,
            labels=labels.astype(np.int64),
            class_names=tuple(classes),
            patient_ids=np.array([f"synthetic-{i:06d}" for i in range(n)]),
            split=np.full(n, SYNTHETIC),
            source=np.array([f"{checkpoint.name}#seed={seed}#{i}" for i in range(n)]),
            meta={**provenance, "patient_ids_known": False, "kind": "synthetic"},
            masks=masks,
        )
        path = synthetic.save(out / "synthetic.npz")
        written = str(path)
    (out / "manifest.json").write_text(json.dumps(provenance, indent=2))
    console.print(f"wrote {written} (round {used_round}{', ' + label if label else ''}); provenance in {out / 'manifest.json'}")
