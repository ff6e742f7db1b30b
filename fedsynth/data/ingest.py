"""Raw scans to slice sets: image folders here, the shared image steps and the data card.
Volumes (NIfTI, DICOM) are in ``volumes.py``."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedsynth.core.files import write_json_atomic
from fedsynth.core.progress import Progress
from fedsynth.data.sliceset import (
    HOLDOUT,
    TRAIN,
    VALIDATION,
    SliceSet,
    assign_split_by_patient,
)
from fedsynth.metrics.copies import CopyDetector

__all__ = [
    "NEAR_DUPLICATE_RMS",
    "IMAGE_SUFFIXES",
    "WINDOW_PRESETS",
    "DataCard",
    "IngestError",
    "axial_display",
    "detect_source_kind",
    "ingest_image_folder",
    "looks_like_dicom",
    "parse_window",
    "resize_square",
    "window_intensities",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# the copy detector's distance (RMS share of the intensity range, after undoing mirror,
# rotation, zoom, shift and intensity curve) below which two images are one: in the brain MRI
# folder, resized, re-cropped and re-windowed copies of one slice fall below it, neighbouring
# slices of one scan mostly above (seen on the holdout's closest pairs to train)
NEAR_DUPLICATE_RMS = 0.006
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Window presets as (width, level) in HU; "mri" is a per-volume percentile window.
WINDOW_PRESETS: dict[str, tuple[float, float] | None] = {
    "ct-abdomen": (400.0, 40.0),
    "ct-lung": (1500.0, -600.0),
    "ct-brain": (80.0, 40.0),
    "mri": None,
}


class IngestError(ValueError):
    """Input that cannot become a slice set at all (nothing usable, bad options)."""


@dataclass
class DataCard:
    """What went into a slice set and what was left out, for the people who use it."""

    source: str
    kind: str
    output: str = ""
    files_found: int = 0
    files_read: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)
    duplicates: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    image_size: int = 0
    images_per_class: dict[str, int] = field(default_factory=dict)
    split: dict[str, dict[str, int]] = field(default_factory=dict)
    split_rule: str = ""
    patient_ids_known: bool = False
    privacy_unit: str = "slice"
    sites: dict[str, int] = field(default_factory=dict)
    preprocessing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> Path:
        """Write the card as JSON (atomically)."""
        path = Path(path)
        write_json_atomic(path, self.to_dict())
        return path

    def fill_from(self, slices: SliceSet) -> None:
        """Counts that follow from the finished slice set."""
        self.images = len(slices)
        self.image_size = slices.image_size
        self.images_per_class = slices.class_counts()
        self.patient_ids_known = slices.patient_ids_known
        self.privacy_unit = slices.privacy_unit
        self.split = {}
        for name in (TRAIN, VALIDATION, HOLDOUT):
            part = slices.only(name)
            if name == VALIDATION and not len(part):
                continue
            self.split[name] = {
                "slices": len(part),
                "patients": int(len(np.unique(part.patient_ids))),
                **{f"class:{k}": v for k, v in part.class_counts().items()},
            }
        if slices.site is not None:
            sites, counts = np.unique(slices.site, return_counts=True)
            self.sites = {str(s): int(c) for s, c in zip(sites, counts, strict=True)}


# --- shared image steps -----------------------------------------------------------------
def resize_square(image: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
    """Pad a 2D uint8 image to a centred square (black border), then resize with
    anti-aliasing (Lanczos) to ``size`` x ``size``, or by nearest neighbour for a label
    map (``nearest``: no value is invented between labels). Aspect ratio is kept."""
    h, w = image.shape
    side = max(h, w)
    if h != w:
        canvas = np.zeros((side, side), dtype=image.dtype)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = image
        image = canvas
    if side == size:
        return image.copy()
    return np.asarray(
        Image.fromarray(image).resize(
            (size, size), Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
        ),
        dtype=np.uint8,
    )


def parse_window(spec: str) -> tuple[float, float] | None:
    """A preset name or ``W,L``; returns (width, level), or None for the MRI percentile window.

    Raises
    ------
    IngestError
        Unknown preset or malformed ``W,L``.
    """
    if spec in WINDOW_PRESETS:
        return WINDOW_PRESETS[spec]
    match = re.fullmatch(r"\s*([0-9.]+)\s*,\s*(-?[0-9.]+)\s*", spec)
    if not match or float(match.group(1)) <= 0:
        presets = ", ".join(WINDOW_PRESETS)
        raise IngestError(f"--window {spec!r}: use a preset ({presets}) or WIDTH,LEVEL")
    return float(match.group(1)), float(match.group(2))


def window_intensities(volume: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Map intensities to uint8: a CT window (width, level) in HU, or, for None, the
    volume's own 0.5-99.5 percentile range (MRI has no absolute scale)."""
    volume = volume.astype(np.float32)
    if window is None:
        lo, hi = np.percentile(volume, [0.5, 99.5])
    else:
        width, level = window
        lo, hi = level - width / 2, level + width / 2
    if hi <= lo:
        return np.zeros(volume.shape, dtype=np.uint8)
    scaled = (np.clip(volume, lo, hi) - lo) / (hi - lo) * 255.0
    return np.round(scaled).astype(np.uint8)


def axial_display(slice_xy: np.ndarray) -> np.ndarray:
    """An axial slice of a RAS volume (indexed x, y) in radiological display:
    anterior at the top, the patient's right on the image's left."""
    return slice_xy.T[::-1, ::-1]


def detect_source_kind(root: Path) -> str:
    """``volumes`` if the folder holds NIfTI files or DICOM, ``image-folder`` if it holds
    images.

    Raises
    ------
    IngestError
        The folder is missing or holds neither.
    """
    if not root.is_dir():
        raise IngestError(f"{root}: no such folder")
    has_images = False
    for path in root.rglob("*"):
        name = path.name.lower()
        if name.endswith(NIFTI_SUFFIXES) or name.endswith(".dcm"):
            return "volumes"
        if path.is_file() and not name.endswith(IMAGE_SUFFIXES) and looks_like_dicom(path):
            return "volumes"
        has_images = has_images or name.endswith(IMAGE_SUFFIXES)
    if has_images:
        return "image-folder"
    raise IngestError(
        f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}), NIfTI volumes (.nii, .nii.gz) or DICOM files found"
    )


def looks_like_dicom(path: Path) -> bool:
    """The DICOM Part 10 preamble: 'DICM' at byte 128."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


# --- image folders ----------------------------------------------------------------------
def _list_image_folder(root: Path) -> list[tuple[Path, str, str]]:
    """(file, class, folder split) for ``<split>/<class>/*`` or ``<class>/*`` layouts."""
    entries: list[tuple[Path, str, str]] = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or not path.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        parts = path.relative_to(root).parts
        if len(parts) == 2:
            entries.append((path, parts[0], ""))
        elif len(parts) == 3:
            entries.append((path, parts[1], parts[0]))
        else:
            raise IngestError(f"{path}: expected <class>/<image> or <split>/<class>/<image> under {root}")
    return entries


def _decode_gray(path: Path) -> np.ndarray:
    """Decode any 8/16-bit or RGB image to 2D uint8 grayscale."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            return np.round(scaled).astype(np.uint8)
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _groups(keys: Sequence[str]) -> list[list[int]]:
    members: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        members[key].append(i)
    return [idx for idx in members.values() if len(idx) > 1]


def ingest_image_folder(
    root: str | Path,
    *,
    size: int,
    holdout_fraction: float = 0.2,
    keep_folder_split: bool = False,
    seed: int = 0,
    near_duplicate_rms: float = NEAR_DUPLICATE_RMS,
    deduplicate: bool = True,
    progress: Progress | None = None,
) -> tuple[SliceSet, DataCard]:
    """Read ``<split>/<class>/*.jpg|png`` (or ``<class>/*``) into a de-duplicated slice set.

    Images are decoded to grayscale, de-duplicated by decoded pixels (the first file in
    path order is kept), then near-duplicates (re-encoded, resized, re-cropped, mirrored or
    re-windowed copies, found by the copy detector) are removed,
    padded to square and resized. With no patient ids in an image folder each image is
    its own patient, and the card says so. A duplicate left on both sides of the split
    would make an honest generator look like it copies in the audit.

    Parameters
    ----------
    root : the folder.
    size : output side in pixels.
    holdout_fraction : share of patients held out (stratified by class).
    keep_folder_split : use the folder's own split (a folder named like test/testing/
        holdout/val becomes holdout) instead of drawing one.
    seed : seed of the split.
    near_duplicate_rms : two images closer than this by the copy detector (RMS share of
        the intensity range once a mirror, rotation, zoom, shift or intensity curve is
        undone) are one image; 0 keeps near-duplicates.
    deduplicate : False keeps every duplicate (they are still counted on the card); only
        for showing what duplicates do to an audit.
    progress : called with (done, total) while decoding.

    Raises
    ------
    IngestError
        No readable image.
    """
    root = Path(root)
    entries = _list_image_folder(root)
    card = DataCard(source=str(root), kind="image-folder", files_found=len(entries))
    if not entries:
        raise IngestError(f"{root}: no image files found")
    pixels: list[np.ndarray] = []
    kept: list[tuple[Path, str, str]] = []
    byte_keys: list[str] = []
    pixel_keys: list[str] = []
    for done, (path, cls, folder_split) in enumerate(entries, start=1):
        try:
            raw = path.read_bytes()
            gray = _decode_gray(path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            reason = str(err).split("\n")[0] or type(err).__name__
            card.unreadable.append({"file": str(path), "reason": reason})
            log.warning("%s: unreadable, skipped (%s)", path, reason)
        else:
            byte_keys.append(hashlib.blake2b(raw, digest_size=16).hexdigest())
            digest = hashlib.blake2b(gray.tobytes(), digest_size=16)
            digest.update(str(gray.shape).encode())
            pixel_keys.append(digest.hexdigest())
            pixels.append(gray)
            kept.append((path, cls, folder_split))
        if progress:
            progress(done, len(entries))
    card.files_read = len(kept)
    if not kept:
        raise IngestError(f"{root}: none of the {len(entries)} image files could be read")

    def crossing(groups: list[list[int]]) -> int:
        return sum(1 for g in groups if len({kept[i][2] for i in g}) > 1)

    byte_groups, pixel_groups = _groups(byte_keys), _groups(pixel_keys)
    drop: set[int] = set()
    removed: list[dict[str, Any]] = []
    conflicts = 0
    for group in pixel_groups:
        keep, rest = group[0], group[1:]
        drop.update(rest)
        group_classes = {kept[i][1] for i in group}
        conflicts += len(group_classes) > 1
        removed.append(
            {
                "kept": str(kept[keep][0]),
                "removed": [str(kept[i][0]) for i in rest],
                "classes": sorted(group_classes),
            }
        )
    card.duplicates = {
        "rule": "identical decoded grayscale pixels; the first file in path order is kept",
        "byte_identical_groups": len(byte_groups),
        "byte_identical_groups_crossing_split": crossing(byte_groups),
        "pixel_identical_groups": len(pixel_groups),
        "pixel_identical_groups_crossing_split": crossing(pixel_groups),
        "groups_with_conflicting_classes": conflicts,
        "files_removed": len(drop),
        "groups": removed,
    }
    if not deduplicate:
        drop.clear()
        card.duplicates["files_removed"] = 0
    keep_idx = [i for i in range(len(kept)) if i not in drop]
    if near_duplicate_rms > 0 and deduplicate:
        keep_idx = _drop_near_duplicates(keep_idx, pixels, kept, near_duplicate_rms, card)
    classes = sorted({kept[i][1] for i in keep_idx})
    images = np.stack([resize_square(pixels[i], size) for i in keep_idx])
    labels = np.array([classes.index(kept[i][1]) for i in keep_idx], dtype=np.int64)
    sources = np.array([str(kept[i][0].relative_to(root)) for i in keep_idx])
    patient_ids = np.array([f"img-{i:06d}" for i in range(len(keep_idx))])
    if keep_folder_split:
        split = np.array([_folder_split(kept[i][2]) for i in keep_idx])
        card.split_rule = "the folder's own split (test/testing/holdout/val folders are holdout)"
    else:
        split = assign_split_by_patient(patient_ids, labels, holdout_fraction=holdout_fraction, seed=seed)
        card.split_rule = f"{holdout_fraction:.0%} of patients held out, stratified by class, seed {seed}"
    card.preprocessing = [
        "decoded to 8-bit grayscale (RGB by ITU-R 601 luma; 16-bit rescaled min-max)",
        f"padded to a centred square, resized to {size}x{size} (Lanczos, anti-aliased)",
    ]
    card.notes.append(
        "No patient identifiers in an image folder: each image is treated as its own patient, so slices of "
        "one patient may sit in both train and holdout, and the privacy unit is the slice."
    )
    slices = SliceSet(
        images=images,
        labels=labels,
        class_names=tuple(classes),
        patient_ids=patient_ids,
        split=split,
        source=sources,
        meta={
            "kind": "image-folder",
            "source_root": str(root),
            "patient_ids_known": False,
            "preprocessing": card.preprocessing,
        },
    )
    card.fill_from(slices)
    return slices, card


def _drop_near_duplicates(
    keep_idx: list[int],
    pixels: list[np.ndarray],
    kept: list[tuple[Path, str, str]],
    rms: float,
    card: DataCard,
) -> list[int]:
    """Remove images within ``rms`` of a kept image by the copy detector's distance (a
    resized, re-cropped, mirrored, turned or re-windowed copy is one image with its
    original: left in on both sides of the split, it would make an honest generator look
    like it copies).

    Images are taken in path order; one is dropped only when its nearest other image is
    within ``rms``, comes earlier and stays (so a chain A~B~C of gradually changing slices never drops C
    for being near B); images whose nearest image was dropped look again among the rest,
    until no two remaining images are within ``rms``.
    """
    if len(keep_idx) < 2:
        return keep_idx
    detector = CopyDetector()
    index = detector.index(np.stack([resize_square(pixels[i], 64) for i in keep_idx]))
    everyone = np.arange(len(keep_idx))
    matches = detector.nearest(index, index, exclude=everyone)
    nearest_d, nearest_i = matches.distance.copy(), matches.index.copy()
    stays = set(range(len(keep_idx)))
    parent: dict[int, int] = {}  # a removed image -> the image it duplicates
    while True:
        dropped = []
        for a in sorted(stays):  # path order
            twin = int(nearest_i[a])
            kept_for = a in parent.values()  # an image others were removed for stays
            if nearest_d[a] < rms and twin < a and twin in stays and twin not in parent and not kept_for:
                dropped.append(a)
                parent[a] = twin
        if not dropped:
            break
        stays -= set(dropped)
        # a survivor whose nearest image was dropped looks again, among the survivors
        again = np.array([a for a in sorted(stays) if int(nearest_i[a]) not in stays], dtype=np.int64)
        survivors = np.array(sorted(stays), dtype=np.int64)
        if len(again) == 0 or len(survivors) < 2:
            break
        position = {int(a): j for j, a in enumerate(survivors)}
        found = detector.nearest(
            index.subset(again), index.subset(survivors), exclude=np.array([position[int(a)] for a in again])
        )
        nearest_d[again], nearest_i[again] = found.distance, survivors[found.index]
    groups: dict[int, list[int]] = defaultdict(list)
    for a in sorted(parent):
        keeper = parent[a]
        while keeper in parent:  # its twin was removed in a later pass
            keeper = parent[keeper]
        groups[keeper].append(a)
    card.duplicates["near_duplicate_rule"] = (
        f"less than {rms:.1%} RMS of the intensity range from a kept image once a mirror, rotation, zoom, "
        "shift or intensity curve is undone (the audit's copy detector, at 64x64); the first file in path "
        "order is kept"
    )
    card.duplicates["near_duplicate_groups"] = len(groups)
    card.duplicates["near_duplicate_groups_crossing_split"] = sum(
        1 for k, rest in groups.items() if len({kept[keep_idx[m]][2] for m in [k, *rest]}) > 1
    )
    removed = sum(len(rest) for rest in groups.values())
    card.duplicates["near_duplicate_files_removed"] = removed
    card.duplicates["near_duplicates"] = [
        {"kept": str(kept[keep_idx[k]][0]), "removed": [str(kept[keep_idx[m]][0]) for m in rest]}
        for k, rest in groups.items()
    ]
    if removed:
        log.info("removed %d near-duplicate images in %d groups", removed, len(groups))
    return [i for a, i in enumerate(keep_idx) if a in stays]


def _folder_split(name: str) -> str:
    return HOLDOUT if name.lower() in {"test", "testing", "holdout", "val", "validation"} else TRAIN


def summarize_unreadable(card: DataCard, limit: int = 10) -> Iterable[str]:
    """One line per unreadable file, at most ``limit`` of them."""
    for item in card.unreadable[:limit]:
        yield f"{item['file']}: {item['reason']}"
    if len(card.unreadable) > limit:
        yield f"... and {len(card.unreadable) - limit} more (see the card's JSON)"
