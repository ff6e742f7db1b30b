"""Synthetic slices from a run's generator, written as files a user can open: PNG, a slice
set, NIfTI or DICOM marked as synthetic; and synthetic slice sets read back for audits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fedsynth.core.checkpoint import file_sha256
from fedsynth.core.errors import UserError
from fedsynth.core.files import write_json_atomic
from fedsynth.core.grids import paired_grid, save_grid
from fedsynth.data.sliceset import SYNTHETIC, SliceSet, SliceSetError
from fedsynth.runs.rundir import RunDir
from fedsynth.synthesis.export import write_dicom_series, write_nifti_stack
from fedsynth.synthesis.generator import load_generator

__all__ = ["Sample", "load_masks", "load_synthetic", "sample_images", "write_sample"]


def load_masks(path: Path, image_size: int) -> tuple[np.ndarray, SliceSet | None]:
    """Masks to draw pix2pix slices for: a slice set prepared with ``--keep-masks`` (its
    labels come along), or any ``.npz`` with a ``masks`` array (N, H, W) of label values.

    Raises
    ------
    UserError
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
            raise UserError(f"--masks {path}: not readable as .npz ({err})") from None
    if masks is None:
        raise UserError(
            f"--masks {path}: holds no masks (a slice set from `fedsynth prepare --keep-masks`, or an .npz "
            "with a 'masks' array)"
        )
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1:] != (image_size, image_size) or masks.min() < 0 or masks.max() > 255:
        raise UserError(
            f"--masks {path}: masks must be (N, {image_size}, {image_size}) label values 0-255 for this run, "
            f"got {masks.shape} {masks.dtype}"
        )
    return masks.astype(np.uint8), slices


def sample_images(
    run: RunDir,
    *,
    n: int,
    label: str | None,
    round_: int | str | None,
    seed: int,
    truncation: float = 1.0,
    masks: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str], int, bool]:
    """Draw ``n`` images from a run's generator (for pix2pix, one per mask in ``masks``).

    Returns (images, labels, class names, round used, conditional). Without a label,
    images cycle through the classes so each gets an equal share.

    Raises
    ------
    UserError
        What the run's family cannot draw: an unknown label, a label asked of an
        unconditional model, truncation asked of a model without it, masks missing for
        pix2pix (or given to another model), or a translating model.
    """
    loaded = load_generator(run, round_)
    drawn = loaded.family.sample(
        loaded.gen,
        loaded.cfg,
        n=n,
        label=label,
        seed=seed,
        truncation=truncation,
        masks=masks,
        where=run.root,
    )
    return drawn.images, drawn.labels, loaded.cfg.data.classes, loaded.round, drawn.conditional


def load_synthetic(
    path: Path, class_names: tuple[str, ...], *, translated_ok: bool = True
) -> tuple[np.ndarray, np.ndarray | None, dict[str, str]]:
    """Synthetic slices from a slice set file (``--synthetic``), for audits and Turing tests.

    Returns (images, labels or None for an unconditional generator, provenance).

    Raises
    ------
    UserError
        Its classes differ from the real slices', or (``translated_ok=False``, the
        audit) it holds real slices translated by a cyclegan run.
    """
    syn = SliceSet.load(path)
    if "translated" in syn.meta and not translated_ok:
        raise UserError(
            f"--synthetic {path}: these are real patients' slices translated by a cyclegan run "
            "(meta.translated), not synthetic ones; the audit's copying and membership checks would compare "
            "patients with themselves, so it does not audit them"
        )
    if syn.class_names != class_names:
        raise UserError(
            f"--synthetic {path}: classes {syn.class_names} differ from the real slices' {class_names}"
        )
    # `fedsynth sample` cycles labels for unconditional models too; their meta says so
    labels = syn.labels if syn.meta.get("conditional", True) else None
    where = {"synthetic_file": str(path), "synthetic_sha256": file_sha256(path)}
    if "translated" in syn.meta:  # `fedsynth translate`: real anatomy in another domain's contrast
        where["translated_by"] = json.dumps(syn.meta["translated"])
    return syn.images, labels, where


@dataclass(frozen=True)
class Sample:
    """What ``write_sample`` draws and writes, and from where."""

    run: RunDir
    n: int
    label: str | None
    round: str
    seed: int
    truncation: float = 1.0
    masks: np.ndarray | None = None  # pix2pix: one slice per mask
    masks_path: Path | None = None  # where the masks came from (None: the shape model)
    mask_source: SliceSet | None = None  # the slice set they came with, if any


def write_sample(request: Sample, out: Path, output_format: str) -> tuple[str, dict[str, object]]:
    """Draw the sample and write it to ``out`` as ``png`` (one file per slice and
    grid.png), ``npz`` (a slice set marked synthetic), ``nifti`` or ``dicom``, with its
    provenance in ``out/manifest.json``. Returns (what was written, in words; the provenance).

    Raises
    ------
    UserError
        What the family cannot draw, or a file that would be overwritten.
    """
    run, masks, masks_path, mask_source, label, seed = (
        request.run,
        request.masks,
        request.masks_path,
        request.mask_source,
        request.label,
        request.seed,
    )
    n = request.n
    images, labels, classes, used_round, conditional = sample_images(
        run,
        n=n,
        label=label,
        round_=request.round,
        seed=seed,
        truncation=request.truncation,
        masks=masks,
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
        "truncation": request.truncation,
        "n": n,
        "label": label,
        "conditional": conditional,
    }
    if masks is not None:
        provenance["masks"] = str(masks_path) if masks_path is not None else "shape model (--random-masks)"
        provenance["masks_are_real"] = masks_path is not None
        provenance.pop("truncation")
    names = [classes[i] if conditional else "unconditional" for i in labels]
    if output_format == "png" and masks is not None:
        for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
            Image.fromarray(image).save(out / f"synthetic-{i:05d}.png")
            Image.fromarray(mask).save(out / f"synthetic-{i:05d}-mask.png")  # the label values themselves
        grid = paired_grid(
            masks,
            images,
            out / "grid.png",
            columns=min(8, n),
            title=f"synthetic, round {used_round}: masks and their slices",
            scale=max(1, 128 // images.shape[1]),
        )
        written = f"{n} PNG slices with their masks (*-mask.png, label values) and {grid}"
    elif output_format == "png":
        for i, (image, name) in enumerate(zip(images, names, strict=True)):
            Image.fromarray(image).save(out / f"synthetic-{i:05d}-{name}.png")
        columns = min(16, n)
        grid = save_grid(
            images,
            out / "grid.png",
            columns=columns,
            title=f"synthetic, round {used_round}" + (f", {label}" if label else ""),
            scale=max(1, 128 // images.shape[1]),
        )
        written = f"{n} PNG files and {grid}"
    elif output_format == "nifti":
        if (out / "synthetic.nii.gz").exists():
            raise UserError(
                f"{out / 'synthetic.nii.gz'} already exists; choose another --out (nothing is overwritten)"
            )
        path = write_nifti_stack(
            images, out / "synthetic.nii.gz", description=f"fedsynth round {used_round} seed {seed}"
        )
        provenance["slice_labels"] = names
        written = f"{path} ({n} axial slices; class of each slice in manifest.json)"
        if masks is not None:
            mask_path = write_nifti_stack(
                masks,
                out / "synthetic-masks.nii.gz",
                description=f"fedsynth round {used_round} seed {seed} masks",
            )
            written += f" and {mask_path} (their masks, same geometry)"
    elif output_format == "dicom":
        folder = out / "dicom"
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"{folder} already holds files; choose another --out (nothing is overwritten)")
        files = write_dicom_series(
            images,
            folder,
            labels=names,
            description=f"fedsynth round {used_round}",
            generator_info={k: provenance[k] for k in ("run", "round", "checkpoint_sha256", "seed")},
        )
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
    write_json_atomic(out / "manifest.json", provenance)
    return written, provenance
