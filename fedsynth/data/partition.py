"""Split one slice set into simulated hospitals: IID, Dirichlet non-IID, or by site."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedsynth.data.sliceset import SliceSet

__all__ = ["PartitionError", "hospital_names", "partition"]


class PartitionError(ValueError):
    """A partition that cannot be made from this slice set."""


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
        Dirichlet(ALPHA); small ALPHA is very non-IID) or ``by-site`` (the slice set's
        site column decides, and ``hospitals`` must equal the number of sites).
    hospitals : number of hospitals.
    seed : seed of the draw.

    Returns
    -------
    Hospital name -> its slice set, in order. Every hospital has at least one
    training slice.

    Raises
    ------
    PartitionError
        by-site without a site column or with a different number of sites, or too few
        patients for the number of hospitals.
    """
    if hospitals < 1:
        raise PartitionError("need at least one hospital")
    if spec == "by-site":
        return _by_site(slices, hospitals)
    patients, inverse = np.unique(slices.patient_ids.astype(str), return_inverse=True)
    train_patients = np.unique(inverse[slices.split == "train"])
    if len(train_patients) < hospitals:
        raise PartitionError(
            f"{len(train_patients)} training patients cannot be shared by {hospitals} hospitals"
        )
    rng = np.random.default_rng(seed)
    if spec == "iid":
        owner = _iid(len(patients), hospitals, rng)
    elif spec.startswith("dirichlet:"):
        alpha = float(spec.split(":", 1)[1])
        owner = _dirichlet(slices, inverse, len(patients), hospitals, alpha, rng)
    else:
        raise PartitionError(f"unknown partition {spec!r} (use iid, dirichlet:ALPHA or by-site)")
    owner = _ensure_training_data(owner, inverse, slices.split == "train", hospitals, rng)
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
    rng: np.random.Generator,
) -> np.ndarray:
    """Move single training patients from the largest hospitals to empty ones."""
    train_patients = np.unique(inverse[is_train])
    for hospital in range(hospitals):
        mine = train_patients[owner[train_patients] == hospital]
        if len(mine):
            continue
        counts = np.bincount(owner[train_patients], minlength=hospitals)
        donor = int(counts.argmax())
        candidates = train_patients[owner[train_patients] == donor]
        owner[rng.choice(candidates)] = hospital
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
