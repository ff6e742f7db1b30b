"""Downstream utility: does adding synthetic slices to a small classifier's training set
help on held-out real slices, measured against an honest re-balancing control?

The study trains the same classifier (same architecture, optimiser, augmentation, batch
size and number of optimiser steps) on several training sets and scores each on the
held-out REAL slices, which no classifier ever trains on:

- ``real``: the real training slices alone.
- ``real+synthetic-Rx``: real plus R x (real training size) synthetic slices, drawn
  without replacement in the class proportions the synthetic set offers.
- ``real+synthetic-balanced``: real plus synthetic slices drawn per class so the
  combined set is class-balanced.
- ``real+resampled-balanced``: the control. Real plus exactly the balanced condition's
  per-class numbers, re-drawn with replacement from the REAL training slices of each
  class. Re-balancing and a different mix of batches raise balanced accuracy by
  themselves; that part of a gain is not the generator's. (Measured once on brain MRI:
  a weak GAN's +0.09 balanced-accuracy gain over real alone became -0.05, 95% CI -0.12
  to +0.02, against this control.)
- ``synthetic-only``: as many synthetic slices as real training slices (the
  classification accuracy score, CAS: how well the synthetic classes alone teach a
  classifier, beside ``real`` trained on as many real images).
- ``real+unseen-real-balanced``: the oracle, run when a pool of real training images the
  small set does not contain is given. Real plus exactly the balanced condition's
  per-class numbers drawn from that pool: the ceiling of what a generator trained on all
  the training data could transfer. Each synthetic condition's gain over the control is
  also reported as a share of the oracle's; an oracle that gains nothing over the control
  means the study has no headroom to show, and a synthetic gain of zero means nothing.

Every condition trains for the same number of optimiser steps, with no early stopping
and no model selection: the model after the last step is the one scored. Gains come
with 95% bootstrap intervals over the held-out slices (or whole patients), paired
across conditions and seeds. Those intervals cover the sampling of the held-out set;
the spread over training seeds is reported next to them as a standard deviation.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.core.plotting import pyplot
from fedsynth.core.progress import Progress
from fedsynth.core.stats import interval, percentile_bounds
from fedsynth.metrics.classifier import MODELS, predict_proba, train_classifier
from fedsynth.privacy.accounting import PrivacyError, PrivacyPlan, epsilon_for, plan_privacy
from fedsynth.privacy.classifier import train_private_classifier
from fedsynth.runs.config import DPConfig

__all__ = [
    "BALANCED",
    "CONDITIONS",
    "CONTROL",
    "DEFAULT_STEPS",
    "DP_SGD",
    "ORACLE",
    "PrivateBaseline",
    "REAL",
    "SYNTHETIC_ONLY",
    "ratio_condition",
    "plot_gain_vs_ratio",
    "small_set",
    "utility_study",
]

log = logging.getLogger(__name__)

REAL = "real"
BALANCED = "real+synthetic-balanced"
CONTROL = "real+resampled-balanced"
SYNTHETIC_ONLY = "synthetic-only"
ORACLE = "real+unseen-real-balanced"
DP_SGD = "real-dp-sgd"
CONDITIONS = (
    REAL,
    "real+synthetic-0.5x",
    "real+synthetic-1x",
    "real+synthetic-2x",
    BALANCED,
    CONTROL,
    SYNTHETIC_ONLY,
)
GAIN_METRICS = ("balanced_accuracy", "auc")
# Optimiser steps for every condition: with batch 64, ~15 epochs of a 2,000-image real
# training set. Measured for the small CNN at 64x64 on a 2-core CPU: ~2,300 images/s
# with 1 torch thread, 3,200-4,500 with 2 free cores, so one classifier takes 7-13 s
# and a 3,000-image audit (7 conditions x 5 seeds, 35 classifiers) 4-8 minutes; on a
# GPU, seconds. Brain MRI, 2,009 training slices: balanced accuracy 0.82 after 300
# steps, 0.86 after 480-500, 0.88 after 800. Fewer steps would shortchange the larger
# real+synthetic sets, which see fewer epochs in the same number of steps.
DEFAULT_STEPS = 480
MIN_IMAGE_SIZE = 16
_BOOTSTRAP_CHUNK = 250


@dataclass(frozen=True)
class PrivateBaseline:
    """The ``real-dp-sgd`` condition: the same classifier trained by DP-SGD on the real
    training images alone, at ``epsilon`` per privacy unit (``unit_ids``: one per
    training image; images sharing an id are one patient), for the same steps and
    (expected) batch as every other condition. Synthetic images released under DP are
    worth their cost where a classifier trained on them comes near this one
    (Dockhorn et al., TMLR 2023)."""

    epsilon: float
    unit_ids: np.ndarray
    unit: str = "patient"
    delta: float = 0.0  # 0: min(1e-5, 1 / (10 units))
    max_grad_norm: float = 1.0


def ratio_condition(ratio: float) -> str:
    """The condition name for ``ratio`` x the real training size of synthetic slices
    (``0.5`` -> ``real+synthetic-0.5x``, ``2.0`` -> ``real+synthetic-2x``)."""
    return f"real+synthetic-{ratio:g}x"


# --- metrics ------------------------------------------------------------------------------
def _metrics(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro one-vs-rest sensitivity / specificity and
    macro one-vs-rest ROC AUC (for two classes: the usual AUC, plus sensitivity and
    specificity of class 1 as the positive class)."""
    # scikit-learn loads when a study is scored, not with every fedsynth command
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score

    pred = probs.argmax(axis=1)
    cm = confusion_matrix(labels, pred, labels=list(range(n_classes))).astype(float)
    tp = np.diag(cm)
    fn = cm.sum(axis=1) - tp
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - tp - fn - fp
    sensitivity = tp / (tp + fn)
    specificity = tn / (tn + fp)
    if n_classes == 2:
        auc = roc_auc_score(labels, probs[:, 1])
    else:
        auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        "sensitivity": float(np.mean(sensitivity)),
        "specificity": float(np.mean(specificity)),
        "auc": float(auc),
    }
    if n_classes == 2:
        out["sensitivity_positive"] = float(sensitivity[1])
        out["specificity_positive"] = float(specificity[1])
    return out


def _weighted_balanced_accuracy(
    labels: np.ndarray, pred: np.ndarray, weights: np.ndarray, n_classes: int
) -> np.ndarray:
    """Balanced accuracy for each row of ``weights`` (B, N): a bootstrap resample given
    as how often each held-out slice was drawn. Classes absent from a resample are left
    out of its average, as scikit-learn does."""
    onehot = np.eye(n_classes)[labels]
    per_class = weights @ onehot
    correct = weights @ (onehot * (pred == labels)[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(per_class > 0, correct / per_class, np.nan)
    return np.nanmean(recall, axis=1)


def _weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` for the binary ``positive`` under each row of ``weights``.

    Written here because the bootstrap needs thousands of AUCs: scikit-learn's
    ``roc_auc_score`` takes one resample per call (about a millisecond each). This is
    the Mann-Whitney form (ties count one half), equal to scikit-learn's trapezoidal
    AUC on the resampled set, computed for all resamples at once from one sort.
    """
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = positive[order].astype(float)
    pos_w = np.add.reduceat(w * pos, starts, axis=1)
    neg_w = np.add.reduceat(w * (1.0 - pos), starts, axis=1)
    below = np.cumsum(neg_w, axis=1) - neg_w
    total_pos, total_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_w * (below + 0.5 * neg_w)).sum(axis=1) / (total_pos * total_neg)
    return np.where((total_pos > 0) & (total_neg > 0), auc, np.nan)


def _weighted_macro_auc(
    labels: np.ndarray, probs: np.ndarray, weights: np.ndarray, n_classes: int
) -> np.ndarray:
    """Macro one-vs-rest AUC per resample (for two classes, the AUC of class 1)."""
    if n_classes == 2:
        return _weighted_auc(labels == 1, probs[:, 1], weights)
    per_class = [_weighted_auc(labels == k, probs[:, k], weights) for k in range(n_classes)]
    return np.nanmean(np.stack(per_class, axis=1), axis=1)


def _bootstrap_weights(
    n: int, groups: np.ndarray | None, rounds: int, rng: np.random.Generator
) -> np.ndarray:
    """(rounds, n) draw counts of each held-out slice: slices drawn with replacement, or,
    with ``groups``, whole groups (patients) drawn with replacement."""
    if groups is None:
        return rng.multinomial(n, np.full(n, 1.0 / n), size=rounds).astype(float)
    _, code = np.unique(groups, return_inverse=True)
    n_groups = int(code.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=rounds)
    return counts[:, code].astype(float)


# --- composing the training sets ----------------------------------------------------------
def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder)."""
    weights = np.asarray(weights, dtype=float)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def _capped_allocation(total: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Proportional to ``weights`` where ``caps`` allow; what a capped class cannot take
    goes to the other classes in proportion. ``total`` must not exceed ``caps.sum()``."""
    counts = np.zeros(len(caps), dtype=np.int64)
    open_ = caps > 0
    remaining = total
    while remaining > 0:
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:
            w = open_.astype(float)
        share = _largest_remainder(remaining, w)
        share = np.minimum(share, caps - counts)
        counts += share
        remaining = total - int(counts.sum())
        open_ = counts < caps
    return counts


def _plan_counts(
    train_counts: np.ndarray,
    synthetic_counts: np.ndarray,
    ratios: Sequence[float],
    class_names: Sequence[str],
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Per-class numbers of images each condition ADDS to (or, for synthetic-only, uses
    instead of) the real training set, and the reasons for the conditions skipped."""
    n_train = int(train_counts.sum())
    available = int(synthetic_counts.sum())
    added: dict[str, np.ndarray] = {REAL: np.zeros_like(train_counts)}
    skipped: dict[str, str] = {}
    for ratio in ratios:
        name = ratio_condition(ratio)
        wanted = int(round(ratio * n_train))
        if wanted < 1:
            skipped[name] = f"{ratio:g} x {n_train} training images is less than one image"
        elif wanted > available:
            skipped[name] = f"needs {wanted} synthetic images, only {available} available"
        else:
            added[name] = _largest_remainder(wanted, synthetic_counts)
    if np.all(train_counts == train_counts.max()):
        balance = _largest_remainder(n_train, np.ones(len(train_counts)))
    else:
        balance = train_counts.max() - train_counts
    short = [
        f"{class_names[k]} (needs {balance[k]}, has {synthetic_counts[k]})"
        for k in range(len(balance))
        if balance[k] > synthetic_counts[k]
    ]
    if short:
        skipped[BALANCED] = "too few synthetic images of " + ", ".join(short)
    else:
        added[BALANCED] = balance
    added[CONTROL] = balance
    if n_train > available:
        skipped[SYNTHETIC_ONLY] = f"needs {n_train} synthetic images, only {available} available"
    else:
        added[SYNTHETIC_ONLY] = _capped_allocation(n_train, train_counts, synthetic_counts)
    return added, skipped


def _draw(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator, *, replace: bool) -> np.ndarray:
    """Indices into ``labels``: ``counts[k]`` of class k, drawn at random."""
    picked = [
        rng.choice(np.flatnonzero(labels == k), size=int(c), replace=replace)
        for k, c in enumerate(counts)
        if c > 0
    ]
    return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)


def _compose(
    condition: str,
    added: np.ndarray,
    train_labels: np.ndarray,
    synthetic_labels: np.ndarray,
    rng: np.random.Generator,
    unseen_labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(real indices, synthetic indices) of one condition's training set for one seed;
    the oracle's unseen real images are indexed after the training images."""
    everything = np.arange(len(train_labels))
    if condition in (REAL, DP_SGD):
        return everything, np.zeros(0, dtype=np.int64)
    if condition == ORACLE:
        assert unseen_labels is not None
        extra = len(train_labels) + _draw(unseen_labels, added, rng, replace=False)
        return np.concatenate([everything, extra]), np.zeros(0, dtype=np.int64)
    if condition == CONTROL:
        extra = _draw(train_labels, added, rng, replace=True)
        return np.concatenate([everything, extra]), np.zeros(0, dtype=np.int64)
    synthetic = _draw(synthetic_labels, added, rng, replace=False)
    if condition == SYNTHETIC_ONLY:
        return np.zeros(0, dtype=np.int64), synthetic
    return everything, synthetic


def small_set(labels: np.ndarray, groups: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray:
    """A mask of a small hospital's share of a training set: whole patients (``groups``),
    drawn at random until every class holds ``fraction`` of its images (at least 2).
    The rest are the images the oracle may add: other patients, never the small set's.

    Raises
    ------
    ValueError
        ``fraction`` outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"utility fraction must be between 0 and 1 (exclusive); got {fraction}")
    labels, groups = np.asarray(labels), np.asarray(groups)
    classes, counts = np.unique(labels, return_counts=True)
    target = dict(
        zip(classes.tolist(), np.maximum(2, np.ceil(fraction * counts)).astype(int).tolist(), strict=True)
    )
    held = dict.fromkeys(target, 0)
    small = np.zeros(len(labels), dtype=bool)
    for group in np.random.default_rng([seed, 0x5A11]).permutation(np.unique(groups)):
        members = groups == group
        present = np.unique(labels[members]).tolist()
        if any(held[k] < target[k] for k in present):
            small |= members
            for k in present:
                held[k] += int(np.sum(labels[members] == k))
    return small


# --- validation ---------------------------------------------------------------------------
def _check_set(name: str, images: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 3:
        shape = getattr(images, "shape", None)
        raise ValueError(f"{name}_images must be an (N, H, W) array; got shape {shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{name}_images must be uint8 (0-255); got {images.dtype}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{name}_labels must be one label per image: {labels.shape} labels for {len(images)} images"
        )
    if len(labels) and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}_labels must be integer class indices; got {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"{name}_labels out of range: must lie in 0..{n_classes - 1} for {n_classes} class names; found "
            f"{labels.min()}..{labels.max()}"
        )


def _validate(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    holdout_images: np.ndarray,
    holdout_labels: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray,
    class_names: Sequence[str],
    holdout_groups: np.ndarray | None,
    seeds: int,
    steps: int,
    batch_size: int,
    model: str,
    ratios: Sequence[float],
    bootstrap: int,
) -> None:
    n_classes = len(class_names)
    if n_classes < 2:
        raise ValueError(f"class_names: a classifier needs at least 2 classes; got {list(class_names)}")
    if model not in MODELS:
        raise ValueError(f"model {model!r}: use one of {', '.join(MODELS)}")
    for what, value in (
        ("seeds", seeds),
        ("steps", steps),
        ("batch_size", batch_size),
        ("bootstrap", bootstrap),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"{what} must be a positive integer; got {value!r}")
    bad_ratios = [r for r in ratios if not (r > 0 and math.isfinite(r))]
    if bad_ratios or len({ratio_condition(r) for r in ratios}) != len(ratios):
        raise ValueError(f"ratios must be distinct positive numbers; got {list(ratios)}")
    _check_set("train", train_images, train_labels, n_classes)
    _check_set("holdout", holdout_images, holdout_labels, n_classes)
    _check_set("synthetic", synthetic_images, synthetic_labels, n_classes)
    if len(train_images) == 0:
        raise ValueError("train_images is empty: the study needs real training images")
    if len(holdout_images) == 0:
        raise ValueError("holdout_images is empty: the study is scored on held-out real images")
    shape = train_images.shape[1:]
    for name, images in (("holdout", holdout_images), ("synthetic", synthetic_images)):
        if len(images) and images.shape[1:] != shape:
            raise ValueError(
                f"image sizes differ: train images are {shape[0]}x{shape[1]}, {name} images "
                f"{images.shape[1]}x{images.shape[2]}"
            )
    if min(shape) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"images of {shape[0]}x{shape[1]} are too small: need at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    missing_train = [class_names[k] for k in range(n_classes) if not np.any(train_labels == k)]
    if missing_train:
        raise ValueError(
            f"no real training images of class {', '.join(missing_train)}: every class needs real training "
            "images (the control re-draws from them)"
        )
    present = np.unique(holdout_labels)
    if len(present) < 2:
        raise ValueError(
            f"the holdout has a single class ({class_names[int(present[0])]}): ROC AUC and balanced accuracy "
            "are undefined; hold out images of every class"
        )
    missing_holdout = [class_names[k] for k in range(n_classes) if k not in present]
    if missing_holdout:
        raise ValueError(
            f"no holdout images of class {', '.join(missing_holdout)}: one-vs-rest AUC and sensitivity are "
            "undefined for it; hold out images of every class"
        )
    if holdout_groups is not None and len(np.asarray(holdout_groups)) != len(holdout_images):
        raise ValueError(
            "holdout_groups must give one group (patient) per holdout image: "
            f"{len(np.asarray(holdout_groups))} groups for {len(holdout_images)} images"
        )


# --- the study ----------------------------------------------------------------------------
def _summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "per_seed": [float(v) for v in arr]}


def utility_study(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    holdout_images: np.ndarray,
    holdout_labels: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray,
    *,
    class_names: Sequence[str],
    holdout_groups: np.ndarray | None = None,
    unseen_images: np.ndarray | None = None,
    unseen_labels: np.ndarray | None = None,
    seeds: int = 5,
    steps: int | None = None,
    batch_size: int = 64,
    model: str = "cnn",
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    bootstrap: int = 1000,
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
    private: PrivateBaseline | None = None,
) -> dict[str, Any]:
    """Train a classifier on real, real+synthetic and control training sets; score each
    on held-out real images; report metrics and gains with bootstrap intervals.

    Parameters
    ----------
    train_images, train_labels : real training slices, uint8 (N, H, W), and their class
        indices (N,).
    holdout_images, holdout_labels : the held-out real slices every classifier is scored
        on; never trained on. Must hold every class.
    synthetic_images, synthetic_labels : the generator's slices and the classes they
        were generated for (may be empty: then only ``real`` and the control run).
    class_names : class names in label order.
    holdout_groups : a patient id per holdout image; the bootstrap then draws whole
        patients, which is honest when one patient contributes several slices.
    unseen_images, unseen_labels : real training images the training set does not
        contain (better: other patients); given, the oracle condition runs.
    seeds : classifiers per condition. Each seed changes the initialisation, the
        synthetic (or re-drawn) subset and the batch order; for a given seed every
        condition starts from the same initial weights.
    steps : optimiser steps for every condition (default :data:`DEFAULT_STEPS`).
    batch_size : images per step.
    model : ``cnn`` (:class:`SmallCNN`) or ``resnet18`` (from scratch, 1 channel; for a
        GPU: on one CPU core it trains at ~90 images/s at 64x64, 25x slower than ``cnn``).
    ratios : synthetic-to-real ratios of the ``real+synthetic-Rx`` conditions.
    bootstrap : bootstrap resamples of the holdout for the gain intervals.
    seed : base seed of everything random in the study.
    threads : torch CPU threads while the study runs (restored afterwards).
    progress : called with (classifiers trained, classifiers in all) after each one.
    private : given, the ``real-dp-sgd`` condition runs too: a DP-SGD classifier on the
        real training images (:class:`PrivateBaseline`); its entry adds ``epsilon``,
        ``delta`` and ``noise_multiplier``, and it has a gain over ``real`` only.

    Returns
    -------
    dict
        JSON-serialisable (plain numbers, strings and lists; no NaN):

        - the settings: ``model``, ``steps``, ``batch_size``, ``seeds``, ``seed``,
          ``image_size``, ``train_size``, ``holdout_size``, ``holdout_groups`` (number of
          groups, or None), ``bootstrap``, ``bootstrap_unit`` (``image`` or ``group``),
          ``synthetic_available``, ``class_names``, ``ratios``, ``device``;
        - ``conditions``: for each condition that ran, ``n_train`` (= ``n_real`` +
          ``n_synthetic``; the control's re-drawn images count as real), ``per_class``
          training images per class, ``added_per_class`` (images added to the real set;
          for synthetic-only the images used), ``ratio`` (ratio conditions), ``steps``
          (counted in the training loop), ``epochs``, ``train_loss`` and the holdout
          metrics ``accuracy``, ``balanced_accuracy``, ``sensitivity`` and
          ``specificity`` (one-vs-rest, macro-averaged; macro sensitivity equals
          balanced accuracy), ``auc`` (macro one-vs-rest ROC AUC), and for two classes
          ``sensitivity_positive`` / ``specificity_positive`` of class 1, each as
          ``{"mean", "std", "per_seed"}``;
        - ``gains``: for every condition but ``real``, ``over_real`` and (but for the
          control itself) ``over_control``, each with ``balanced_accuracy`` and ``auc``
          as ``{"mean", "ci_low", "ci_high", "per_seed"}``: the mean over seeds of the
          paired difference and its 95% bootstrap interval;
        - ``skipped``: ``{condition: reason}`` for conditions that could not run;
        - ``images_per_second`` (training throughput) and ``seconds`` (wall time).

    Raises
    ------
    ValueError
        Inputs that cannot give a meaningful study; the message names the problem.
    """
    started = time.perf_counter()
    steps = DEFAULT_STEPS if steps is None else steps
    train_labels = np.asarray(train_labels)
    holdout_labels = np.asarray(holdout_labels)
    synthetic_labels = np.asarray(synthetic_labels)
    _validate(
        train_images,
        train_labels,
        holdout_images,
        holdout_labels,
        synthetic_images,
        synthetic_labels,
        class_names,
        holdout_groups,
        seeds,
        steps,
        batch_size,
        model,
        ratios,
        bootstrap,
    )
    n_classes = len(class_names)
    if (unseen_images is None) != (unseen_labels is None):
        raise ValueError("unseen_images and unseen_labels go together: give both or neither")
    if unseen_images is not None and unseen_labels is not None:
        unseen_labels = np.asarray(unseen_labels)
        _check_set("unseen real", unseen_images, unseen_labels, n_classes)
        if len(unseen_images) and unseen_images.shape[1:] != train_images.shape[1:]:
            raise ValueError(
                f"image sizes differ: train images are {train_images.shape[1]}x{train_images.shape[2]}, "
                f"unseen real images {unseen_images.shape[1]}x{unseen_images.shape[2]}"
            )
        unseen_labels = unseen_labels.astype(np.int64)
    train_labels = train_labels.astype(np.int64)
    holdout_labels = holdout_labels.astype(np.int64)
    synthetic_labels = synthetic_labels.astype(np.int64)
    train_counts = np.bincount(train_labels, minlength=n_classes)
    synthetic_counts = np.bincount(synthetic_labels, minlength=n_classes)
    added, skipped = _plan_counts(train_counts, synthetic_counts, ratios, class_names)
    if unseen_labels is not None:
        unseen_counts = np.bincount(unseen_labels, minlength=n_classes)
        short = [
            f"{class_names[k]} (needs {added[CONTROL][k]}, has {unseen_counts[k]})"
            for k in range(n_classes)
            if added[CONTROL][k] > unseen_counts[k]
        ]
        if short:
            skipped[ORACLE] = "too few unseen real images of " + ", ".join(short)
        else:
            added[ORACLE] = added[CONTROL]
    plan = None
    if private is not None:
        units = len(np.unique(np.asarray(private.unit_ids).astype(str)))
        try:
            if model != "cnn":
                raise PrivacyError(f"it trains the small CNN only, not {model} (use the utility model cnn)")
            if len(private.unit_ids) != len(train_labels):
                raise PrivacyError(
                    f"{len(private.unit_ids)} unit ids for {len(train_labels)} training images"
                )
            dp = DPConfig(
                target_epsilon=private.epsilon, delta=private.delta, max_grad_norm=private.max_grad_norm
            )
            plan = plan_privacy(
                dp, units=units, unit=private.unit, batch_size=batch_size, planned_steps=steps
            )
            added[DP_SGD] = np.zeros(n_classes, dtype=np.int64)
        except (PrivacyError, ValueError) as err:
            skipped[DP_SGD] = f"a DP-SGD classifier at epsilon {private.epsilon:g} cannot be trained: {err}"
    ratio_of = {ratio_condition(r): float(r) for r in ratios}
    order = [REAL, *ratio_of, BALANCED, CONTROL, ORACLE, SYNTHETIC_ONLY, DP_SGD]
    conditions = [c for c in order if c in added]
    for name, reason in skipped.items():
        log.warning("utility: %s skipped: %s", name, reason)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model == "resnet18" and device.type == "cpu":
        pixels = train_images.shape[1] * train_images.shape[2] / 64**2
        minutes = len(conditions) * seeds * steps * batch_size * pixels / 90 / 60
        log.warning(
            "utility: resnet18 on CPU trains at ~90 images/s at 64x64: expect ~%.0f minutes for %d "
            "classifiers (use a GPU, or model='cnn')",
            minutes,
            len(conditions) * seeds,
        )
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        probs, losses, steps_taken, train_seconds = _train_all(
            conditions,
            added,
            train_images,
            train_labels,
            synthetic_images,
            synthetic_labels,
            holdout_images,
            unseen=None if unseen_images is None or unseen_labels is None else (unseen_images, unseen_labels),
            n_classes=n_classes,
            seeds=seeds,
            steps=steps,
            batch_size=batch_size,
            model=model,
            seed=seed,
            device=device,
            progress=progress,
            private=None if plan is None or private is None else (plan, private.unit_ids),
        )
    finally:
        torch.set_num_threads(previous_threads)

    condition_report: dict[str, Any] = {}
    for name in conditions:
        per_seed = [_metrics(holdout_labels, p, n_classes) for p in probs[name]]
        totals = (train_counts if name != SYNTHETIC_ONLY else 0) + added[name]
        n_synthetic = 0 if name in (REAL, CONTROL, ORACLE) else int(added[name].sum())
        entry: dict[str, Any] = {
            "n_train": int(totals.sum()),
            "n_real": int(totals.sum()) - n_synthetic,
            "n_synthetic": n_synthetic,
            "per_class": {class_names[k]: int(totals[k]) for k in range(n_classes)},
            "added_per_class": {class_names[k]: int(added[name][k]) for k in range(n_classes)},
            # counted in the training loop, not copied from the argument
            "steps": int(min(steps_taken[name])),
            "epochs": float(steps * batch_size / totals.sum()),
            "train_loss": _summary(losses[name]),
        }
        if name in ratio_of:
            entry["ratio"] = ratio_of[name]
        if name == DP_SGD and plan is not None:
            entry.update(
                # the whole study's plan: every seed's classifier spends exactly this
                epsilon=epsilon_for(
                    [(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)], plan.delta
                ),
                delta=plan.delta,
                noise_multiplier=plan.noise_multiplier,
                privacy_unit=plan.unit,
                units=plan.units,
            )
        for metric in per_seed[0]:
            entry[metric] = _summary([m[metric] for m in per_seed])
        condition_report[name] = entry

    gains = _gains(
        conditions,
        probs,
        holdout_labels,
        holdout_groups,
        condition_report,
        n_classes=n_classes,
        rounds=bootstrap,
        seed=seed,
    )
    oracle = _oracle_shares(gains) if ORACLE in conditions else None
    images_trained = len(conditions) * seeds * steps * batch_size
    return {
        "model": model,
        "steps": int(steps),
        "batch_size": int(batch_size),
        "seeds": int(seeds),
        "seed": int(seed),
        "image_size": [int(s) for s in train_images.shape[1:]],
        "train_size": int(len(train_images)),
        "holdout_size": int(len(holdout_images)),
        "holdout_groups": None if holdout_groups is None else int(len(np.unique(holdout_groups))),
        "bootstrap": int(bootstrap),
        "bootstrap_unit": "image" if holdout_groups is None else "group",
        "synthetic_available": int(len(synthetic_images)),
        "class_names": [str(c) for c in class_names],
        "ratios": [float(r) for r in ratios],
        "device": device.type,
        "conditions": condition_report,
        "gains": gains,
        **({"oracle": oracle} if oracle else {}),
        "skipped": skipped,
        "images_per_second": float(images_trained / train_seconds) if train_seconds > 0 else 0.0,
        "seconds": float(time.perf_counter() - started),
    }


def _train_all(
    conditions: Sequence[str],
    added: dict[str, np.ndarray],
    train_images: np.ndarray,
    train_labels: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray,
    holdout_images: np.ndarray,
    *,
    unseen: tuple[np.ndarray, np.ndarray] | None,
    n_classes: int,
    seeds: int,
    steps: int,
    batch_size: int,
    model: str,
    seed: int,
    device: torch.device,
    progress: Progress | None,
    private: tuple[PrivacyPlan, np.ndarray] | None = None,
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[float]], dict[str, list[int]], float]:
    """Train every (condition, seed) classifier: holdout probabilities, final training
    losses, optimiser steps taken, and the seconds spent training. The unseen real images
    (the oracle's pool) sit after the training images in the real tensor."""
    unseen_labels = None if unseen is None else unseen[1]
    if unseen is not None:
        train_images = np.concatenate([train_images, unseen[0]])
        train_labels = np.concatenate([train_labels, unseen[1]])
    real_t = torch.from_numpy(np.ascontiguousarray(train_images))[:, None]
    synthetic_t = torch.from_numpy(np.ascontiguousarray(synthetic_images))[:, None]
    holdout_t = torch.from_numpy(np.ascontiguousarray(holdout_images))[:, None]
    real_y = torch.from_numpy(train_labels)
    synthetic_y = torch.from_numpy(synthetic_labels)
    probs: dict[str, list[np.ndarray]] = {c: [] for c in conditions}
    losses: dict[str, list[float]] = {c: [] for c in conditions}
    steps_taken: dict[str, list[int]] = {c: [] for c in conditions}
    n_train = len(train_labels) - (0 if unseen_labels is None else len(unseen_labels))
    total, done, train_seconds = len(conditions) * seeds, 0, 0.0
    for s in range(seeds):
        init_seed = int(np.random.SeedSequence([seed, s]).generate_state(1)[0])
        for name in conditions:
            # keyed by the condition's name, so a condition draws the same subsets and
            # batches whichever other conditions run or are skipped
            seq = np.random.SeedSequence([seed, s, zlib.crc32(name.encode())])
            sample_rng = np.random.default_rng(seq.spawn(1)[0])
            order_seed = int(seq.generate_state(1)[0])
            real_idx, syn_idx = _compose(
                name, added[name], train_labels[:n_train], synthetic_labels, sample_rng, unseen_labels
            )
            parts = [(real_t, real_y, real_idx), (synthetic_t, synthetic_y, syn_idx)]
            images = torch.cat([x[i] for x, _, i in parts if len(i)])
            labels = torch.cat([y[i] for _, y, i in parts if len(i)])
            tic = time.perf_counter()
            if name == DP_SGD:
                assert private is not None
                net, loss, taken, _ = train_private_classifier(
                    images,
                    labels,
                    private[1],
                    private[0],
                    n_classes=n_classes,
                    init_seed=init_seed,
                    device=device,
                    # a measurement, never released: seeded, so the study repeats exactly
                    generator=torch.Generator().manual_seed(order_seed),
                )
            else:
                net, loss, taken = train_classifier(
                    images.to(device),
                    labels.to(device),
                    model=model,
                    n_classes=n_classes,
                    steps=steps,
                    batch_size=batch_size,
                    init_seed=init_seed,
                    order_seed=order_seed,
                    device=device,
                )
            train_seconds += time.perf_counter() - tic
            probs[name].append(predict_proba(net, holdout_t, device))
            losses[name].append(loss)
            steps_taken[name].append(taken)
            done += 1
            log.info(
                "utility: seed %d, %s (%d images): final training loss %.3f, %.1f s",
                s,
                name,
                len(images),
                loss,
                time.perf_counter() - tic,
            )
            if progress:
                progress(done, total)
    return probs, losses, steps_taken, train_seconds


def _gains(
    conditions: Sequence[str],
    probs: dict[str, list[np.ndarray]],
    holdout_labels: np.ndarray,
    holdout_groups: np.ndarray | None,
    report: dict[str, Any],
    *,
    n_classes: int,
    rounds: int,
    seed: int,
) -> dict[str, Any]:
    """Seed-averaged gains in balanced accuracy and macro AUC over ``real`` and over the
    control, with 95% percentile intervals from a paired bootstrap of the holdout: one
    set of resamples shared by every condition and seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xB007]))
    groups = None if holdout_groups is None else np.asarray(holdout_groups)
    n = len(holdout_labels)
    # resampled[metric][condition]: (rounds,) seed-averaged metric on each resample
    resampled: dict[str, dict[str, list[np.ndarray]]] = {m: {c: [] for c in conditions} for m in GAIN_METRICS}
    preds = {c: [p.argmax(axis=1) for p in probs[c]] for c in conditions}
    for start in range(0, rounds, _BOOTSTRAP_CHUNK):
        weights = _bootstrap_weights(n, groups, min(_BOOTSTRAP_CHUNK, rounds - start), rng)
        for c in conditions:
            ba = [_weighted_balanced_accuracy(holdout_labels, pr, weights, n_classes) for pr in preds[c]]
            auc = [_weighted_macro_auc(holdout_labels, p, weights, n_classes) for p in probs[c]]
            resampled["balanced_accuracy"][c].append(np.mean(ba, axis=0))
            resampled["auc"][c].append(np.mean(auc, axis=0))
    boot = {m: {c: np.concatenate(v) for c, v in per.items()} for m, per in resampled.items()}

    def gain(cond: str, ref: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric in GAIN_METRICS:
            per_seed = np.subtract(report[cond][metric]["per_seed"], report[ref][metric]["per_seed"])
            diff = boot[metric][cond] - boot[metric][ref]
            out[metric] = interval(
                per_seed.mean(), *percentile_bounds(diff), per_seed=[float(v) for v in per_seed]
            )
        return out

    gains: dict[str, Any] = {}
    for c in conditions:
        if c == REAL:
            continue
        gains[c] = {"over_real": gain(c, REAL)}
        if c not in (CONTROL, DP_SGD):  # a private classifier is compared with real alone
            gains[c]["over_control"] = gain(c, CONTROL)
    return gains


def _oracle_shares(gains: dict[str, Any]) -> dict[str, Any]:
    """The oracle's gain over the control, whether it shows headroom (its 95% CI above 0),
    and each synthetic condition's gain over the control as a share of it."""
    out: dict[str, Any] = {}
    for metric in GAIN_METRICS:
        ceiling = gains[ORACLE]["over_control"][metric]
        headroom = bool(ceiling["ci_low"] > 0)
        top = ceiling["mean"]
        shares = {
            name: float(g["over_control"][metric]["mean"] / top) if top > 0 else None
            for name, g in gains.items()
            if name not in (CONTROL, ORACLE, SYNTHETIC_ONLY, DP_SGD)
        }
        out[metric] = {"gain_over_control": ceiling, "headroom": headroom, "share_of_oracle": shares}
    return out


# --- the figure ---------------------------------------------------------------------------
def plot_gain_vs_ratio(result: dict[str, Any], path: str | Path) -> Path:
    """A PNG of the balanced-accuracy gain (95% bootstrap interval as error bars) against
    the synthetic-to-real ratio, over ``real`` and over the re-balancing control, with
    the balanced condition and synthetic-only at the right where they ran.

    Parameters
    ----------
    result : what :func:`utility_study` returned.
    path : where to write the PNG (its folder must exist).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        ``result`` holds no gains to plot.
    """
    plt = pyplot()

    path = Path(path)
    gains = result.get("gains", {})
    ratios = [r for r in result.get("ratios", []) if ratio_condition(r) in gains]
    names = [ratio_condition(r) for r in ratios]
    labels = [f"{r:g}×" for r in ratios]
    extras = [
        (c, lab)
        for c, lab in (
            (BALANCED, "balanced"),
            (ORACLE, "unseen real\n(oracle)"),
            (SYNTHETIC_ONLY, "synthetic\nonly"),
        )
        if c in gains
    ]
    names += [c for c, _ in extras]
    labels += [lab for _, lab in extras]
    if not names:
        raise ValueError("plot_gain_vs_ratio: the result holds no synthetic conditions to plot")
    x = np.arange(len(names), dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    series = (
        ("over_real", "over real only", "C0", -0.08, "o"),
        ("over_control", "over re-balancing control (real re-drawn)", "C3", 0.08, "s"),
    )
    for key, label, colour, offset, marker in series:
        stats = [gains[c].get(key, {}).get("balanced_accuracy") for c in names]
        keep = [i for i, st in enumerate(stats) if st is not None]
        if not keep:
            continue
        mean = np.array([stats[i]["mean"] for i in keep])
        low = np.array([stats[i]["ci_low"] for i in keep])
        high = np.array([stats[i]["ci_high"] for i in keep])
        err = np.vstack([np.clip(mean - low, 0, None), np.clip(high - mean, 0, None)])
        ax.errorbar(x[keep] + offset, mean, yerr=err, fmt=marker, color=colour, capsize=4, label=label)
        on_ratio = [i for i in keep if i < len(ratios)]
        if len(on_ratio) > 1:
            ax.plot(x[on_ratio] + offset, mean[: len(on_ratio)], color=colour, linewidth=1)
    ax.axhline(0.0, color="black", linewidth=1)
    if extras and ratios:
        ax.axvline(len(ratios) - 0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x)
    ax.set_xticklabels(labels)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_xlabel("synthetic images added (× real training set size)")
    ax.set_ylabel("gain in balanced accuracy\n(held-out real images)")
    seeds = result.get("seeds", "?")
    ax.set_title(
        f"Downstream utility: {result.get('model', '?')}, {seeds} seed{'' if seeds == 1 else 's'}, "
        f"{result.get('holdout_size', '?')} held-out real images, 95% bootstrap CI",
        fontsize=10,
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="best")
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    log.info("utility: gain figure written to %s", path)
    return path
