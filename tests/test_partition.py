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
