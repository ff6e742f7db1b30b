"""Memorization ("fingerprint") metrics: is a synthetic image closer to a training patient
than fresh real data would be?

Every metric compares synthetic -> train distances with holdout -> train distances (the
hospital's patients never trained on): fresh real data is the reference an honest
generator should match. Distances are nearest-neighbour distances found by one
:class:`Search`: in a feature space (:class:`FeatureSearch`, e.g. the audit's encoder),
or in pixels after undoing the disguise a generator copies under
(:class:`CopySearch`: mirror, rotation, zoom, shift and intensity curve; see
:mod:`fedsynth.metrics.copies`), so a copy returned mirrored or turned a few degrees is
still a copy.

- DCR (distance to closest record): median and 5th percentile, synthetic vs holdout.
- Closer-to-train share: with train subsampled to the holdout's size, the share of
  synthetic images whose nearest train image is closer than their nearest holdout image
  (0.5 for any generator that never saw the training images; higher when it copies).
- C_T (Meehan, Chaudhuri & Dasgupta, 2020): the Mann-Whitney z-score of synthetic vs
  holdout distances to train, averaged over cells of train space; well below 0 is copying.
- Authenticity (Alaa et al., 2022): the share of synthetic images farther from their
  nearest training image than that image is from its own nearest training neighbour.
- Near-copies: synthetic images closer to train than the 1st percentile of holdout -> train.

Every synthetic image is searched against train (near-copies, DCR, C_T); the
closer-to-train share and authenticity, which need three more searches, use a random
sample of at most ``sample`` synthetic images (10,000 by default: their p-values already
resolve a copying share of a few percent).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedsynth.metrics.copies import CopyDetector, CopyIndex
from fedsynth.metrics.neighbours import nearest

__all__ = [
    "CopySearch",
    "Distances",
    "FeatureSearch",
    "Search",
    "ShareDistances",
    "authenticity",
    "authenticity_test",
    "closer_to_train_share",
    "data_copying_ct",
    "dcr_summary",
    "measure_distances",
    "near_copies",
    "share_distances_within",
]

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]
SAMPLE = 10_000


class Search(Protocol):
    """How one space finds nearest images: images are indexed once, then searched."""

    def index(self, images: np.ndarray) -> Any: ...

    def subset(self, index: Any, rows: np.ndarray) -> Any: ...

    def nearest(
        self, queries: Any, reference: Any, *, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N,) distances and (N,) indices into the reference; ``exclude``: per query, a
        reference row it may not match (its own)."""
        ...

    def features(self, index: Any) -> np.ndarray:
        """A vector per image (for clustering train space and for densities)."""
        ...


@dataclass
class FeatureSearch:
    """Exact Euclidean nearest neighbours of the images' features."""

    transform: Transform

    def index(self, images: np.ndarray) -> np.ndarray:
        return self.transform(images)

    def subset(self, index: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return index[rows]

    def nearest(
        self, queries: np.ndarray, reference: np.ndarray, *, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        d, i = nearest(queries, reference, exclude=exclude)
        return d[:, 0], i[:, 0]

    def features(self, index: np.ndarray) -> np.ndarray:
        return index


@dataclass
class CopySearch:
    """Nearest images after undoing mirror, rotation, zoom, shift and intensity curve
    (:class:`~fedsynth.metrics.copies.CopyDetector`). The poses of the last search's
    matches are kept (``last_theta``) for the gallery."""

    detector: CopyDetector = field(default_factory=CopyDetector)
    last_theta: np.ndarray | None = None

    def index(self, images: np.ndarray) -> CopyIndex:
        return self.detector.index(images)

    def subset(self, index: CopyIndex, rows: np.ndarray) -> CopyIndex:
        return index.subset(rows)

    def nearest(
        self, queries: CopyIndex, reference: CopyIndex, *, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        matches = self.detector.nearest(queries, reference, exclude=exclude)
        self.last_theta = matches.theta
        return matches.distance, matches.index

    def features(self, index: CopyIndex) -> np.ndarray:
        return self.detector.features(index)


@dataclass
class Distances:
    """Nearest-neighbour distances in one space (arrays, kept out of audit.json).

    ``sample`` indexes the synthetic images that the share test and authenticity use;
    the ``synthetic_to_holdout*`` and ``synthetic_to_train_subset*`` arrays, and
    ``subset_unit`` / ``holdout_unit``, are over that sample. ``train_to_train`` is NaN
    for training images that no sampled or holdout image has as its nearest.
    """

    space: str
    synthetic_to_train: np.ndarray
    synthetic_to_train_index: np.ndarray
    synthetic_to_holdout: np.ndarray
    synthetic_to_holdout_index: np.ndarray
    holdout_to_train: np.ndarray
    holdout_to_train_index: np.ndarray
    synthetic_to_train_subset: np.ndarray  # train subsampled to the holdout's size
    synthetic_to_train_subset_index: np.ndarray
    train_subset_size: int
    train_to_train: np.ndarray  # each training image to its nearest other training image
    train_features: np.ndarray
    holdout_features: np.ndarray
    synthetic_features: np.ndarray
    subset_unit: np.ndarray  # patient of each sampled synthetic image's nearest train-subsample image
    holdout_unit: np.ndarray  # patient of each sampled synthetic image's nearest holdout image
    train_share: float = 1.0  # the subsample's share of training patients
    sample: np.ndarray | None = None  # None: every synthetic image
    synthetic_theta: np.ndarray | None = None  # (N, 2, 3) pose of each synthetic image's match (copy search)
    holdout_theta: np.ndarray | None = None  # the same for each holdout image's match in train
    synthetic_index: Any = None  # the synthetic images as the search indexed them (membership inference)
    holdout_index: Any = None  # the holdout, the same way (the gallery)
    train_index: Any = None  # the training images, the same way (the share within classes)
    train_patients: np.ndarray | None = None  # patient id per training image, as strings
    holdout_patients: np.ndarray | None = None  # the same per holdout image

    @property
    def sampled(self) -> np.ndarray | slice:
        """The synthetic images the share test and authenticity use."""
        return slice(None) if self.sample is None else self.sample


def measure_distances(
    space: str,
    search: Search,
    *,
    synthetic: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    seed: int = 0,
    train_patients: np.ndarray | None = None,
    holdout_patients: np.ndarray | None = None,
    sample: int = SAMPLE,
) -> Distances:
    """All the nearest-neighbour distances the memorization metrics and galleries need.

    Parameters
    ----------
    space : the space's name.
    search : how nearest images are found (:class:`CopySearch`, :class:`FeatureSearch`).
    synthetic, train, holdout : uint8 images (N, H, W).
    seed : seed of the train subsample of the holdout's size, and of the synthetic sample.
    train_patients, holdout_patients : patient id per image; the train subsample then
        takes as many whole patients as the holdout has (so the two are exchangeable),
        and the share test groups images by patient. None: every image is a patient.
    sample : at most this many synthetic images for the share test and authenticity.
    """
    finder = search
    train_x, holdout_x, synthetic_x = finder.index(train), finder.index(holdout), finder.index(synthetic)
    st_d, st_i = finder.nearest(synthetic_x, train_x)
    theta = finder.last_theta if isinstance(finder, CopySearch) else None
    ht_d, ht_i = finder.nearest(holdout_x, train_x)
    holdout_theta = finder.last_theta if isinstance(finder, CopySearch) else None
    train_p = _patients(train_patients, len(train), "")
    holdout_p = _patients(holdout_patients, len(holdout), "h")
    share = _share_distances(
        finder, synthetic_x, len(synthetic), train_x, holdout_x, train_p, holdout_p, seed=seed, sample=sample
    )
    # each needed training image to its nearest other training image (authenticity)
    needed = np.unique(np.concatenate([st_i[share.sample], ht_i]))
    tt_d = np.full(len(train), np.nan, dtype=np.float32)
    if len(train) > 1:
        queries = train_x if len(needed) == len(train) else finder.subset(train_x, needed)
        tt_d[needed], _ = finder.nearest(queries, train_x, exclude=needed)
    return Distances(
        space,
        st_d,
        st_i,
        share.synthetic_to_holdout,
        share.synthetic_to_holdout_index,
        ht_d,
        ht_i,
        share.synthetic_to_train_subset,
        share.synthetic_to_train_subset_index,
        share.train_subset_size,
        tt_d,
        finder.features(train_x),
        finder.features(holdout_x),
        finder.features(synthetic_x),
        share.subset_unit,
        share.holdout_unit,
        train_share=share.train_share,
        sample=share.sample,
        synthetic_theta=theta,
        holdout_theta=holdout_theta,
        synthetic_index=synthetic_x,
        holdout_index=holdout_x,
        train_index=train_x,
        train_patients=train_p,
        holdout_patients=holdout_p,
    )


def _patients(ids: np.ndarray | None, n: int, prefix: str) -> np.ndarray:
    """Patient ids as strings; None: every image its own patient."""
    if ids is None:
        return np.char.add(prefix, np.arange(n).astype(str))
    return np.asarray(ids).astype(str)


@dataclass
class ShareDistances:
    """What the closer-to-train share needs, over a sample of the synthetic images: each
    one's nearest holdout and train-subsample image (train subsampled to as many whole
    patients as the holdout has), and the patient behind each."""

    synthetic_to_holdout: np.ndarray
    synthetic_to_holdout_index: np.ndarray
    synthetic_to_train_subset: np.ndarray
    synthetic_to_train_subset_index: np.ndarray
    train_subset_size: int
    subset_unit: np.ndarray
    holdout_unit: np.ndarray
    train_share: float
    sample: np.ndarray


def _share_distances(
    finder: Search,
    synthetic_x: Any,
    n_synthetic: int,
    train_x: Any,
    holdout_x: Any,
    train_p: np.ndarray,
    holdout_p: np.ndarray,
    *,
    seed: int,
    sample: int,
) -> ShareDistances:
    """The two searches of the closer-to-train share, on indexed images."""
    rng = np.random.default_rng(seed)
    train_ids = np.unique(train_p)
    chosen = rng.choice(train_ids, size=min(len(np.unique(holdout_p)), len(train_ids)), replace=False)
    subset = np.flatnonzero(np.isin(train_p, chosen))
    rows = (
        np.arange(n_synthetic)
        if n_synthetic <= sample
        else np.sort(rng.choice(n_synthetic, size=sample, replace=False))
    )
    sampled_x = synthetic_x if len(rows) == n_synthetic else finder.subset(synthetic_x, rows)
    sh_d, sh_i = finder.nearest(sampled_x, holdout_x)
    sts_d, sts_i = finder.nearest(sampled_x, finder.subset(train_x, subset))
    # the patient (unit of the share test) behind each sampled image's nearest subsample/holdout image
    return ShareDistances(
        sh_d,
        sh_i,
        sts_d,
        sts_i,
        len(subset),
        np.char.add("t:", train_p[subset][sts_i]),
        np.char.add("h:", holdout_p[sh_i]),
        len(chosen) / len(train_ids),
        rows,
    )


def share_distances_within(
    d: Distances,
    search: Search,
    *,
    synthetic: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    seed: int = 0,
    sample: int = SAMPLE,
) -> ShareDistances:
    """The closer-to-train share's searches for a part of the images that ``d`` measured
    (boolean masks or rows of its synthetic, train and holdout images: one class, say),
    reusing the images ``search`` indexed for ``d``; the same as
    :func:`measure_distances` on that part, without the searches only the whole set needs."""
    synthetic, train, holdout = (
        np.flatnonzero(m) if m.dtype == bool else m for m in (synthetic, train, holdout)
    )
    if (
        d.synthetic_index is None
        or d.train_index is None
        or d.holdout_index is None
        or d.train_patients is None
        or d.holdout_patients is None
    ):
        raise ValueError("share_distances_within: these distances keep no indexed images")
    return _share_distances(
        search,
        search.subset(d.synthetic_index, synthetic),
        len(synthetic),
        search.subset(d.train_index, train),
        search.subset(d.holdout_index, holdout),
        d.train_patients[train],
        d.holdout_patients[holdout],
        seed=seed,
        sample=sample,
    )


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(values)),
        "p05": float(np.quantile(values, 0.05)),
        "p01": float(np.quantile(values, 0.01)),
        "mean": float(values.mean()),
    }


def dcr_summary(d: Distances) -> dict[str, Any]:
    """Distance to closest training record, synthetic vs holdout, and the ratio of medians
    (below 1: synthetic images sit closer to training patients than fresh patients do)."""
    ref_median = float(np.median(d.holdout_to_train))
    return {
        "synthetic": _quantiles(d.synthetic_to_train),
        "holdout": _quantiles(d.holdout_to_train),
        "median_ratio": float(np.median(d.synthetic_to_train) / ref_median)
        if ref_median > 0
        else float("nan"),
        "p05_ratio": _safe_ratio(
            np.quantile(d.synthetic_to_train, 0.05), np.quantile(d.holdout_to_train, 0.05)
        ),
    }


def _safe_ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def closer_to_train_share(d: Distances | ShareDistances) -> dict[str, Any]:
    """Share of synthetic images nearer to a training image than to any holdout image,
    with train subsampled to the holdout's size (ties counted half), and a one-sided
    test against 0.5 that is robust to many images sharing one nearest real image.

    With equal sizes the reference is exactly 0.5 for any generator that never saw the
    training images (train subsample and holdout are exchangeable draws of the same
    patients), however poor its images: far-away images do not drift towards the larger
    set. A generator that copies every training image scores 0.5 + s/2, s being the
    subsample's share of train; the other measures use the whole training set.
    """
    closer, units = _closer_and_units(d)
    share, p_value, distinct = _share_test(closer, units)
    # a generator copying every training image scores 0.5 + s/2 (s: the subsample's share of
    # training patients); the excess as a share of that is comparable across split sizes
    copied = (share - 0.5) / (0.5 * d.train_share) if d.train_share > 0 else float("nan")
    return {
        "share": share,
        "reference": 0.5,
        "p_value": p_value,
        "n": int(len(closer)),
        "distinct_nearest_patients": distinct,
        "train_subset": int(d.train_subset_size),
        "train_subset_patient_share": d.train_share,
        "copying_equivalent": float(copied),
    }


def _closer_and_units(d: Distances | ShareDistances) -> tuple[np.ndarray, np.ndarray]:
    """Per sampled synthetic image: 1 when its nearest train-subsample image is nearer than
    its nearest holdout image (ties 0.5), and the patient behind the nearer of the two."""
    closer = (d.synthetic_to_train_subset < d.synthetic_to_holdout).astype(float)
    closer[d.synthetic_to_train_subset == d.synthetic_to_holdout] = 0.5
    in_train = d.synthetic_to_train_subset <= d.synthetic_to_holdout
    return closer, np.where(in_train, d.subset_unit, d.holdout_unit).astype(str)


def _share_test(closer: np.ndarray, units: np.ndarray) -> tuple[float, float, int]:
    """The share, its one-sided p-value against 0.5, and the number of distinct units.

    The images are not independent trials: a poor generator's images may all fall nearest
    one "hub" real image, and slices of one patient sit on one side of the split together,
    by one coin flip. So each patient behind a nearest real image is one unit (in the train
    subsample with probability 1/2 under the null): share = sum_u w_u [u in train],
    variance 1/4 sum_u w_u^2, w_u = share of synthetic images whose nearest real image
    belongs to u. Copies each pick their own original.
    """
    from scipy.stats import norm  # SciPy and scikit-learn load when an audit runs, not with the CLI

    _, counts = np.unique(units, return_counts=True)
    sd = 0.5 * float(np.sqrt(((counts / len(units)) ** 2).sum()))
    share = float(closer.mean())
    p_value = float(norm.sf((share - 0.5) / sd)) if sd > 0 else float(share <= 0.5)
    return share, p_value, int(len(counts))


def closer_to_train_within_classes(
    by_class: dict[str, ShareDistances] | dict[str, Distances],
) -> dict[str, Any]:
    """:func:`closer_to_train_share` measured within each class (each class's synthetic
    images against that class's train subsample and holdout), then pooled into one test.

    Over the whole set, a holdout whose class mix differs from train's tilts the share: the
    synthetic images of a class with few holdout patients find their nearest slice in
    train, copying or not. Within a class the two sides are exchangeable again. A patient
    with slices in several classes is one unit of the pooled test (its side of the split is
    one coin flip), which is the conservative choice.
    """
    if not by_class:
        raise ValueError("closer_to_train_within_classes: no class to measure")
    per_class = {name: closer_to_train_share(d) for name, d in by_class.items()}
    parts = [_closer_and_units(d) for d in by_class.values()]
    share, p_value, distinct = _share_test(
        np.concatenate([c for c, _ in parts]), np.concatenate([u for _, u in parts])
    )
    n = np.array([len(c) for c, _ in parts], dtype=float)
    # copying every training image scores 0.5 + s_k/2 in class k: pooled, 0.5 + mean(s)/2
    train_share = float((n * [d.train_share for d in by_class.values()]).sum() / n.sum())
    return {
        "share": share,
        "reference": 0.5,
        "p_value": p_value,
        "n": int(n.sum()),
        "distinct_nearest_patients": distinct,
        "train_subset": int(sum(d.train_subset_size for d in by_class.values())),
        "train_subset_patient_share": train_share,
        "copying_equivalent": (share - 0.5) / (0.5 * train_share) if train_share > 0 else float("nan"),
        "within_classes": True,
        "by_class": per_class,
    }


def data_copying_ct(
    d: Distances, *, cells: int | None = None, min_per_cell: int = 10, seed: int = 0
) -> dict[str, Any]:
    """Meehan et al.'s C_T: cells from k-means on train features; in each cell, the
    Mann-Whitney z-score of synthetic vs holdout distances to train (negative: synthetic
    closer); C_T is their average weighted by the holdout's share of each cell. Cells with
    fewer than ``min_per_cell`` holdout or synthetic images are left out (their share of
    the holdout is reported).
    """
    n_holdout = len(d.holdout_features)
    if cells is None:
        cells = int(np.clip(n_holdout // 40, 1, 20))
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=cells, n_init=3, random_state=seed).fit(d.train_features)
    h_cell = kmeans.predict(d.holdout_features)
    s_cell = kmeans.predict(d.synthetic_features)
    z_scores, weights, kept = [], [], 0
    for cell in range(cells):
        h = d.holdout_to_train[h_cell == cell]
        s = d.synthetic_to_train[s_cell == cell]
        if len(h) < min_per_cell or len(s) < min_per_cell:
            continue
        kept += len(h)
        # U counts (synthetic, holdout) pairs where the synthetic image is farther from train
        ranks = _ranks(np.concatenate([s, h]))
        u = ranks[: len(s)].sum() - len(s) * (len(s) + 1) / 2
        mean, sd = len(s) * len(h) / 2, np.sqrt(len(s) * len(h) * (len(s) + len(h) + 1) / 12)
        z_scores.append(float((u - mean) / sd))
        weights.append(len(h) / n_holdout)
    if not z_scores:
        return {
            "c_t": float("nan"),
            "cells": cells,
            "cells_used": 0,
            "holdout_share_used": 0.0,
            "reason": f"no cell held {min_per_cell} holdout and {min_per_cell} synthetic images",
        }
    c_t = float(np.average(z_scores, weights=weights))
    return {
        "c_t": c_t,
        "cells": cells,
        "cells_used": len(z_scores),
        "holdout_share_used": kept / n_holdout,
        "cell_z": z_scores,
    }


def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values)


def authenticity(d: Distances, *, queries: str = "synthetic") -> float:
    """Alaa et al.'s authenticity: share of query images farther from their nearest
    training image than that training image is from its own nearest training neighbour.
    ``queries`` = "holdout" gives the real-data reference."""
    if queries == "holdout":
        dist, idx = d.holdout_to_train, d.holdout_to_train_index
    else:  # the sampled synthetic images (all of them, up to the sample size)
        dist, idx = d.synthetic_to_train[d.sampled], d.synthetic_to_train_index[d.sampled]
    return float((dist > d.train_to_train[idx]).mean())


def authenticity_test(d: Distances) -> dict[str, Any]:
    """Authenticity of the synthetic images against the holdout's, with a one-sided test
    that counts each nearest training image once (a collapsed generator whose images all
    land next to one outlying training image is one observation, not thousands).

    Returns synthetic, holdout, the gap, the number of distinct nearest training images
    and the p-value of "synthetic less authentic than fresh real data".
    """
    synthetic, holdout = authenticity(d), authenticity(d, queries="holdout")
    _, counts = np.unique(d.synthetic_to_train_index[d.sampled], return_counts=True)
    weights = counts / counts.sum()
    spread = holdout * (1 - holdout)
    sd = float(np.sqrt(spread * (weights**2).sum() + spread / len(d.holdout_to_train)))
    gap = synthetic - holdout
    from scipy.stats import norm

    p_value = float(norm.cdf(gap / sd)) if sd > 0 else float(gap >= 0)
    return {
        "synthetic": synthetic,
        "holdout": holdout,
        "gap": gap,
        "p_value": p_value,
        "distinct_nearest_train_images": int(len(counts)),
    }


def near_copies(d: Distances, *, percentile: float = 1.0, exact: float = 1e-6) -> dict[str, Any]:
    """Synthetic images closer to train than ``percentile``% of holdout images are, and
    every exact copy (distance <= ``exact``) whatever the holdout does: the flagged
    indices (closest first), their share, and the threshold distance.

    ``holdout_exact_share`` > 0 means the real data itself holds images duplicated across
    train and holdout; the threshold is then 0 and the reference is not to be trusted.
    """
    # "lower": the threshold is a holdout distance, so at most `percentile`% of holdout images fall below it
    threshold = float(np.percentile(d.holdout_to_train, percentile, method="lower"))
    flagged = np.flatnonzero((d.synthetic_to_train < threshold) | (d.synthetic_to_train <= exact))
    flagged = flagged[np.argsort(d.synthetic_to_train[flagged], kind="stable")]
    below = int((d.holdout_to_train < threshold).sum())
    # an honest image falls below the k-th smallest of n holdout distances with chance (k+1)/(n+1)
    null_rate = (below + 1) / (len(d.holdout_to_train) + 1)
    from scipy.stats import binomtest

    p_value = float(
        binomtest(len(flagged), len(d.synthetic_to_train), null_rate, alternative="greater").pvalue
    )
    return {
        "share": float(len(flagged) / len(d.synthetic_to_train)),
        "count": int(len(flagged)),
        "threshold": threshold,
        "percentile": percentile,
        "null_rate": null_rate,
        "p_value": p_value,
        "exact_copies": int((d.synthetic_to_train <= exact).sum()),
        "holdout_share": float(((d.holdout_to_train < threshold) | (d.holdout_to_train <= exact)).mean()),
        "holdout_exact_share": float((d.holdout_to_train <= exact).mean()),
        "indices": flagged.tolist(),
    }
