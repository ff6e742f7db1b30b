"""Mask-conditioned (paired) fidelity for pix2pix: the generated slice against the real
slice of the same mask.

A noise-to-image generator has no "right answer" for any one sample, so its fidelity is
judged by distributions (FD, precision/recall). pix2pix does: for a real slice's mask,
the real slice itself is the reference. SSIM and PSNR of generated vs real over
**holdout** masks (patients never trained on) measure how well the model renders
anatomy it has not seen; the same over **training** masks measures how much it
reproduces the training patients it was fitted to (its L1 loss asks for exactly that).
The gap between the two is a memorization signal specific to paired models: a large gap
means a patient's mask alone brings back their slice.

SSIM and PSNR are scikit-image's (7 x 7 uniform window, data range 255), as in the
class-matched SSIM of :mod:`fedsynth.metrics.fidelity` and the MedScanGAN protocol.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedsynth.core.stats import interval, mean_interval, percentile_bounds

__all__ = ["paired_fidelity", "psnr", "ssim"]


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM of two uint8 stacks (N, H, W)."""
    from skimage.metrics import structural_similarity  # scikit-image loads when pairs are scored

    return np.array([structural_similarity(x, y, data_range=255) for x, y in zip(a, b, strict=True)])


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of two uint8 stacks (N, H, W), capped at 100 dB for identical images."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mse = (diff**2).reshape(len(diff), -1).mean(axis=1)
    return np.where(mse > 0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)), 100.0)


def _summary(values: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    return {**mean_interval(values, rng=rng), "n": int(len(values))}


def paired_fidelity(
    generated_holdout: np.ndarray,
    real_holdout: np.ndarray,
    generated_train: np.ndarray | None = None,
    real_train: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """SSIM and PSNR of generated vs real slices of the same masks, with bootstrap 95%
    CIs of the mean; over holdout masks and, if given, training masks, and their gap
    (train minus holdout; with a CI from the two bootstraps)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {
        "holdout": {
            "ssim": _summary(ssim(generated_holdout, real_holdout), rng),
            "psnr": _summary(psnr(generated_holdout, real_holdout), rng),
        }
    }
    if generated_train is not None and real_train is not None and len(real_train):
        s_train, p_train = ssim(generated_train, real_train), psnr(generated_train, real_train)
        out["train"] = {"ssim": _summary(s_train, rng), "psnr": _summary(p_train, rng)}
        s_hold = ssim(generated_holdout, real_holdout)
        gaps = [
            float(
                s_train[rng.integers(0, len(s_train), len(s_train))].mean()
                - s_hold[rng.integers(0, len(s_hold), len(s_hold))].mean()
            )
            for _ in range(1000)
        ]
        out["ssim_gap"] = interval(s_train.mean() - s_hold.mean(), *percentile_bounds(gaps))
    return out
