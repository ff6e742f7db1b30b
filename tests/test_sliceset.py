"""Slice set files: validated on load, with errors that name the file and the field."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedsynth.data.sliceset import SliceSet, SliceSetError, assign_split_by_patient, with_validation

from .conftest import make_slices


def test_save_load_round_trip_keeps_every_field(tmp_path: Path) -> None:
    original = make_slices(sites=("north", "south"))
    loaded = SliceSet.load(original.save(tmp_path / "s.npz"))
    assert np.array_equal(loaded.images, original.images)
    assert np.array_equal(loaded.labels, original.labels)
    assert loaded.class_names == original.class_names
    assert np.array_equal(loaded.site, original.site)
    assert loaded.privacy_unit == "patient"
    assert not list(tmp_path.glob(".*")), "no temporary file may be left behind"


def test_split_is_by_patient_and_stratified() -> None:
    patients = np.repeat([f"p{i}" for i in range(40)], 3)
    labels = np.repeat(np.arange(40) % 2, 3)
    split = assign_split_by_patient(patients, labels, holdout_fraction=0.25, seed=1)
    for p in np.unique(patients):
        assert len(set(split[patients == p])) == 1, f"patient {p} straddles the split"
    held = np.unique(patients[split == "holdout"])
    assert len(held) == 10
    held_labels = labels[np.isin(patients, held)][::3]
    assert sorted(np.bincount(held_labels).tolist()) == [5, 5]


def test_validation_takes_whole_training_patients_per_class_and_is_kept_once_drawn(tmp_path: Path) -> None:
    slices = make_slices(n_patients=60, per_patient=3)
    drawn = with_validation(slices, 0.1, seed=0)
    assert np.array_equal(drawn.split == "holdout", slices.split == "holdout"), "the holdout is untouched"
    val_patients = set(drawn.patient_ids[drawn.split == "validation"])
    train_patients = set(drawn.patient_ids[drawn.split == "train"])
    assert not val_patients & train_patients
    before = len(set(slices.patient_ids[slices.split == "train"]))
    assert abs(len(val_patients) - 0.1 * before) <= 2
    loaded = SliceSet.load(drawn.save(tmp_path / "v.npz"))
    assert np.array_equal(with_validation(loaded, 0.3, seed=5).split, drawn.split), "an existing split is kept"
    assert with_validation(slices, 0.0) is slices
    leak = drawn.split.copy()
    train_row = np.flatnonzero(drawn.split == "train")[0]
    leak[np.flatnonzero(drawn.patient_ids == drawn.patient_ids[train_row])[1:]] = "validation"
    with pytest.raises(SliceSetError, match="both train and validation"):
        replace(drawn, split=leak)


def test_a_patient_in_both_splits_is_refused(slices: SliceSet) -> None:
    split = slices.split.copy()
    patient = slices.patient_ids[0]
    rows = np.flatnonzero(slices.patient_ids == patient)
    split[rows[0]], split[rows[1]] = "train", "holdout"
    with pytest.raises(SliceSetError, match="appear in both train and holdout"):
        replace(slices, split=split)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("labels", np.full(48, 5), "'labels' must lie in 0..1"),
        ("split", np.full(48, "val"), "'split' has unknown values"),
        ("patient_ids", np.array(["p"] * 3), "'patient_ids' has shape"),
    ],
)
def test_inconsistent_fields_are_named(slices: SliceSet, field: str, value: np.ndarray, message: str) -> None:
    with pytest.raises(SliceSetError, match=message):
        replace(slices, **{field: value})


def test_unreadable_or_foreign_files_are_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(SliceSetError, match="junk.npz: cannot be read"):
        SliceSet.load(junk)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.zeros(3))
    with pytest.raises(SliceSetError, match="foreign.npz: not a fedsynth slice set"):
        SliceSet.load(foreign)
    with pytest.raises(SliceSetError, match="no such slice set"):
        SliceSet.load(tmp_path / "absent.npz")
