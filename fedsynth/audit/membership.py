"""Membership inference: can an attacker tell a training patient from a fresh one?

Members are training patients, non-members holdout patients, equal in number. Each
attack gives every patient a score (higher = "was in training"); a patient's score is
the mean over its slices. Attacks:

- ``distance`` (black-box, GAN-Leaks, Chen et al. 2020): minus the distance from the
  patient's slice to the nearest synthetic image.
- ``density`` (black-box, Monte-Carlo, Hilprecht et al. 2019): the number of synthetic
  images within a radius of the slice (the radius: the median nearest-synthetic
  distance over all records).
- ``discriminator`` (white-box): the hospital's discriminator's real/fake logit, when
  its weights are available (only at the hospital).

Reported: ROC AUC (0.5 = chance) with its Mann-Whitney p-value, TPR at 1% FPR (1% =
chance), and an empirical ε lower bound: a threshold chosen on one half of the records,
then log((TPR_low - δ) / FPR_high) with 95% Clopper-Pearson bounds measured on the other
half (after Jagielski et al., 2020; a heuristic for one trained generator, not a proof).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsynth.audit.memorization import Search
from fedsynth.metrics.neighbours import nearest, pairwise_within

__all__ = [
    "IndexedRecords",
    "Records",
    "attack_metrics",
    "density_scores",
    "discriminator_scores",
    "distance_scores",
    "empirical_epsilon",
    "select_records",
]

log = logging.getLogger(__name__)


@dataclass
class Records:
    """The attack's records: images, which patient each belongs to, and membership."""

    images: np.ndarray
    labels: np.ndarray  # class label per image
    patient: np.ndarray  # patient index per image (0..P-1)
    member: np.ndarray  # (P,) bool per patient

    @property
    def patients(self) -> int:
        return int(len(self.member))


def select_records(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    train_patients: np.ndarray,
    holdout_images: np.ndarray,
    holdout_labels: np.ndarray,
    holdout_patients: np.ndarray,
    *,
    max_patients: int = 2000,
    max_slices: int = 8,
    seed: int = 0,
) -> Records:
    """Equal numbers of member (train) and non-member (holdout) patients, at most
    ``max_patients`` of each, drawn at random; of each drawn patient, at most
    ``max_slices`` slices drawn at random (a patient's score is the mean over its slices;
    a CT volume's hundreds of slices would cost a search each and add little)."""
    rng = np.random.default_rng(seed)
    train_ids, holdout_ids = np.unique(train_patients), np.unique(holdout_patients)
    n = min(len(train_ids), len(holdout_ids), max_patients)
    if n < 2:
        raise ValueError(
            f"membership inference needs 2 patients on each side (train {len(train_ids)}, holdout "
            f"{len(holdout_ids)})"
        )
    members = rng.choice(train_ids, n, replace=False)
    non_members = rng.choice(holdout_ids, n, replace=False)
    images, labels, patient = [], [], []
    for offset, (ids, all_images, all_labels, all_patients) in enumerate(
        (
            (members, train_images, train_labels, train_patients),
            (non_members, holdout_images, holdout_labels, holdout_patients),
        )
    ):
        order = np.argsort(all_patients, kind="stable")  # each patient's rows, found by bisection
        ordered = np.asarray(all_patients)[order]
        first, last = np.searchsorted(ordered, ids, "left"), np.searchsorted(ordered, ids, "right")
        for p, (start, stop) in enumerate(zip(first, last, strict=True), start=offset * n):
            rows = np.sort(order[start:stop])
            if len(rows) > max_slices:
                rows = np.sort(rng.choice(rows, max_slices, replace=False))
            images.append(all_images[rows])
            labels.append(all_labels[rows])
            patient += [p] * len(rows)
    member = np.zeros(2 * n, dtype=bool)
    member[:n] = True
    return Records(np.concatenate(images), np.concatenate(labels), np.asarray(patient), member)


def _per_patient(records: Records, per_image: np.ndarray) -> np.ndarray:
    sums = np.bincount(records.patient, weights=per_image, minlength=records.patients)
    counts = np.bincount(records.patient, minlength=records.patients)
    return sums / np.maximum(counts, 1)


class IndexedRecords:
    """The records and the synthetic images as one space's search indexed them (the
    records indexed here, once for both black-box attacks)."""

    def __init__(self, search: Search, records: Records, synthetic: Any) -> None:
        self.search, self.records, self.synthetic = search, records, synthetic
        self.indexed = search.index(records.images)


def distance_scores(indexed: IndexedRecords) -> np.ndarray:
    """GAN-Leaks: minus the distance to the nearest synthetic image (in the search's
    sense: for pixels, after undoing the disguise), per patient."""
    distance, _ = indexed.search.nearest(indexed.indexed, indexed.synthetic)
    return _per_patient(indexed.records, -distance)


def density_scores(indexed: IndexedRecords) -> np.ndarray:
    """Monte-Carlo density: synthetic images within the median nearest-synthetic distance,
    in the search's features."""
    features = indexed.search.features(indexed.indexed)
    synthetic_features = indexed.search.features(indexed.synthetic)
    nearest_d, _ = nearest(features, synthetic_features)
    radius = float(np.median(nearest_d[:, 0]))
    return _per_patient(indexed.records, pairwise_within(features, synthetic_features, radius).astype(float))


def discriminator_scores(disc: torch.nn.Module, records: Records) -> np.ndarray:
    """White-box: the discriminator's real/fake logit for each slice (with its class when
    the discriminator is conditional), averaged per patient."""
    disc.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(records.images), 256):
            x = torch.from_numpy(records.images[start : start + 256].astype(np.float32) / 127.5 - 1.0)[
                :, None
            ]
            y = torch.from_numpy(records.labels[start : start + 256].astype(np.int64))
            out = disc(x, y)
            logits.append((out.adv if hasattr(out, "adv") else out).reshape(-1).float().numpy())
    return _per_patient(records, np.concatenate(logits))


def attack_metrics(
    scores: np.ndarray, member: np.ndarray, *, delta: float = 1e-5, seed: int = 0
) -> dict[str, Any]:
    """AUC, TPR at 1% FPR, the ROC curve (for the plot) and the empirical ε lower bound."""
    from scipy.stats import norm  # SciPy and scikit-learn load when an audit runs, not with the CLI
    from sklearn.metrics import roc_auc_score, roc_curve

    auc = float(roc_auc_score(member, scores))
    fpr, tpr, _ = roc_curve(member, scores)
    tpr_at_1 = float(np.interp(0.01, fpr, tpr))
    keep = np.unique(np.concatenate([np.linspace(0, len(fpr) - 1, min(len(fpr), 400)).astype(int)]))
    n1, n0 = int(member.sum()), int((~member).sum())
    # one-sided Mann-Whitney p-value of the AUC (normal approximation, no tie correction)
    auc_p = float(norm.sf((auc - 0.5) / np.sqrt((n1 + n0 + 1) / (12 * n1 * n0))))
    return {
        "auc": auc,
        "auc_p_value": auc_p,
        "tpr_at_1pct_fpr": tpr_at_1,
        "members": int(member.sum()),
        "non_members": int((~member).sum()),
        "epsilon_lower_bound": empirical_epsilon(scores, member, delta=delta, seed=seed),
        "roc": {"fpr": fpr[keep].round(5).tolist(), "tpr": tpr[keep].round(5).tolist()},
    }


def empirical_epsilon(
    scores: np.ndarray, member: np.ndarray, *, delta: float = 1e-5, seed: int = 0, confidence: float = 0.95
) -> float:
    """An empirical lower bound on ε from a threshold attack ("member if score >= t").

    The threshold is chosen on a random half of the records, maximising the same bound
    there; the reported bound uses the other half only: log((TPR_low - δ) / FPR_high)
    with Clopper-Pearson bounds at ``confidence``. 0 when the attack does no better than
    chance. It is a heuristic for this one trained generator (Jagielski et al., 2020 run
    many trainings; Steinke et al., 2023 give a one-run audit), not a proof.
    """
    from scipy.stats import beta

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scores))
    pick, test = order[: len(order) // 2], order[len(order) // 2 :]
    alpha = (1 - confidence) / 2

    def bound(idx: np.ndarray, t: float) -> float:
        m, s = member[idx], scores[idx]
        tp, p, fp, n = int((s[m] >= t).sum()), int(m.sum()), int((s[~m] >= t).sum()), int((~m).sum())
        if p == 0 or n == 0 or tp == 0:
            return 0.0
        tpr_low = float(beta.ppf(alpha, tp, p - tp + 1))
        fpr_high = float(beta.ppf(1 - alpha, fp + 1, n - fp)) if fp < n else 1.0
        if tpr_low - delta <= 0 or fpr_high <= 0:
            return 0.0
        return max(0.0, float(np.log((tpr_low - delta) / fpr_high)))

    candidates = np.unique(scores[pick])
    if len(candidates) > 400:
        candidates = np.quantile(scores[pick], np.linspace(0, 1, 400))
    if len(candidates) == 0:
        return 0.0
    best_t = max(candidates, key=lambda t: bound(pick, t))
    return bound(test, best_t)
