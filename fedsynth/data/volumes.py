"""Clinical volumes to slice sets: NIfTI files and DICOM series, with label masks.

Every volume, whichever format it came in, is brought to the same canonical orientation
(RAS, nibabel's closest canonical), cut into axial slices shown the radiological way,
windowed, resized with anti-aliasing, and labelled from its mask. A volume that cannot
be used is named in the data card with the reason and skipped; only a folder with
nothing usable is an error.

Mask pairing (first rule that matches):

* ``--masks DIR``: the file in DIR with the volume's name (an nnU-Net channel suffix
  ``_0000`` dropped), or ``segmentation-XXX`` for ``volume-XXX``; for a DICOM series, the
  NIfTI named after the series' folder (``DIR/<folder>.nii.gz``).
* Beside the volume: ``segmentation-XXX.nii[.gz]`` for ``volume-XXX.nii[.gz]`` (LiTS), or
  ``XXX_seg`` / ``XXX_mask`` / ``XXX_label`` / ``XXX_labels`` / ``XXX_segmentation``
  ``.nii[.gz]`` for ``XXX.nii[.gz]``; for a DICOM series in folder F, the same names built
  from F, next to F (``segmentation-F.nii.gz``, ``F_seg.nii.gz``, ...).
* For a DICOM series, a DICOM SEG in the folder that references it.

* nnU-Net / Decathlon layout: ``labelsTr/case.nii.gz`` for ``imagesTr/case_0000.nii.gz``.

``--pair VOLUME=MASK`` names a pair outright, before any rule. A NIfTI file whose name
has a seg/mask/label word in it, or that sits under a ``labels*`` / ``segmentations`` /
``masks`` folder, is taken as a mask, never as an image.

A NIfTI file is one patient, except that the channels of one nnU-Net case
(``case_0000``, ``case_0001``) are one patient; a DICOM series belongs to the patient in
its PatientID (hashed). Follow-up scans of one patient in differently named NIfTI files
count as different patients: name or group them so they do not.

Files named like masks that pair with no volume are reported, never taken as images.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedsynth.core.progress import Progress
from fedsynth.data.ingest import (
    NIFTI_SUFFIXES,
    DataCard,
    IngestError,
    axial_display,
    looks_like_dicom,
    parse_window,
    resize_square,
    window_intensities,
)
from fedsynth.data.sliceset import SliceSet, assign_split_by_patient

if TYPE_CHECKING:
    from fedsynth.data.dicom import DicomSeries

__all__ = ["MaskClasses", "find_volumes", "ingest_volumes", "parse_mask_classes"]

log = logging.getLogger(__name__)

_LITS_VOLUME = re.compile(r"^volume-(?P<key>.+)$")
_MASK_SUFFIXES = ("_seg", "_mask", "_label", "_labels", "_segmentation")
# Affines of a volume and its mask may differ by rounding in the converter that wrote
# them; more than this (mm) is a different grid.
AFFINE_TOLERANCE_MM = 0.05


@dataclass(frozen=True)
class MaskClasses:
    """How a slice's mask becomes its class.

    ``groups`` are (class name, mask values) in priority order; a slice takes the first
    class that has at least ``min_voxels`` voxels with one of its values, else class 0,
    ``background``.
    """

    background: str
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    min_voxels: int = 1

    @property
    def names(self) -> tuple[str, ...]:
        return (self.background, *(name for name, _ in self.groups))

    def label(self, mask_slice: np.ndarray) -> int:
        for k, (_, values) in enumerate(self.groups, start=1):
            if np.isin(mask_slice, values).sum() >= self.min_voxels:
                return k
        return 0

    def describe(self) -> str:
        rules = "; ".join(
            f"'{name}' when >= {self.min_voxels} voxel(s) carry {'/'.join(map(str, values))}"
            for name, values in self.groups
        )
        order = " (first match wins, in this order)" if len(self.groups) > 1 else ""
        return f"slice labels from the mask: {rules}{order}; else '{self.background}'"


def _first_seg_mask(path: Path, series: DicomSeries) -> np.ndarray:
    """A DICOM SEG's label map on its series' grid."""
    from fedsynth.data.dicom import load_dicom_seg

    return load_dicom_seg(path, series)[0]


def parse_mask_classes(spec: str, label_names: Sequence[str] = (), min_voxels: int = 1) -> MaskClasses | None:
    """``--label-from-mask`` text to :class:`MaskClasses`.

    ``5`` or ``2,3`` is one class (present when any of the values is), named by
    ``label_names`` (absent, present); ``liver=5,kidney=2+3`` are named classes with
    ``label_names`` (one name) naming the slices with none of them (default ``none``).

    Raises
    ------
    IngestError
        Text that is neither form, or names that do not fit it.
    """
    spec = spec.strip()
    if not spec:
        return None
    if min_voxels < 1:
        raise IngestError(f"--min-voxels {min_voxels}: must be at least 1")
    try:
        if "=" in spec:
            groups = []
            for part in spec.split(","):
                name, _, group_values = part.partition("=")
                if not name.strip() or not group_values.strip():
                    raise ValueError(part)
                groups.append((name.strip(), tuple(int(v) for v in group_values.split("+"))))
            names = list(label_names)
            if len(names) > 1:
                raise IngestError(
                    "--label-names: with named mask classes give one name, for slices with none of them "
                    "(e.g. --label-names background)"
                )
            return MaskClasses(
                background=names[0] if names else "none", groups=tuple(groups), min_voxels=min_voxels
            )
        values = tuple(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise IngestError(
            f"--label-from-mask {spec!r}: expected mask values such as 5 or 2,3, or named classes such as "
            "liver=5,kidney=2+3"
        ) from None
    names = list(label_names) or ["absent", "present"]
    if len(names) != 2:
        raise IngestError("--label-names: give two names, for absent and present, e.g. healthy,tumour")
    return MaskClasses(background=names[0], groups=((names[1], values),), min_voxels=min_voxels)


# --- finding volumes and their masks -----------------------------------------------------
@dataclass
class _Volume:
    """One volume to ingest, from a NIfTI file or a DICOM series."""

    name: str  # shown to the user and used in slice sources, relative to the root
    path: Path  # the file, or the series' folder
    patient: str  # privacy unit id
    site: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]  # -> (volume RAS float32, affine)
    mask_path: Path | None = None  # a NIfTI label map
    load_mask: Callable[[], np.ndarray] | None = None  # a DICOM SEG, already on the volume's grid
    kind: str = "nifti"


def _strip_nifti(name: str) -> str:
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


_MASK_TOKENS = {"seg", "segmentation", "mask", "label", "labels", "labelmap"}


def _looks_like_mask(stem: str) -> bool:
    """``segmentation-XXX``, or a name with a seg/mask/label word in it (``XXX_seg``,
    ``example_seg_mr``): never ingested as an image."""
    return stem.startswith("segmentation-") or bool(_MASK_TOKENS & set(re.split(r"[-_.\s]+", stem.lower())))


_MASK_FOLDERS = {
    "labels",
    "labelstr",
    "labelsts",
    "label",
    "segmentations",
    "segmentation",
    "segs",
    "seg",
    "masks",
    "mask",
    "labelmaps",
}
_CHANNEL = re.compile(r"_\d{4}$")  # nnU-Net channel suffix: case_001_0000 is channel 0 of case_001


def _in_mask_folder(rel: Path) -> bool:
    """A file under a folder named labels*/segmentations/masks/... is a mask."""
    return any(part.lower() in _MASK_FOLDERS or part.lower().startswith("labels") for part in rel.parts[:-1])


def _sibling_mask_folders(folder: Path) -> list[Path]:
    """``imagesTr`` -> ``labelsTr`` (nnU-Net / Medical Segmentation Decathlon layout)."""
    name = folder.name
    if name.lower().startswith("images"):
        return [folder.with_name("labels" + name[len("images") :])]
    return []


def _mask_candidates(stem: str) -> list[str]:
    """Mask file stems that pair with a volume stem."""
    names = []
    match = _LITS_VOLUME.match(stem)
    if match:
        names.append(f"segmentation-{match.group('key')}")
    names.append(f"segmentation-{stem}")
    names += [stem + suffix for suffix in _MASK_SUFFIXES]
    return names


def _find_file(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in NIFTI_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _load_nifti(path: Path) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        import nibabel as nib

        try:
            image = nib.as_closest_canonical(nib.load(path))
            return np.asarray(image.dataobj, dtype=np.float32), image.affine
        except (nib.filebasedimages.ImageFileError, EOFError, OSError, ValueError) as err:
            raise IngestError(f"not a readable NIfTI file: {_nifti_problem(path, err)}") from None

    return load


def _nifti_problem(path: Path, err: Exception) -> str:
    """Say *why* nibabel could not read a file: a truncated .gz is the usual case."""
    if path.name.endswith(".gz"):
        import gzip
        import zlib

        try:
            with gzip.open(path) as handle:
                while handle.read(1 << 20):
                    pass
        except (EOFError, OSError, zlib.error) as gz_err:
            return f"damaged or truncated gzip ({gz_err})"
    return str(err).replace(str(path), path.name).split("\n")[0]


def _has_dicom(root: Path) -> bool:
    return any(p.is_file() and (p.suffix.lower() == ".dcm" or looks_like_dicom(p)) for p in root.rglob("*"))


def find_volumes(
    root: Path,
    masks_dir: Path | None = None,
    pairs: dict[str, str] | None = None,
) -> tuple[list[_Volume], list[dict[str, str]]]:
    """Every NIfTI volume and DICOM series under ``root``, paired with its mask.

    ``pairs`` maps a volume (file, or a DICOM series' folder, relative to ``root``) to
    its mask (relative to ``root`` or absolute), before any naming rule.

    Returns the volumes, and what was found on the way: problems (orphan masks, broken
    DICOM files) as ``{"file", "reason"}``, and remarks for the data card (a series with
    no patient identity, several SEGs for one series) as ``{"note"}``.
    """
    explicit = {
        str(Path(k)): (root / v if not Path(v).is_absolute() else Path(v)) for k, v in (pairs or {}).items()
    }
    for volume, pair_mask in explicit.items():
        if not (root / volume).exists():
            raise IngestError(f"--pair {volume}={pair_mask}: no {volume} in {root}")
        if not pair_mask.is_file():
            raise IngestError(f"--pair {volume}={pair_mask}: no such mask file")
    problems: list[dict[str, str]] = []
    problems_notes: list[str] = []
    volumes: list[_Volume] = []
    used_masks: set[Path] = set()
    nifti = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name.endswith(NIFTI_SUFFIXES)
        and not (masks_dir and masks_dir.resolve() in p.resolve().parents)
    )
    explicit_masks = {m.resolve() for m in explicit.values()}
    for path in nifti:
        stem = _strip_nifti(path.name)
        rel = path.relative_to(root)
        if _looks_like_mask(stem) or _in_mask_folder(rel) or path.resolve() in explicit_masks:
            continue
        mask: Path | None = explicit.get(str(rel))
        case = _CHANNEL.sub("", stem)
        if mask is None and masks_dir is not None:
            mask = _find_file(masks_dir, [stem, case, *_mask_candidates(stem)])
        mask = mask or _find_file(path.parent, _mask_candidates(stem))
        for folder in _sibling_mask_folders(path.parent):
            mask = mask or _find_file(folder, [case, stem])
        if mask is not None:
            used_masks.add(mask.resolve())
        volumes.append(
            _Volume(
                name=str(rel),
                path=path,
                patient=str(rel.parent / case),  # channels of one case: one patient
                site=rel.parts[0] if len(rel.parts) > 1 else "",
                load=_load_nifti(path),
                mask_path=mask,
            )
        )
    if _has_dicom(root):
        from fedsynth.data.dicom import find_dicom_series, load_dicom_series

        series_list, dicom_problems = find_dicom_series(root)
        problems += dicom_problems
        per_folder: dict[Path, int] = {}
        for series in series_list:
            for parent in {f.parent for f in series.files}:
                per_folder[parent] = per_folder.get(parent, 0) + 1
        for series in series_list:
            folders = {f.parent for f in series.files}
            folder = folders.pop() if len(folders) == 1 else root
            shared_folder = per_folder.get(folder, 0) > 1  # a folder's mask cannot say which series it is for
            rel = folder.relative_to(root) if folder != root else Path(".")
            label = f"{rel}/ (DICOM series {series.description or series.uid})"
            mask = explicit.get(str(rel)) if not shared_folder else None
            if mask is None and folder != root and not shared_folder:
                if masks_dir is not None:
                    mask = _find_file(masks_dir, [folder.name, *_mask_candidates(folder.name)])
                mask = mask or _find_file(folder.parent, _mask_candidates(folder.name))
            if mask is not None:
                used_masks.add(mask.resolve())
            load_mask = None
            if mask is None and series.seg_files:
                seg_path = series.seg_files[0]
                load_mask = functools.partial(_first_seg_mask, seg_path, series)
            if not series.patient_known:
                problems_notes.append(
                    f"{label}: no PatientID or StudyInstanceUID; counted as its own patient"
                )
            if len(series.seg_files) > 1:
                problems_notes.append(
                    f"{label}: {len(series.seg_files)} DICOM SEG files; used {series.seg_files[0]}"
                )
            volumes.append(
                _Volume(
                    name=label,
                    path=folder,
                    kind="dicom",
                    patient=series.patient_key if series.patient_known else f"{rel}:{series.uid}",
                    site=rel.parts[0] if len(rel.parts) > 1 else "",
                    load=functools.partial(load_dicom_series, series),
                    mask_path=mask,
                    load_mask=load_mask,
                )
            )
    for path in nifti:
        is_mask = _looks_like_mask(_strip_nifti(path.name)) or _in_mask_folder(path.relative_to(root))
        if is_mask and path.resolve() not in used_masks:
            problems.append(
                {
                    "file": str(path),
                    "reason": "named like a mask but pairs with no volume "
                    "(see the pairing rules in `fedsynth prepare --help`)",
                }
            )
    return volumes, problems + [{"note": note} for note in problems_notes]


# --- ingestion ---------------------------------------------------------------------------
def _load_mask(volume: _Volume, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray | None:
    if volume.load_mask is not None:
        mask = np.asarray(volume.load_mask()).astype(np.int32)
        if mask.shape != shape:
            raise IngestError(f"DICOM SEG does not cover the series (shape {mask.shape} vs {shape})")
        return mask
    if volume.mask_path is None:
        return None
    import nibabel as nib

    mask_img = nib.as_closest_canonical(nib.load(volume.mask_path))
    mask = np.asarray(mask_img.dataobj)
    if mask.ndim == 4 and mask.shape[3] == 1:
        mask = mask[..., 0]
    if mask.shape != shape:
        raise IngestError(f"mask {volume.mask_path.name} has shape {mask.shape}, the volume {shape}")
    if not np.allclose(mask_img.affine, affine, atol=AFFINE_TOLERANCE_MM):
        raise IngestError(
            f"mask {volume.mask_path.name} is on a different grid than the volume (affines differ by up to "
            f"{np.abs(mask_img.affine - affine).max():.3g} mm)"
        )
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise IngestError(f"mask {volume.mask_path.name} contains NaN values")
    return mask.astype(np.int32)


def ingest_volumes(
    root: str | Path,
    *,
    size: int,
    window: str = "ct-abdomen",
    classes: MaskClasses | None = None,
    keep_slices_with: Sequence[int] = (),
    masks_dir: str | Path | None = None,
    pairs: dict[str, str] | None = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    progress: Progress | None = None,
    keep_masks: bool = False,
) -> tuple[SliceSet, DataCard]:
    """Slice NIfTI volumes and DICOM series (with masks) into a labelled slice set.

    ``keep_masks`` stores each slice's label map beside it (same orientation and size,
    resized by nearest neighbour); a volume without a mask is then skipped, named.

    A volume is a patient (DICOM: the hashed PatientID and study, so several series of
    one patient are one privacy unit); its site is the sub-folder it sits in (if any).

    Raises
    ------
    IngestError
        Bad options, or no usable volume.
    """
    root = Path(root)
    if not root.is_dir():
        raise IngestError(f"{root}: no such folder")
    masks = Path(masks_dir) if masks_dir else None
    if masks is not None and not masks.is_dir():
        raise IngestError(f"--masks {masks}: no such folder")
    window_range = parse_window(window)
    names = list(classes.names) if classes else ["slice"]
    started = time.perf_counter()
    volumes, found = find_volumes(root, masks, pairs)
    problems = [p for p in found if "file" in p]
    kinds = sorted({v.kind for v in volumes})
    card = DataCard(
        source=str(root),
        kind="+".join(kinds) or "volumes",
        files_found=len(volumes),
        unreadable=list(problems),
        notes=[p["note"] for p in found if "note" in p],
    )
    if not volumes:
        raise IngestError(
            f"{root}: no NIfTI volumes or DICOM series found"
            + (
                f" ({len(problems)} unreadable file(s), e.g. {problems[0]['file']}: {problems[0]['reason']})"
                if problems
                else ""
            )
        )
    needs_mask = bool(classes or keep_slices_with or keep_masks)
    images, labels, patients, sources, sites, label_maps = [], [], [], [], [], []
    for done, volume in enumerate(volumes, start=1):
        try:
            if needs_mask and volume.mask_path is None and volume.load_mask is None:
                raise IngestError(
                    "no mask pairs with it, and labels, --keep-slices-with or --keep-masks need one"
                )
            data, affine = volume.load()
            if data.ndim == 4 and data.shape[3] == 1:
                data = data[..., 0]
            if data.ndim != 3:
                raise IngestError(f"expected a 3D volume, got shape {data.shape}")
            if not np.isfinite(data).all():
                raise IngestError("volume contains NaN or infinite values")
            mask = _load_mask(volume, data.shape, affine) if needs_mask else None
            if keep_masks and (mask is None or mask.min() < 0 or mask.max() > 255):
                raise IngestError("--keep-masks: no mask, or mask labels outside 0..255")
        except Exception as err:  # noqa: BLE001 - any unusable volume is named and skipped
            reason = str(err).strip().split("\n")[0] or type(err).__name__
            card.unreadable.append({"file": str(volume.path), "reason": reason})
            log.info("%s: skipped (%s)", volume.path, reason)  # listed in the card
            if progress:
                progress(done, len(volumes))
            continue
        card.files_read += 1
        windowed = window_intensities(data, window_range)
        for k in range(data.shape[2]):
            if mask is not None and keep_slices_with and not np.isin(mask[:, :, k], keep_slices_with).any():
                continue
            images.append(resize_square(axial_display(windowed[:, :, k]), size))
            if keep_masks and mask is not None:  # checked above: every volume kept has one
                label_maps.append(
                    resize_square(axial_display(mask[:, :, k]).astype(np.uint8), size, nearest=True)
                )
            labels.append(classes.label(mask[:, :, k]) if classes and mask is not None else 0)
            patients.append(volume.patient)
            sources.append(f"{volume.name}#z={k}")
            sites.append(volume.site)
        if progress:
            progress(done, len(volumes))
    if not images:
        raise IngestError(
            f"{root}: no usable slices in {len(volumes)} volume(s)"
            + (
                f"; first problem: {card.unreadable[0]['file']}: {card.unreadable[0]['reason']}"
                if card.unreadable
                else ""
            )
        )
    labels_arr = np.array(labels, dtype=np.int64)
    patients_arr = np.array(patients)
    split = assign_split_by_patient(patients_arr, labels_arr, holdout_fraction=holdout_fraction, seed=seed)
    window_text = (
        "per-volume 0.5-99.5 percentile window"
        if window_range is None
        else f"window {window} (W{window_range[0]:g}/L{window_range[1]:g})"
    )
    card.preprocessing = [
        "reoriented to RAS (closest canonical); axial slices in radiological display",
        "DICOM: slices ordered by position along the slice normal, RescaleSlope/Intercept applied",
        window_text,
        f"padded to a centred square, resized to {size}x{size} (Lanczos, anti-aliased)",
    ]
    if "dicom" not in kinds:
        card.preprocessing.pop(1)
    if classes:
        card.preprocessing.append(classes.describe())
    if keep_masks:
        card.preprocessing.append("each slice's label map kept (masks), resized by nearest neighbour")
    if keep_slices_with:
        card.preprocessing.append(
            f"kept only slices whose mask contains label(s) {', '.join(map(str, keep_slices_with))}"
        )
    card.split_rule = f"{holdout_fraction:.0%} of patients (volumes) held out, stratified, seed {seed}"
    seconds = time.perf_counter() - started
    card.notes.append(
        f"read {len(images)} slices from {card.files_read} volume(s) in {seconds:.1f} s "
        f"({len(images) / max(seconds, 1e-9):.0f} slices/s)"
    )
    slices = SliceSet(
        images=np.stack(images),
        labels=labels_arr,
        class_names=tuple(names),
        patient_ids=patients_arr,
        split=split,
        source=np.array(sources),
        site=np.array(sites) if any(sites) else None,
        meta={
            "kind": card.kind,
            "source_root": str(root),
            "patient_ids_known": True,
            "preprocessing": card.preprocessing,
        },
        masks=np.stack(label_maps) if keep_masks else None,
    )
    card.fill_from(slices)
    return slices, card
