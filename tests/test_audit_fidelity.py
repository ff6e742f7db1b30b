"""Image-fidelity metrics of the audit: FD, KID, PRDC, SSIM/PSNR, MS-SSIM, histograms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import sklearn
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.metrics.fidelity import (
    class_matched_ssim_psnr,
    frechet_distance,
    intensity_histogram_distance,
    kernel_inception_distance,
    ms_ssim,
    ms_ssim_diversity,
    ms_ssim_scales,
    nearest_neighbour_ssim,
    precision_recall_density_coverage,
)


def gaussian_with_exact_moments(n: int, mean: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    """n rows whose sample mean is exactly ``mean`` and sample covariance exactly diag(std²)."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))).T  # whiten: cov = I
    return z * std + mean


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A textured uint8 image with values well inside 0-255 (room for noise)."""
    yy, xx = np.mgrid[:size, :size]
    rng = np.random.default_rng(seed)
    fx, fy, phase = rng.uniform(3, 9), rng.uniform(3, 9), rng.uniform(0, 6)
    return np.clip(128 + 70 * np.sin(xx / fx + phase) * np.cos(yy / fy), 0, 255).astype(np.uint8)


def noisy(image: np.ndarray, sd: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sd, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def assert_json_plain(result: dict) -> None:
    json.dumps(result, allow_nan=False)  # plain Python numbers, no NaN/inf, no numpy scalars


# --------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dim", [4, 1])
def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians(dim: int) -> None:
    mean_a, std_a = np.array([0.0, 1.0, -2.0, 0.5])[:dim], np.array([1.0, 2.0, 0.5, 1.5])[:dim]
    mean_b, std_b = np.array([1.0, 0.0, -1.0, 0.5])[:dim], np.array([0.5, 2.0, 1.5, 3.0])[:dim]
    a = gaussian_with_exact_moments(400, mean_a, std_a, seed=1)
    b = gaussian_with_exact_moments(300, mean_b, std_b, seed=2)
    var_a, var_b = std_a**2, std_b**2
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_grows_with_the_mean_shift() -> None:
    base = gaussian_with_exact_moments(300, np.zeros(8), np.ones(8), seed=3)
    distances = [frechet_distance(base, base + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] < distances[1]
    assert distances[-1] == pytest.approx(8 * 2.0**2, rel=1e-8)  # same covariance: ||Δμ||²


def test_frechet_distance_refuses_bad_inputs() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_a=st.integers(10, 60),
    n_b=st.integers(10, 60),
    dim=st.integers(1, 5),
    shift=st.floats(-3, 3),
    scale=st.floats(0.1, 5),
)
def test_frechet_distance_is_symmetric_and_non_negative(
    seed: int, n_a: int, n_b: int, dim: int, shift: float, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_a, dim))
    b = rng.normal(size=(n_b, dim)) * scale + shift
    forward, backward = frechet_distance(a, b), frechet_distance(b, a)
    assert forward >= 0
    assert forward == pytest.approx(backward, rel=1e-6, abs=1e-8)


# --------------------------------------------------------------------------- KID


def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    same = kernel_inception_distance(a, b, subsets=20, subset_size=500)
    shifted = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same["mean"]) < 3 * same["std"] + 1e-3
    assert shifted["mean"] > 10 * shifted["std"]
    assert shifted["mean"] > 50 * abs(same["mean"])
    assert_json_plain(shifted)


def test_kid_on_whole_sets_is_the_unbiased_polynomial_mmd() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3)) + 0.3

    def kernel(u: np.ndarray, v: np.ndarray) -> float:
        return float((u @ v / 3 + 1) ** 3)

    m = 6
    within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    # subset_size capped at the 6 rows: every subset is the whole set, so the estimate is exact
    result = kernel_inception_distance(x, y, subsets=3, subset_size=1000)
    assert result["subset_size"] == 6
    assert result["mean"] == pytest.approx(within_x + within_y - 2 * across, rel=1e-10)
    assert result["std"] == pytest.approx(0.0, abs=1e-10)


def test_kid_is_reproducible_with_a_seed() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(200, 8))
    first = kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=7)
    assert first == kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=7)
    assert first != kernel_inception_distance(a, b, subsets=5, subset_size=100, seed=8)


# --------------------------------------------------------------------------- PRDC


def reference_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al.'s reference code, with the full distance matrices."""
    def kth(points: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.partition(d, k, axis=1)[:, k]  # column 0 of the partition is the self-distance

    real_radii, fake_radii = kth(real), kth(fake)
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # (real, fake)
    return {
        "precision": float((d < real_radii[:, None]).any(axis=0).mean()),
        "recall": float((d < fake_radii[None, :]).any(axis=1).mean()),
        "density": float((d < real_radii[:, None]).sum(axis=0).mean() / k),
        "coverage": float((d.min(axis=1) < real_radii).mean()),
    }


def test_prdc_matches_the_reference_formulas_across_chunks() -> None:
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(600, 6)), rng.normal(size=(450, 6)) * 1.3 + 0.2
    with sklearn.config_context(working_memory=1):  # 1 MiB: the fake x real walk takes several chunks
        result = precision_recall_density_coverage(real, fake, k=5)
    expected = reference_prdc(real, fake, k=5)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert_json_plain(result)


def test_prdc_balls_are_open_as_in_the_paper() -> None:
    # reals 0..5 on a line (k=1: every radius 1), fakes 6, 8, 10 (radii 2): fake 6 sits
    # exactly on real 5's boundary and is not inside; only real 5 is inside a fake ball
    real = np.arange(6, dtype=float)[:, None]
    fake = np.array([[6.0], [8.0], [10.0]])
    result = precision_recall_density_coverage(real, fake, k=1)
    assert result == {"precision": 0.0, "recall": pytest.approx(1 / 6), "density": 0.0, "coverage": 0.0, "k": 1}


def test_prdc_of_two_samples_of_one_distribution_is_near_one() -> None:
    rng = np.random.default_rng(1)
    result = precision_recall_density_coverage(rng.normal(size=(1000, 4)), rng.normal(size=(1000, 4)))
    assert result["precision"] > 0.9 and result["recall"] > 0.9 and result["coverage"] > 0.9
    assert 0.8 < result["density"] < 1.2


def test_prdc_shows_the_mode_collapse_signature() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(1000, 4))
    # a generator that only ever produces (near-copies of) three typical real points
    fake = real[rng.choice(1000, 3)][rng.integers(3, size=1000)] + rng.normal(0, 1e-3, size=(1000, 4))
    result = precision_recall_density_coverage(real, fake)
    assert result["precision"] > 0.95
    assert result["recall"] < 0.05
    assert result["coverage"] < 0.05


def test_prdc_of_a_far_away_fake_set_is_zero() -> None:
    rng = np.random.default_rng(3)
    result = precision_recall_density_coverage(rng.normal(size=(500, 8)), rng.normal(size=(500, 8)) + 50)
    assert result == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0, "k": 5}


def test_prdc_needs_more_rows_than_k() -> None:
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="at least 6"):
        precision_recall_density_coverage(rng.normal(size=(5, 3)), rng.normal(size=(50, 3)), k=5)


# --------------------------------------------------------------------------- class-matched SSIM / PSNR


def two_visibly_different_classes(per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: dark images (grey 30), class 1: bright images (grey 220), mild noise each."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], per_class).astype(np.int64)
    levels = np.where(labels == 0, 30.0, 220.0)[:, None, None]
    images = np.clip(levels + rng.normal(0, 4, (len(labels), size, size)), 0, 255).astype(np.uint8)
    return images, labels


def test_identical_sets_with_one_image_per_class_score_ssim_one() -> None:
    images = np.stack([smooth_image(64, seed) for seed in range(3)])
    labels = np.arange(3, dtype=np.int64)
    result = class_matched_ssim_psnr(images, labels, images, labels)
    assert result["ssim_mean"] == pytest.approx(1.0)
    assert result["class_matched"] is True
    assert result["identical_pairs"] == 3 and result["psnr_mean"] is None  # a copy has infinite PSNR
    assert set(result["per_class"]) == {"0", "1", "2"}
    assert_json_plain(result)


def test_pairing_only_pairs_images_of_the_same_class() -> None:
    synthetic, synthetic_labels = two_visibly_different_classes(40, seed=1)
    real, real_labels = two_visibly_different_classes(40, seed=2)
    matched = class_matched_ssim_psnr(synthetic, synthetic_labels, real, real_labels, seed=0)
    # same class: MSE ≈ 2·4² → PSNR ≈ 32 dB; a dark/bright pair is ≈ 1.7 dB and would show
    # as a low mean and a large spread within the class
    for stats in matched["per_class"].values():
        assert stats["n"] == 40
        assert stats["psnr_mean"] > 28 and stats["psnr_std"] < 1
    unconditional = class_matched_ssim_psnr(synthetic, None, real, None, seed=0)
    assert unconditional["class_matched"] is False and unconditional["per_class"] == {}
    assert unconditional["psnr_mean"] < matched["psnr_mean"] - 5  # about half the pairs cross classes
    assert_json_plain(unconditional)


def test_class_matched_pairing_is_reproducible_with_a_seed() -> None:
    synthetic = np.stack([smooth_image(32, seed) for seed in range(20)])
    real = np.stack([smooth_image(32, seed) for seed in range(100, 140)])
    labels_s, labels_r = np.arange(20) % 2, np.arange(40) % 2
    first = class_matched_ssim_psnr(synthetic, labels_s, real, labels_r, seed=3)
    assert first == class_matched_ssim_psnr(synthetic, labels_s, real, labels_r, seed=3)
    assert first != class_matched_ssim_psnr(synthetic, labels_s, real, labels_r, seed=4)


def test_class_matched_refuses_a_class_with_no_real_images_and_float_images() -> None:
    images, labels = two_visibly_different_classes(3)
    with pytest.raises(ValueError, match=r"no real images of class\(es\) \[1\]"):
        class_matched_ssim_psnr(images, labels, images[:3], labels[:3])
    with pytest.raises(ValueError, match="uint8"):
        class_matched_ssim_psnr(images / 255.0, labels, images, labels)


# --------------------------------------------------------------------------- nearest-neighbour SSIM


def test_nearest_neighbour_ssim_flags_copies() -> None:
    reference = np.stack([smooth_image(64, seed) for seed in range(10)])
    order = np.random.default_rng(0).permutation(10)
    copies = nearest_neighbour_ssim(reference[order], reference, order)
    assert copies["mean"] == pytest.approx(1.0) and copies["p95"] == pytest.approx(1.0)
    assert len(copies["values"]) == 10
    assert_json_plain(copies)
    noise = np.random.default_rng(1).integers(0, 256, (10, 64, 64), dtype=np.uint8)
    unrelated = nearest_neighbour_ssim(noise, reference, np.zeros(10, dtype=np.int64))
    assert unrelated["max"] < 0.2


def test_nearest_neighbour_ssim_refuses_an_index_out_of_range() -> None:
    images = np.stack([smooth_image(32, seed) for seed in range(3)])
    with pytest.raises(ValueError, match="out of range"):
        nearest_neighbour_ssim(images, images, np.array([0, 1, 3]))


# --------------------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize(("size", "scales"), [(64, 4), (32, 3)])
def test_ms_ssim_of_identical_images_is_one_and_falls_with_noise(size: int, scales: int) -> None:
    image = smooth_image(size)
    assert ms_ssim_scales(size, size) == (scales, 7)
    assert ms_ssim(image, image) == pytest.approx(1.0)
    scores = [ms_ssim(image, noisy(image, sd, seed=sd)) for sd in (3, 10, 30, 80)]
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[0] < 1 and scores[-1] > 0


def reference_ms_ssim(a: np.ndarray, b: np.ndarray, scales: int, window: int) -> float:
    """Wang et al.'s MS-SSIM in float64 with scipy: 'valid' Gaussian filter, 2 x 2 mean pooling."""
    from scipy.signal import correlate2d

    g = np.exp(-((np.arange(window) - (window - 1) / 2) ** 2) / (2 * 1.5**2))
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales])
    weights /= weights.sum()
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    terms = []
    for scale in range(scales):
        mu_x, mu_y = correlate2d(x, kernel, "valid"), correlate2d(y, kernel, "valid")
        var_x = correlate2d(x * x, kernel, "valid") - mu_x**2
        var_y = correlate2d(y * y, kernel, "valid") - mu_y**2
        cov = correlate2d(x * y, kernel, "valid") - mu_x * mu_y
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        if scale < scales - 1:
            terms.append(max(cs.mean(), 0.0))
            x = x.reshape(x.shape[0] // 2, 2, x.shape[1] // 2, 2).mean(axis=(1, 3))
            y = y.reshape(y.shape[0] // 2, 2, y.shape[1] // 2, 2).mean(axis=(1, 3))
        else:
            terms.append(max((((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs).mean(), 0.0))
    return float(np.prod(np.array(terms) ** weights))


@pytest.mark.parametrize("size", [64, 32])
def test_ms_ssim_matches_a_float64_reference(size: int) -> None:
    scales, window = ms_ssim_scales(size, size)
    for sd in (5, 25, 70):
        a, b = smooth_image(size, 1), noisy(smooth_image(size, 1), sd, seed=sd)
        assert ms_ssim(a, b) == pytest.approx(reference_ms_ssim(a, b, scales, window), abs=1e-5)


def test_ms_ssim_keeps_the_standard_configuration_where_it_fits() -> None:
    assert ms_ssim_scales(176, 200) == (5, 11)
    with pytest.raises(ValueError, match="smaller than the 7-px window"):
        ms_ssim(np.zeros((6, 6), np.uint8), np.zeros((6, 6), np.uint8))


def test_ms_ssim_diversity_of_identical_images_is_one_and_of_noise_is_low() -> None:
    same = np.repeat(smooth_image(64)[None], 12, axis=0)
    result = ms_ssim_diversity(same, pairs=50)
    assert result["mean"] == pytest.approx(1.0) and result["std"] == pytest.approx(0.0, abs=1e-6)
    assert result["scales"] == 4 and result["pairs"] == 50
    noise = np.random.default_rng(0).integers(0, 256, (200, 64, 64), dtype=np.uint8)
    assert ms_ssim_diversity(noise, pairs=500)["mean"] < 0.2
    assert_json_plain(result)


def test_ms_ssim_diversity_of_two_images_is_their_ms_ssim() -> None:
    a, b = smooth_image(32, 1), smooth_image(32, 2)
    result = ms_ssim_diversity(np.stack([a, b]), pairs=500)
    assert result["pairs"] == 1  # only one distinct pair exists
    assert result["mean"] == pytest.approx(ms_ssim(a, b), abs=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.sampled_from([32, 48, 64]), sd=st.floats(0, 120))
def test_ms_ssim_is_symmetric_and_at_most_one(seed: int, size: int, sd: float) -> None:
    a = smooth_image(size, seed)
    b = noisy(smooth_image(size, seed + 1), sd, seed)
    forward = ms_ssim(a, b)
    assert 0.0 <= forward <= 1.0 + 1e-9
    assert forward == pytest.approx(ms_ssim(b, a), abs=1e-6)


# --------------------------------------------------------------------------- intensity histograms


def test_histogram_distance_is_zero_for_identical_sets_and_grows_with_brightness() -> None:
    images = np.random.default_rng(0).integers(0, 200, (20, 32, 32), dtype=np.uint8)
    same = intensity_histogram_distance(images, images.copy())
    assert same == {"wasserstein": 0.0, "jensen_shannon": 0.0}
    brighter = intensity_histogram_distance(images, images + 30)
    much_brighter = intensity_histogram_distance(images, images + 55)
    assert brighter["wasserstein"] == pytest.approx(30 / 255)  # every grey level moved 30 steps
    assert much_brighter["wasserstein"] > brighter["wasserstein"]
    assert 0 < brighter["jensen_shannon"] <= much_brighter["jensen_shannon"] <= 1
    assert_json_plain(brighter)


def test_histogram_distance_compares_sets_of_different_sizes() -> None:
    rng = np.random.default_rng(1)
    result = intensity_histogram_distance(
        rng.integers(0, 256, (10, 64, 64), dtype=np.uint8), rng.integers(0, 256, (40, 32, 32), dtype=np.uint8)
    )
    assert result["wasserstein"] < 0.01 and result["jensen_shannon"] < 0.05
    assert math.isfinite(result["wasserstein"])
