"""Slice sets: the one on-disk format (.npz) for labelled 2D slices from any source."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.core.files import atomic_open

__all__ = [
    "FORMAT_VERSION",
    "HOLDOUT",
    "SPLITS",
    "SYNTHETIC",
    "TRAIN",
    "VALIDATION",
    "SliceSet",
    "SliceSetError",
    "assign_split_by_patient",
    "with_validation",
]

FORMAT_VERSION = 1
TRAIN, VALIDATION, HOLDOUT, SYNTHETIC = "train", "validation", "holdout", "synthetic"
SPLITS = (TRAIN, VALIDATION, HOLDOUT, SYNTHETIC)

_REQUIRED = ("images", "labels", "class_names", "patient_ids", "split", "source", "meta")


class SliceSetError(ValueError):
    """A slice set file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class SliceSet:
    """Labelled single-channel slices with patient ids and a patient-level split.

    Attributes
    ----------
    images : (N, H, W) uint8 array, 0 = black, 255 = white (already windowed).
    labels : (N,) int64 array of indices into ``class_names``.
    class_names : class names in label order.
    patient_ids : (N,) str array; one id per image where patients are unknown.
    split : (N,) str array of ``train``, ``validation`` (patients kept out of training to
        choose a checkpoint), ``holdout`` (patients kept for the audit) or ``synthetic``.
    source : (N,) str array, the file (and slice) each image came from.
    site : (N,) str array or None, the acquiring site when known.
    masks : (N, H, W) uint8 array or None: each slice's label map (the mask's values,
        resized by nearest neighbour), kept with ``fedsynth prepare --keep-masks``.
    meta : free-form provenance (preprocessing, whether patient ids are real, ...).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    patient_ids: np.ndarray
    split: np.ndarray
    source: np.ndarray
    site: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise SliceSetError("slice set: " + "; ".join(problems))

    # --- views ------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def patient_ids_known(self) -> bool:
        return bool(self.meta.get("patient_ids_known", False))

    @property
    def privacy_unit(self) -> str:
        """``patient`` where patient ids are real, else ``slice``."""
        return "patient" if self.patient_ids_known else "slice"

    def subset(self, index: np.ndarray) -> SliceSet:
        """Rows selected by a boolean mask or integer index, meta kept."""
        return replace(
            self,
            images=self.images[index],
            labels=self.labels[index],
            patient_ids=self.patient_ids[index],
            split=self.split[index],
            source=self.source[index],
            site=None if self.site is None else self.site[index],
            masks=None if self.masks is None else self.masks[index],
        )

    def only(self, split: str) -> SliceSet:
        return self.subset(self.split == split)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts, strict=True)}

    def as_float(self) -> np.ndarray:
        """Images as float32 in [-1, 1], shape (N, 1, H, W), the generator's range."""
        return (self.images.astype(np.float32) / 127.5 - 1.0)[:, None]

    # --- files ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (a crash never leaves a half-written file)."""
        path = Path(path)
        meta = dict(self.meta, format_version=FORMAT_VERSION)
        arrays: dict[str, Any] = {
            "images": self.images,
            "labels": self.labels.astype(np.int64),
            "class_names": np.array(self.class_names, dtype=str),
            "patient_ids": self.patient_ids.astype(str),
            "split": self.split.astype(str),
            "source": self.source.astype(str),
            "meta": np.array(json.dumps(meta)),
        }
        if self.site is not None:
            arrays["site"] = self.site.astype(str)
        if self.masks is not None:
            arrays["masks"] = self.masks
        with atomic_open(path, "wb", suffix=".npz") as handle:
            np.savez_compressed(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SliceSet:
        """Read and validate a slice set.

        Raises
        ------
        SliceSetError
            The file is missing, not an npz, lacks a field, or its fields disagree;
            the message names the file and what is wrong.
        """
        path = Path(path)
        if not path.is_file():
            raise SliceSetError(f"{path}: no such slice set file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in _REQUIRED if k not in npz.files]
                if missing:
                    raise SliceSetError(f"{path}: not a fedsynth slice set (missing {', '.join(missing)})")
                data = {k: npz[k] for k in npz.files}
        except SliceSetError:
            raise
        except Exception as err:  # zip, pickle or header errors from numpy
            raise SliceSetError(f"{path}: cannot be read as .npz ({err})") from None
        try:
            meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as err:
            raise SliceSetError(f"{path}: field 'meta' is not JSON ({err})") from None
        try:
            return cls(
                images=data["images"],
                labels=data["labels"],
                class_names=tuple(str(c) for c in data["class_names"]),
                patient_ids=data["patient_ids"],
                split=data["split"],
                source=data["source"],
                site=data.get("site"),
                meta=meta,
                masks=data.get("masks"),
            )
        except SliceSetError as err:
            raise SliceSetError(f"{path}: {str(err).removeprefix('slice set: ')}") from None


def _problems(s: SliceSet) -> list[str]:
    problems: list[str] = []
    if not isinstance(s.images, np.ndarray) or s.images.ndim != 3:
        shape = getattr(s.images, "shape", None)
        return [f"'images' must be an (N, H, W) array, got shape {shape}"]
    n, h, w = s.images.shape
    if h != w:
        problems.append(f"'images' must be square, got {h}x{w}")
    if s.images.dtype not in (np.uint8, np.float16):
        problems.append(f"'images' must be uint8 or float16, got {s.images.dtype}")
    for name in ("labels", "patient_ids", "split", "source") + (("site",) if s.site is not None else ()):
        value = getattr(s, name)
        if not isinstance(value, np.ndarray) or value.shape != (n,):
            problems.append(
                f"'{name}' has shape {getattr(value, 'shape', None)} but 'images' has {n} entries"
            )
    if s.masks is not None and (
        not isinstance(s.masks, np.ndarray) or s.masks.shape != s.images.shape or s.masks.dtype != np.uint8
    ):
        problems.append(
            f"'masks' must be a uint8 array shaped like 'images' {s.images.shape}, got "
            f"{getattr(s.masks, 'shape', None)} {getattr(s.masks, 'dtype', None)}"
        )
    if problems:
        return problems
    if not np.issubdtype(s.labels.dtype, np.integer):
        problems.append(f"'labels' must be integers, got {s.labels.dtype}")
    elif n and (s.labels.min() < 0 or s.labels.max() >= len(s.class_names)):
        problems.append(
            f"'labels' must lie in 0..{len(s.class_names) - 1} ({len(s.class_names)} class names), found "
            f"{int(s.labels.min())}..{int(s.labels.max())}"
        )
    if not s.class_names:
        problems.append("'class_names' is empty")
    elif len(set(s.class_names)) != len(s.class_names):
        problems.append(f"'class_names' has duplicates: {list(s.class_names)}")
    bad = sorted(set(s.split.astype(str).tolist()) - set(SPLITS))
    if bad:
        problems.append(f"'split' has unknown values {bad} (allowed: {', '.join(SPLITS)})")
    if n and not bad:
        problems.extend(_split_leaks(s.patient_ids.astype(str), s.split.astype(str)))
    return problems


def _split_leaks(patient_ids: np.ndarray, split: np.ndarray) -> list[str]:
    """A patient must sit wholly in one of train, validation and holdout."""
    problems = []
    for a, b in ((TRAIN, HOLDOUT), (TRAIN, VALIDATION), (VALIDATION, HOLDOUT)):
        both = sorted(set(patient_ids[split == a].tolist()) & set(patient_ids[split == b].tolist()))
        if both:
            shown = ", ".join(both[:3]) + (" ..." if len(both) > 3 else "")
            problems.append(f"{len(both)} patient(s) appear in both {a} and {b} ({shown})")
    return problems


def with_validation(slices: SliceSet, fraction: float, *, seed: int = 0) -> SliceSet:
    """Move ``fraction`` of the training patients (stratified by class, whole patients) to
    a ``validation`` split, used to choose a checkpoint without touching the holdout.
    A slice set that already has validation slices, or ``fraction`` 0, is returned as is."""
    if fraction <= 0 or (slices.split == VALIDATION).any():
        return slices
    train = slices.split == TRAIN
    if not train.any():
        return slices
    drawn = assign_split_by_patient(
        slices.patient_ids[train], slices.labels[train], holdout_fraction=fraction, seed=seed
    )
    split = slices.split.astype("<U10").copy()
    split[np.flatnonzero(train)[drawn == HOLDOUT]] = VALIDATION
    return replace(slices, split=split)


def assign_split_by_patient(
    patient_ids: np.ndarray,
    labels: np.ndarray,
    *,
    holdout_fraction: float,
    seed: int,
) -> np.ndarray:
    """Assign whole patients to train or holdout, stratified by each patient's main class.

    Parameters
    ----------
    patient_ids, labels : per-slice arrays of equal length.
    holdout_fraction : share of patients held out, in (0, 1); 0 puts everyone in train.
    seed : seed of the shuffle.

    Returns
    -------
    (N,) str array of ``train`` / ``holdout``.
    """
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    split = np.full(len(patient_ids), TRAIN, dtype="<U9")
    if holdout_fraction == 0 or len(patient_ids) == 0:
        return split
    patients, inverse = np.unique(patient_ids.astype(str), return_inverse=True)
    # Each patient's stratum is its most frequent label: a patient with a lesion on some
    # slices is a "lesion patient" for stratification.
    votes = np.zeros((len(patients), int(labels.max()) + 1), dtype=np.int64)
    np.add.at(votes, (inverse, labels), 1)
    strata = votes.argmax(axis=1)
    rng = np.random.default_rng(seed)
    holdout_patients = np.zeros(len(patients), dtype=bool)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        rng.shuffle(members)
        take = int(round(len(members) * holdout_fraction))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        holdout_patients[members[:take]] = True
    split[holdout_patients[inverse]] = HOLDOUT
    return split
