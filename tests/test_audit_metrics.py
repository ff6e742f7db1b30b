"""The memorization and membership statistics on small made-up data: copies are found,
and chance alone (hubs, small sites, small holdouts) does not raise an alarm."""

from __future__ import annotations

import numpy as np
import pytest

from fedsynth.audit import memorization as M
from fedsynth.audit.membership import attack_metrics, select_records
from fedsynth.audit.verdicts import GREEN, RED, judge


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


_BASIS = np.random.default_rng(99).normal(size=(6, 144))


def _images(n: int, seed: int) -> np.ndarray:
    """Images from a 6-dimensional family (like slices, they vary along few directions;
    uniform noise in 144 dimensions would make every search land on a few "hub" images)."""
    codes = np.random.default_rng(seed).normal(size=(n, 6))
    return np.clip(128 + 20 * codes @ _BASIS, 0, 255).astype(np.uint8).reshape(n, 12, 12)


def _distances(synthetic: np.ndarray, train: np.ndarray, holdout: np.ndarray, **kw) -> M.Distances:
    return M.measure_distances("pixels", M.FeatureSearch(_flat), synthetic=synthetic, train=train, holdout=holdout, **kw)


def test_copies_give_the_full_copying_share_and_a_tiny_p_value() -> None:
    train, holdout = _images(800, 0), _images(400, 1)
    share = M.closer_to_train_share(_distances(train, train, holdout))
    # 0.5 + s/2 expected: copies of subsample images always win, the rest split ~evenly
    assert share["copying_equivalent"] == pytest.approx(1.0, abs=0.25)
    assert share["p_value"] < 1e-3


def test_a_hub_is_one_coin_flip_not_hundreds() -> None:
    """A collapsed generator: 300 identical images, all nearest the same real image. Half
    the time that image is in train; the share is then 1.0, but it is one unit of evidence."""
    train, holdout = _images(400, 0), _images(100, 1)
    hub = np.full((300, 12, 12), 128, dtype=np.uint8)
    share = M.closer_to_train_share(_distances(hub, train, holdout))
    assert share["distinct_nearest_patients"] == 1
    assert share["p_value"] > 0.1


def test_a_holdout_with_another_class_mix_tilts_the_whole_set_share_but_not_the_within_class_one() -> None:
    """Two classes, a generator that never saw train (fresh draws, half of each class), and a
    holdout that is 90% class a where train is half and half: over the whole set the class-b
    images find their nearest slice in train, so the share looks like copying; within each
    class the two sides are exchangeable again."""
    def draw(n: int, seed: int, shift: int) -> np.ndarray:  # the two classes lie far apart
        return np.clip(_images(n, seed).astype(int) + shift, 0, 255).astype(np.uint8)

    train = {"a": draw(300, 0, -50), "b": draw(300, 1, 50)}
    holdout = {"a": draw(270, 2, -50), "b": draw(30, 3, 50)}
    synthetic = {"a": draw(200, 4, -50), "b": draw(200, 5, 50)}
    whole = M.closer_to_train_share(
        _distances(np.concatenate(list(synthetic.values())), np.concatenate(list(train.values())),
                   np.concatenate(list(holdout.values())))
    )
    assert whole["share"] > 0.55 and whole["p_value"] < 0.01  # a false alarm (the audit is amber at p < 0.01)
    within = M.closer_to_train_within_classes(
        {k: _distances(synthetic[k], train[k], holdout[k]) for k in train}
    )
    assert abs(within["share"] - 0.5) < 0.06 and within["p_value"] > 0.05
    assert within["n"] == 400 and set(within["by_class"]) == {"a", "b"}


def test_the_share_within_a_class_reuses_the_whole_set_search_and_equals_measuring_the_class_alone() -> None:
    """The audit measures each class's share on the images it already indexed for the whole
    set: the same distances, patients and test as measuring that class from scratch."""
    train, holdout, synthetic = _images(120, 0), _images(40, 1), _images(60, 2)
    patients = np.repeat(np.arange(60).astype(str), 2)
    t, h, s = np.arange(120) % 3 == 0, np.arange(40) < 25, np.arange(60) % 2 == 1
    search = M.FeatureSearch(_flat)
    whole = M.measure_distances("pixels", search, synthetic=synthetic, train=train, holdout=holdout,
                                train_patients=patients, seed=3)
    part = M.share_distances_within(whole, search, synthetic=s, train=t, holdout=h, seed=3)
    alone = _distances(synthetic[s], train[t], holdout[h], train_patients=patients[t], seed=3)
    np.testing.assert_allclose(part.synthetic_to_holdout, alone.synthetic_to_holdout, rtol=1e-6)
    np.testing.assert_allclose(part.synthetic_to_train_subset, alone.synthetic_to_train_subset, rtol=1e-6)
    np.testing.assert_array_equal(part.subset_unit, alone.subset_unit)
    assert part.train_subset_size == alone.train_subset_size and part.train_share == alone.train_share
    assert M.closer_to_train_share(part) == M.closer_to_train_share(alone)


def test_a_patient_in_two_classes_is_one_unit_of_the_pooled_test() -> None:
    """A collapsed generator drawing one image per class, both nearest slices of one
    training patient: one coin flip (that patient's side of the split), not two."""
    slices = _images(40, 0)
    patients = np.repeat(np.arange(20).astype(str), 2)  # two slices per patient, one per class
    classes = {"a": slices[0::2], "b": slices[1::2]}
    hubs = {k: np.repeat(v[:1], 100, axis=0) for k, v in classes.items()}  # patient 0's slices
    holdout = {"a": _images(20, 1), "b": _images(20, 2)}
    within = M.closer_to_train_within_classes(
        {k: _distances(hubs[k], classes[k], holdout[k], train_patients=patients[0::2], seed=3) for k in classes}
    )
    assert within["distinct_nearest_patients"] == 1
    assert within["p_value"] > 0.1


def test_a_sample_of_synthetic_images_feeds_the_share_test_and_authenticity() -> None:
    """With more synthetic images than the sample, the share test and authenticity use the
    sample; each training image they need is measured against its nearest *other* training
    image (brute force agrees), and the others are left unmeasured."""
    train, holdout, synthetic = _images(300, 0), _images(100, 1), _images(500, 2)
    d = _distances(synthetic, train, holdout, sample=120)
    assert d.sample is not None and len(d.sample) == 120 and len(d.synthetic_to_train) == 500
    assert len(d.synthetic_to_holdout) == len(d.synthetic_to_train_subset) == 120
    assert M.closer_to_train_share(d)["n"] == 120
    flat = _flat(train)
    pairwise = np.linalg.norm(flat[:, None] - flat[None], axis=2)
    np.fill_diagonal(pairwise, np.inf)
    needed = np.unique(np.concatenate([d.synthetic_to_train_index[d.sample], d.holdout_to_train_index]))
    assert np.allclose(d.train_to_train[needed], pairwise[needed].min(1), atol=1e-4)
    assert np.isnan(np.delete(d.train_to_train, needed)).all()
    assert 0 <= M.authenticity(d) <= 1


def test_membership_records_take_at_most_a_few_slices_of_each_patient() -> None:
    images = _images(400, 0)
    patients = np.repeat(np.arange(20), 20)  # 20 slices each
    records = select_records(images[:200], np.zeros(200, int), patients[:200], images[200:], np.zeros(200, int),
                             patients[200:] + 100, max_patients=5, max_slices=8)
    assert records.patients == 10 and len(records.images) == 10 * 8
    for p in range(10):  # every record is a slice of the patient it is filed under
        rows = records.images[records.patient == p]
        source = images[:200] if records.member[p] else images[200:]
        owners = {int(np.flatnonzero((source == r).all(axis=(1, 2)))[0]) // 20 for r in rows}
        assert len(owners) == 1


def test_the_train_sample_takes_whole_patients() -> None:
    train, holdout = _images(400, 0), _images(100, 1)
    patients = np.repeat(np.arange(100), 4)  # 4 slices each
    d = _distances(_images(50, 2), train, holdout, train_patients=patients,
                   holdout_patients=np.repeat(np.arange(25), 4))
    assert d.train_subset_size == 25 * 4 and d.train_share == pytest.approx(0.25)


def test_fresh_images_against_a_small_holdout_are_not_called_near_copies() -> None:
    """With 20 holdout images the 1st-percentile threshold is the smallest holdout distance,
    which a fresh image undercuts 1 time in 21: about 5%, and that is chance, not copying."""
    train, holdout, fresh = _images(300, 0), _images(20, 1), _images(200, 2)
    near = M.near_copies(_distances(fresh, train, holdout))
    assert near["null_rate"] == pytest.approx(1 / 21)
    assert judge("near_copy_share", near["share"], significant=near["p_value"] < 0.01) == GREEN
    copies = M.near_copies(_distances(train[:200], train, holdout))
    assert copies["share"] == 1.0
    assert judge("near_copy_share", copies["share"], significant=copies["p_value"] < 0.01) == RED


def test_a_small_site_does_not_fail_membership_inference_by_chance() -> None:
    member = np.repeat([True, False], 8)
    # scores that know nothing about membership; the first seed whose AUC is above the red
    # line by chance (it happens often with 8 patients a side)
    for seed in range(100):
        small = attack_metrics(np.random.default_rng(seed).normal(size=16), member)
        if 0.6 < small["auc"] < 0.75:
            break
    assert 0.6 < small["auc"] < 0.75 and small["auc_p_value"] > 0.01
    assert judge("mia_auc", small["auc"], significant=small["auc_p_value"] < 0.01) == GREEN
    member = np.repeat([True, False], 500)
    rng = np.random.default_rng(0)
    leaky = np.where(member, rng.normal(1.0, 1, 1000), rng.normal(0, 1, 1000))
    large = attack_metrics(leaky, member)
    assert large["auc"] > 0.7 and large["auc_p_value"] < 1e-6
    assert judge("mia_auc", large["auc"], significant=True) == RED
    assert large["epsilon_lower_bound"] > 0


def test_a_class_too_thin_to_measure_is_named_and_the_others_are_still_measured_within_class() -> None:
    """A class with a single holdout slice cannot be measured within itself: the audit measures
    the other class within itself (not the tilted whole set) and names the skipped one."""
    from fedsynth.audit.pipeline import AuditInputs, AuditOptions, _class_distances, _memorization

    train, holdout, synthetic = _images(120, 0), _images(41, 1), _images(60, 2)
    labels = {"train": np.repeat([0, 1], 60), "holdout": np.r_[np.zeros(40, int), 1], "synthetic": np.repeat([0, 1], 30)}
    inputs = AuditInputs(train, labels["train"], np.arange(120).astype(str), holdout, labels["holdout"],
                         np.char.add("h", np.arange(41).astype(str)), synthetic, labels["synthetic"], ("a", "b"))
    search = M.FeatureSearch(_flat)
    whole = M.measure_distances("pixels", search, synthetic=synthetic, train=train, holdout=holdout,
                                train_patients=inputs.train_patients, holdout_patients=inputs.holdout_patients)
    by_class = _class_distances(inputs, whole, search, AuditOptions())
    assert set(by_class) == {"a"}
    share = _memorization(whole, by_class, inputs.class_names)["closer_to_train"]
    assert share["within_classes"] and share["skipped_classes"] == ["b"] and share["n"] == 30
