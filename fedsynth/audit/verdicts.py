"""Traffic lights: the thresholds that turn each audit figure into green, amber or red.

Every threshold lives here, with the reason for it, and is written into audit.json next
to the figure it judged. Privacy checks are judged against fresh real data (the holdout):
a generator is asked to be no closer to its training patients than new patients are.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GREEN", "AMBER", "RED", "THRESHOLDS", "judge", "worst"]

GREEN, AMBER, RED = "green", "amber", "red"
_ORDER = {GREEN: 0, AMBER: 1, RED: 2}

# figure -> (direction, amber limit, red limit, why). "below": smaller is safer.
THRESHOLDS: dict[str, dict[str, Any]] = {
    "near_copy_share": {
        "rule": "share of synthetic images closer to a training image than 99% of holdout images are (in "
        "each space; in pixels once a mirror, rotation, zoom, shift or intensity curve is undone): green "
        "<= 2% or not "
        "significantly above the null rate (binomial p >= 0.01), amber <= 3%, red above (fresh real data "
        "gives about 1%; a generator that returns 1 image in 20 as a disguised training image, about 6%)",
        "amber": 0.02,
        "red": 0.03,
        "safer": "lower",
    },
    "dcr_median_ratio": {
        "rule": "median synthetic->train distance / median holdout->train distance: green >= 0.9, "
        "amber >= 0.75, red below (fresh real data gives 1)",
        "amber": 0.9,
        "red": 0.75,
        "safer": "higher",
    },
    "closer_to_train_excess": {
        "rule": "share of synthetic images closer to a holdout-sized train subsample than to the holdout "
        "(within each class for a conditional generator, pooled), as (share - 0.5) / (s/2), s the "
        "subsample's share of training patients (1 = every image a copy): red "
        "when > 0.4 and p < 0.001, amber when > 0.12 and p < 0.01, else green",
        "amber": 0.12,
        "red": 0.4,
        "safer": "lower",
    },
    "c_t": {
        "rule": "Meehan et al.'s data-copying z-score: green >= -2, amber >= -3, red below "
        "(fresh real data gives about 0; copying drives it far below 0)",
        "amber": -2.0,
        "red": -3.0,
        "safer": "higher",
    },
    "authenticity_gap": {
        "rule": "authenticity of synthetic images minus that of holdout images: green >= -0.05 or not "
        "significant (p >= 0.01, each nearest training image counted once), amber >= -0.15, red below",
        "amber": -0.05,
        "red": -0.15,
        "safer": "higher",
    },
    "mia_auc": {
        "rule": "membership-inference ROC AUC: green <= 0.55 or not significant (Mann-Whitney p >= 0.01), "
        "amber <= 0.60, red above (0.5 = chance)",
        "amber": 0.55,
        "red": 0.60,
        "safer": "lower",
    },
    "mia_tpr_at_1pct_fpr": {
        "rule": "true-positive rate at 1% false positives, judged with >= 100 non-members and a significant "
        "AUC: green <= 5%, amber <= 10%, red above (1% = chance)",
        "amber": 0.05,
        "red": 0.10,
        "safer": "lower",
    },
    "fd_ratio": {
        "rule": "Fréchet distance of the synthetic images / of fresh real images to the real reference (in "
        "the classifier space: half the holdout, against the other half; in the encoder space: train, "
        "against the holdout): green <= 3, amber <= 10, red above",
        "amber": 3.0,
        "red": 10.0,
        "safer": "lower",
    },
    "coverage_ratio": {
        "rule": "coverage of the real data by synthetic images / coverage by holdout images: green >= 0.7, "
        "amber >= 0.4, red below (low: modes of the real data are missing)",
        "amber": 0.7,
        "red": 0.4,
        "safer": "higher",
    },
    "precision_ratio": {
        "rule": "precision of synthetic images / precision of holdout images: green >= 0.7, amber >= 0.4, "
        "red below (low: many synthetic images fall outside the real data)",
        "amber": 0.7,
        "red": 0.4,
        "safer": "higher",
    },
    "cas_ratio": {
        "rule": "balanced accuracy of a classifier trained on synthetic images only / of one trained on as "
        "many real images, both on the holdout (classification accuracy score): green >= 0.7, amber >= 0.4, "
        "red below",
        "amber": 0.7,
        "red": 0.4,
        "safer": "higher",
    },
    "oracle_share": {
        "rule": "gain over the control of real + class-balanced synthetic / of real + as many unseen real "
        "training images (the oracle), judged only when the oracle's own gain has its 95% CI above 0: "
        "green >= 0.25, amber >= 0, red below",
        "amber": 0.25,
        "red": 0.0,
        "safer": "higher",
    },
    "utility_gain": {
        "rule": "balanced-accuracy gain of real + class-balanced synthetic over real + the same number of "
        "re-drawn real images (the honest control), 95% CI: green when the CI is above 0, red when it is "
        "below 0, amber when it contains 0",
        "safer": "higher",
    },
    "epsilon": {
        "rule": "formal ε per privacy unit at the run's δ: green <= 1, amber <= 10, red above or no DP",
        "amber": 1.0,
        "red": 10.0,
        "safer": "lower",
    },
}


def judge(figure: str, value: float | None, *, significant: bool = True) -> str:
    """The traffic light for one figure under THRESHOLDS[figure]; ``significant`` False
    (e.g. a p-value that does not reject) caps the light at green. None or NaN is amber
    (could not be measured)."""
    rule = THRESHOLDS[figure]
    if value is None or value != value:
        return AMBER
    if not significant:
        return GREEN
    if rule["safer"] == "lower":
        return RED if value > rule["red"] else AMBER if value > rule["amber"] else GREEN
    return RED if value < rule["red"] else AMBER if value < rule["amber"] else GREEN


def worst(lights: list[str]) -> str:
    """The most severe light (green for an empty list)."""
    return max(lights, key=_ORDER.__getitem__, default=GREEN)
