"""The one confidence-interval helper: 95% intervals of a mean, by bootstrap or by the
normal approximation, in the one shape every report reads (``mean``, ``ci_low``, ``ci_high``)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["interval", "mean_interval", "percentile_bounds"]


def percentile_bounds(samples: np.ndarray | list[float], level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of resampled statistics (NaNs ignored)."""
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(np.asarray(samples, dtype=float), [tail, 100 - tail])
    return float(low), float(high)


def interval(mean: float, low: float, high: float, **extra: Any) -> dict[str, Any]:
    """``{"mean", "ci_low", "ci_high", **extra}``: the shape of every interval fedsynth reports."""
    return {"mean": float(mean), "ci_low": float(low), "ci_high": float(high), **extra}


def mean_interval(
    values: np.ndarray | list[float],
    *,
    method: str = "bootstrap",
    rng: np.random.Generator | None = None,
    resamples: int = 1000,
) -> dict[str, Any]:
    """A 95% interval of the mean of ``values``.

    ``bootstrap``: percentiles of the means of ``resamples`` resamples with replacement
    (drawn from ``rng``), for many values (per-slice scores). ``normal``: mean +- 1.96
    standard errors, for a few values (per-seed results); NaN bounds with one value.
    """
    arr = np.asarray(values, dtype=float)
    if method == "normal":
        half = 1.96 * arr.std(ddof=1) / np.sqrt(len(arr)) if len(arr) > 1 else float("nan")
        return interval(arr.mean(), arr.mean() - half, arr.mean() + half)
    if method != "bootstrap":
        raise ValueError(f"interval method {method!r}: bootstrap or normal")
    rng = rng if rng is not None else np.random.default_rng(0)
    means = [float(arr[rng.integers(0, len(arr), len(arr))].mean()) for _ in range(resamples)]
    return interval(arr.mean(), *percentile_bounds(means))
