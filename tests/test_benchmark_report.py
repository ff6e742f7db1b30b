"""The quality benchmark's tables and plots hold up when a measurement is missing.

A full quality run takes an hour: if its report crashed on a collapsed arm (FD None),
a skipped study or a bootstrap interval that excludes its mean, the hour would be lost.
These feed hand-built results (the shape `benchmarks.quality.run_quality` writes)
through the real `markdown` and `plots`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.quality import gap_closed, markdown, plots


def _gain(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "ci_low": low, "ci_high": high, "per_seed": [mean]}


def _result() -> dict:
    row = {"fd_encoder": 10.0, "kid_encoder": 0.5, "fd_pixels": 3.0, "ssim_class_matched": 0.3,
           "ssim_matched_by_class": True, "ms_ssim_diversity": 0.3}
    arms = {"real train (reference)": dict(row, fd_encoder=1.0)}
    for arm in ("federated", "local-hospital-a", "local-hospital-b", "local-hospital-c", "pooled", "dp-eps-10"):
        arms[arm] = dict(row)
    arms["vanilla-gan"] = dict(row, fd_encoder=None, fd_encoder_error="Imaginary component", ssim_matched_by_class=False)
    audit = {"verdicts": {"fidelity": "red"}, "mia_auc_max": 0.52, "mia_worst_attack": "distance/pixels",
             "gain_over_real": _gain(0.02, 0.03, 0.09),  # a bootstrap interval that excludes the mean
             "gain_over_control": None, "epsilon": None}
    return {
        "config": {"image_size": 32, "rounds": 2, "local_steps": 10, "batch": 32, "epsilons": [10.0]},
        "training_seconds": {"federated": 12.0},
        "fidelity": {"arms": arms, "train_size": 100, "holdout_size": 30, "gap_closed": {
            "encoder": {"local": [20.0, 30.0, 40.0], "local_mean": 30.0, "pooled": 10.0, "federated": 15.0,
                        "share_closed": 0.75},
            "pixels": {"local": [3.0, 3.0, 3.0], "local_mean": 3.0, "pooled": 3.0, "federated": 3.0,
                       "share_closed": None}}},
        "audits": {"federated": audit, "vanilla-gan": dict(audit, gain_over_real=None),
                   "dp-eps-10": dict(audit, epsilon=9.99)},
        "lowdata": {"fraction": 0.15, "seeds": 1, "holdout_size": 30, "studies": {
            "hospital-a/lowdata-federated": {"train_slices": 20, "real_balanced_accuracy": 0.5,
                                             "over_real": _gain(-0.01, -0.05, -0.02), "over_control": None},
            "hospital-c/lowdata-federated": {"train_slices": 3, "skipped": "no training slices of no_tumor"}}},
    }


def test_tables_name_what_is_missing_instead_of_crashing() -> None:
    text = "\n".join(markdown(_result()))
    assert "| vanilla-gan | - | n/a |" in text and "(unmatched)" in text
    assert "75%" in text and "pooling is not clearly better" in text
    assert "| dp-eps-10 | 9.99 |" in text and "| federated | inf |" in text
    assert "skipped: no training slices of no_tumor" in text
    assert "+0.020 (+0.030 to +0.090)" in text


def test_plots_are_drawn_with_missing_values_and_lopsided_intervals(tmp_path: Path) -> None:
    plots(_result(), tmp_path)
    for name in ("fidelity_arms.png", "privacy_utility.png", "lowdata_gain.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.parametrize(("local", "pooled", "federated", "share"), [
    ([30.0, 30.0, 30.0], 10.0, 10.0, 1.0),   # as good as pooling
    ([30.0, 30.0, 30.0], 10.0, 30.0, 0.0),   # no better than alone
    ([20.0, 30.0, 40.0], 10.0, 25.0, 0.25),
    ([30.0, 30.0, 30.0], 30.0, 20.0, None),  # pooling not better: the share means nothing
    ([30.0, 30.0, 30.0], 35.0, 20.0, None),
])
def test_gap_closed_share(local: list[float], pooled: float, federated: float, share: float | None) -> None:
    got = gap_closed(local, pooled, federated)
    assert got == share if share is None else got == pytest.approx(share)
