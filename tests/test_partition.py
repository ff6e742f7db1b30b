"""Partitions into simulated hospitals: whole patients, every slice once, non-IID on request."""

from __future__ import annotations

import numpy as np
import pytest

from fedsynth.data.partition import PartitionError, partition

from .conftest import make_slices


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:100"])
def test_every_slice_lands_at_exactly_one_hospital_with_its_patient(spec: str) -> None:
    pooled = make_slices(n_patients=30)
    parts = partition(pooled, spec, 3, seed=0)
    assert list(parts) == ["hospital-a", "hospital-b", "hospital-c"]
    assert sum(len(p) for p in parts.values()) == len(pooled)
    owners: dict[str, str] = {}
    for name, part in parts.items():
        assert (part.split == "train").any(), f"{name} has no training slices"
        for patient in np.unique(part.patient_ids):
            assert owners.setdefault(str(patient), name) == name, f"patient {patient} split across hospitals"
    sources = np.concatenate([p.source for p in parts.values()])
    assert sorted(sources.tolist()) == sorted(pooled.source.tolist())


def test_small_dirichlet_alpha_skews_class_mix_more_than_iid() -> None:
    pooled = make_slices(n_patients=120, per_patient=1)

    def spread(spec: str) -> float:
        shares = [p.labels.mean() for p in partition(pooled, spec, 3, seed=3).values()]
        return float(np.std(shares))

    assert spread("dirichlet:0.1") > 2 * spread("iid")


def test_by_site_uses_the_site_column() -> None:
    pooled = make_slices(sites=("north", "south"))
    parts = partition(pooled, "by-site", 2)
    assert {name: set(p.site.tolist()) for name, p in parts.items()} == {"north": {"north"}, "south": {"south"}}
    with pytest.raises(PartitionError, match="2 sites"):
        partition(pooled, "by-site", 3)
    with pytest.raises(PartitionError, match="site"):
        partition(make_slices(), "by-site", 2)


def test_too_few_patients_is_an_error() -> None:
    with pytest.raises(PartitionError, match="cannot be shared by 20 hospitals"):
        partition(make_slices(n_patients=8), "iid", 20)


def test_a_minimum_per_hospital_moves_whole_patients_until_every_hospital_has_it() -> None:
    """Dirichlet 0.5 over many hospitals leaves some with a slice or two (a 30-hospital run
    had one with a single training slice); ``min=N`` tops them up from the largest, and the
    hospitals' class mixes stay as skewed (measured: spread of the class share 0.39 plain,
    0.38 topped up, 0.11 iid)."""
    pooled = make_slices(n_patients=600, per_patient=1)

    def hospitals(spec: str) -> tuple[list[int], float]:
        parts = partition(pooled, spec, 20, seed=1).values()
        counts = [int((p.split == "train").sum()) for p in parts]
        return counts, float(np.std([p.labels[p.split == "train"].mean() for p in parts]))

    (plain, plain_skew), (topped, topped_skew), (_, iid_skew) = map(
        hospitals, ("dirichlet:0.5", "dirichlet:0.5,min=10", "iid"))
    assert min(plain) < 10 <= min(topped)
    assert sum(topped) == sum(plain) == int((pooled.split == "train").sum())
    assert topped_skew > 2 * iid_skew and topped_skew > 0.8 * plain_skew
    with pytest.raises(PartitionError, match="cannot give 20 hospitals 50 each"):
        partition(pooled, "dirichlet:0.5,min=50", 20)
    for bad in ("dirichlet:0.5,min=0", "dirichlet:0.5,max=3", "dirichlet:-1", "iid,min=3"):
        with pytest.raises(PartitionError, match="min=N"):
            partition(pooled, bad, 3)


def test_a_hospital_holding_one_large_patient_is_not_the_only_donor() -> None:
    """Hospital 0 has the most slices but a single patient (40 slices); hospital 1 has five
    patients of 5. The empty hospital 2 is served from hospital 1, with or without a minimum."""
    from fedsynth.data.partition import _ensure_training_data

    inverse = np.repeat(np.arange(6), [40, 5, 5, 5, 5, 5])
    is_train = np.ones(len(inverse), dtype=bool)
    for minimum, expected in ((1, 5), (10, 10)):
        owner = _ensure_training_data(np.array([0, 1, 1, 1, 1, 1]), inverse, is_train, 3, minimum,
                                      np.random.default_rng(0))
        counts = np.bincount(owner[inverse], minlength=3)
        assert owner[0] == 0 and counts[2] == expected and counts.min() >= minimum, counts
