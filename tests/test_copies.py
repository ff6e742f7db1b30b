"""The copy detector on made-up slices: a training image returned mirrored, turned, zoomed,
shifted or with another contrast is found, its disguise named and undone; what the detector
does not undo (an inverted image) is not. The calibration on real brain MRI is in
test_audit.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from benchmarks import disguises
from fedsynth.metrics.copies import CopyDetector, describe_pose


def _slices(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Slice-like images: a bright rim around an off-centre ellipse of smooth texture on black."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(-0.05, 0.05, 2)
        ry, rx = rng.uniform(0.3, 0.42, 2)
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        texture = gaussian_filter(rng.normal(size=(size, size)), 2.5)
        texture = (texture - texture.min()) / (texture.max() - texture.min())
        image = np.where(r < 1, 60 + 150 * texture, 0) + np.where((r > 0.8) & (r < 1), 60, 0)
        out.append(np.clip(image, 0, 255))
    return np.stack(out).astype(np.uint8)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _slices(80)


def test_a_mirrored_turned_zoomed_copy_is_found_named_and_undone(reference) -> None:
    detector = CopyDetector()
    original = reference[7:8]
    copy = disguises.zoom(disguises.rotate(disguises.mirror(original), 9), 1.06)
    index = detector.index(reference)
    match = detector.nearest(detector.index(copy), index)
    assert match.index[0] == 7
    # as close as a copy is after resampling twice: far closer than to any other image
    others = detector.nearest(detector.index(copy), index.subset(np.delete(np.arange(80), 7)))
    assert match.distance[0] < 0.01 < others.distance[0]
    words = describe_pose(match.theta[0], 64)
    assert words.startswith("mirrored"), words
    angle = int(re.search(r"rotated (\d+)° anticlockwise", words).group(1))  # type: ignore[union-attr]
    assert abs(angle - 9) <= 1 and "zoomed 1.0" in words, words  # SciPy turns anticlockwise on screen
    undone = CopyDetector.align(copy[0], match.theta[0]).astype(float)
    inside = original[0] > 0
    before = np.abs(copy[0].astype(float) - original[0])[inside].mean()
    after = np.abs(undone - original[0])[inside].mean()  # grey levels; two resamplings blur a little
    assert after < 8 and after < 0.3 * before, (after, before)


def test_contrast_noise_and_shift_are_undone_and_exact_copies_score_zero(reference) -> None:
    detector = CopyDetector()
    index = detector.index(reference)
    queries = np.concatenate(
        [
            reference[:5],
            disguises.gamma(reference[:5], 1.5),
            disguises.noise(reference[:5], 6),
            disguises.shift(reference[:5], 2, -2),
        ]
    )
    match = detector.nearest(detector.index(queries), index)
    assert (match.index == np.tile(np.arange(5), 4)).all()
    assert (match.distance[:5] == 0).all()
    fresh = detector.nearest(detector.index(_slices(20, seed=1)), index)
    assert match.distance.max() < fresh.distance.min()


@pytest.mark.parametrize("size", [32, 128])
def test_a_copy_is_found_and_undone_at_any_image_size(size) -> None:
    """The detector works at 64 px inside; poses are size-free, so a copy at 32 or 128 px is
    found and undone at its own size (the audit's gallery shows it so)."""
    images = _slices(30, size=size, seed=3)
    detector = CopyDetector()
    copy = disguises.rotate(disguises.mirror(images[4:5]), -12)
    match = detector.nearest(detector.index(copy), detector.index(images))
    undone = CopyDetector.align(copy, match.theta)
    assert match.index[0] == 4 and undone.shape == copy.shape
    inside = images[4] > 0
    before = np.abs(copy[0].astype(float) - images[4])[inside].mean()
    assert np.abs(undone[0].astype(float) - images[4])[inside].mean() < 0.4 * before  # resampled twice


def test_an_image_is_not_its_own_match_when_excluded(reference) -> None:
    detector = CopyDetector()
    index = detector.index(reference)
    match = detector.nearest(index, index, exclude=np.arange(len(reference)))
    assert (match.index != np.arange(len(reference))).all() and (match.distance > 0).all()
    # some of the reference as queries, each excluding its own row: the same answers
    rows = np.array([3, 17, 40, 79])
    some = detector.nearest(index.subset(rows), index, exclude=rows)
    assert (some.index == match.index[rows]).all() and np.allclose(some.distance, match.distance[rows])


def test_an_inverted_image_is_not_undone(reference) -> None:
    """A non-monotone change of the intensity curve is outside what the detector covers
    (the report says so): the negative of a slice is farther than a fresh slice."""
    detector = CopyDetector()
    index = detector.index(reference)
    inverted = detector.nearest(detector.index(255 - reference[:5]), index)
    fresh = detector.nearest(detector.index(_slices(20, seed=1)), index)
    assert np.median(inverted.distance) > np.median(fresh.distance)


def test_pose_words() -> None:
    assert describe_pose(np.array([[1.0, 0, 0], [0, 1.0, 0]]), 64) == "same pose"
    a = np.radians(20)
    turned = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0]])
    assert describe_pose(turned, 64) == "rotated 20° clockwise"
    mirrored = np.array([[-1.1, 0, 0.0625], [0, 1.1, 0]])
    assert describe_pose(mirrored, 64) == "mirrored, zoomed 1.10x, shifted by (+2, +0) px"


def test_bad_settings_and_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="refine=5"):
        CopyDetector(candidates=3, refine=5)
    with pytest.raises(ValueError, match="expected images"):
        CopyDetector().index(np.zeros((4, 8), dtype=np.uint8))
