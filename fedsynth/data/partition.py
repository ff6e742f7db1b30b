"""Split one slice set into simulated hospitals: IID, Dirichlet non-IID, or by site."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedsynth.data.sliceset import SliceSet

__all__ = ["SPEC_HELP", "PartitionError", "PartitionSpec", "hospital_names", "parse_spec", "partition"]


class PartitionError(ValueError):
    """A partition that cannot be made from this slice set."""


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition: ``kind`` is iid, dirichlet or by-site; ``alpha`` Dirichlet's
    concentration; ``min_slices`` the fewest training slices any hospital may get."""

    kind: str
    alpha: float = 0.0
    min_slices: int = 1


SPEC_HELP = (
    "iid, by-site, or dirichlet:ALPHA with ALPHA > 0, optionally ,min=N (N training slices per hospital)"
)


def parse_spec(spec: str) -> PartitionSpec:
    """``iid``, ``by-site``, ``dirichlet:ALPHA`` or ``dirichlet:ALPHA,min=N``.

    Raises
    ------
    PartitionError
        Anything else, with the accepted forms.
    """
    if spec in ("iid", "by-site"):
        return PartitionSpec(spec)
    if spec.startswith("dirichlet:"):
        alpha_text, _, option = spec.removeprefix("dirichlet:").partition(",")
        try:
            alpha = float(alpha_text)
            minimum = (
                int(option.removeprefix("min=")) if option.startswith("min=") else (1 if not option else 0)
            )
        except ValueError:
            alpha, minimum = -1.0, 0
        if alpha > 0 and minimum >= 1:
            return PartitionSpec("dirichlet", alpha, minimum)
    raise PartitionError(f"unknown partition {spec!r}: use {SPEC_HELP}")


def hospital_names(count: int) -> list[str]:
    """``hospital-a``, ``hospital-b``, ... (then ``hospital-27``, ...)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [f"hospital-{letters[i]}" if i < 26 else f"hospital-{i + 1}" for i in range(count)]


def partition(slices: SliceSet, spec: str, hospitals: int, *, seed: int = 0) -> dict[str, SliceSet]:
    """Assign every patient (all of their slices, train and holdout) to one hospital.

    Parameters
    ----------
    slices : the pooled slice set.
    spec : ``iid``, ``dirichlet:ALPHA`` (class proportions per hospital drawn from
        Dirichlet(ALPHA); small ALPHA is very non-IID; ``dirichlet:ALPHA,min=N`` then moves
        whole patients from the largest hospitals until each has N training slices) or
        ``by-site`` (the slice set's site column decides, and ``hospitals`` must equal the
        number of sites).
    hospitals : number of hospitals.
    seed : seed of the draw.

    Returns
    -------
    Hospital name -> its slice set, in order. Every hospital has at least one
    training slice.

    Raises
    ------
    PartitionError
        by-site without a site column or with a different number of sites, too few
        patients for the number of hospitals, or too few training slices for ``min=N``.
    """
    if hospitals < 1:
        raise PartitionError("need at least one hospital")
    parsed = parse_spec(spec)
    if parsed.kind == "by-site":
        return _by_site(slices, hospitals)
    patients, inverse = np.unique(slices.patient_ids.astype(str), return_inverse=True)
    train_patients = np.unique(inverse[slices.split == "train"])
    if len(train_patients) < hospitals:
        raise PartitionError(
            f"{len(train_patients)} training patients cannot be shared by {hospitals} hospitals"
        )
    is_train = slices.split == "train"
    if int(is_train.sum()) < parsed.min_slices * hospitals:
        raise PartitionError(
            f"{int(is_train.sum())} training slices cannot give {hospitals} hospitals "
            f"{parsed.min_slices} each (partition {spec})"
        )
    rng = np.random.default_rng(seed)
    if parsed.kind == "iid":
        owner = _iid(len(patients), hospitals, rng)
    else:
        owner = _dirichlet(slices, inverse, len(patients), hospitals, parsed.alpha, rng)
    owner = _ensure_training_data(owner, inverse, is_train, hospitals, parsed.min_slices, rng)
    counts = np.bincount(owner[inverse[is_train]], minlength=hospitals)
    if counts.min() < parsed.min_slices:
        raise PartitionError(
            f"partition {spec}: whole patients cannot give every one of {hospitals} hospitals "
            f"{parsed.min_slices} training slices (the smallest has {counts.min()})"
        )
    slice_owner = owner[inverse]
    names = hospital_names(hospitals)
    return {name: _as_hospital(slices.subset(slice_owner == i), name, spec) for i, name in enumerate(names)}


def _iid(n_patients: int, hospitals: int, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(n_patients)
    owner = np.empty(n_patients, dtype=np.int64)
    owner[order] = np.arange(n_patients) % hospitals
    return owner


def _dirichlet(
    slices: SliceSet,
    inverse: np.ndarray,
    n_patients: int,
    hospitals: int,
    alpha: float,
    rng: np.random.Generator,
) -> np.ndarray:
    # A patient's class is its most frequent slice label.
    votes = np.zeros((n_patients, len(slices.class_names)), dtype=np.int64)
    np.add.at(votes, (inverse, slices.labels), 1)
    patient_class = votes.argmax(axis=1)
    owner = np.empty(n_patients, dtype=np.int64)
    for cls in range(len(slices.class_names)):
        members = rng.permutation(np.flatnonzero(patient_class == cls))
        if len(members) == 0:
            continue
        shares = rng.dirichlet(np.full(hospitals, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
        for hospital, chunk in enumerate(np.split(members, cuts)):
            owner[chunk] = hospital
    return owner


def _ensure_training_data(
    owner: np.ndarray,
    inverse: np.ndarray,
    is_train: np.ndarray,
    hospitals: int,
    min_slices: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Move training patients, one at a time, to the hospital with the fewest training
    slices, until each has a patient and ``min_slices`` slices. Each comes from the hospital
    with the most slices among those that can give one and keep ``min_slices`` (or the
    loop stops: the caller checks)."""
    train_patients = np.unique(inverse[is_train])
    slices_of = np.bincount(inverse[is_train], minlength=len(owner))  # training slices per patient
    for _ in range(len(train_patients)):
        counts = np.bincount(owner[train_patients], weights=slices_of[train_patients], minlength=hospitals)
        patients_at = np.bincount(owner[train_patients], minlength=hospitals)
        poorest = int(counts.argmin())
        if patients_at[poorest] and counts[poorest] >= min_slices:
            break
        # a patient may move where its hospital keeps min_slices (and so a patient) without it
        movable = train_patients[counts[owner[train_patients]] - slices_of[train_patients] >= min_slices]
        movable = movable[owner[movable] != poorest]
        if not len(movable):
            break
        donor = owner[movable][int(np.argmax(counts[owner[movable]]))]
        owner[rng.choice(movable[owner[movable] == donor])] = poorest
    return owner


def _by_site(slices: SliceSet, hospitals: int) -> dict[str, SliceSet]:
    if slices.site is None:
        raise PartitionError(
            "partition by-site needs a site column in the slice set; this one has none (use iid or "
            "dirichlet:ALPHA)"
        )
    sites = sorted(set(slices.site.astype(str).tolist()))
    if len(sites) != hospitals:
        raise PartitionError(
            f"partition by-site: the slice set has {len(sites)} sites ({', '.join(sites)}) but {hospitals} "
            "hospitals were asked for"
        )
    out = {}
    for site in sites:
        part = slices.subset(slices.site == site)
        if not (part.split == "train").any():
            raise PartitionError(f"partition by-site: site {site!r} has no training slices")
        out[site] = _as_hospital(part, site, "by-site")
    return out


def _as_hospital(part: SliceSet, name: str, spec: str) -> SliceSet:
    return replace(part, meta=dict(part.meta, hospital=name, partition=spec))
