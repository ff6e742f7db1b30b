"""Figures the report draws from statistics alone (the privacy ledger, distance
histograms on fixed bins, ROC curves on a fixed grid), so the consortium report can draw
them from what hospitals sent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.core.plotting import pyplot

__all__ = ["plot_dcr_counts", "plot_epsilon", "plot_roc"]


def plot_epsilon(ledger: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """ε (RDP, and PRV where computed) spent by each hospital after each round."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for hospital in sorted({row["hospital"] for row in ledger}):
        rows = sorted(
            (r for r in ledger if r["hospital"] == hospital and r.get("epsilon_rdp") is not None),
            key=lambda r: r["round"],
        )
        if not rows:
            continue
        (line,) = ax.plot(
            [r["round"] for r in rows],
            [r["epsilon_rdp"] for r in rows],
            marker="o",
            label=f"{hospital} (RDP)",
        )
        prv = [(r["round"], r["epsilon_prv"]) for r in rows if r.get("epsilon_prv") is not None]
        if prv:
            ax.plot(
                *zip(*prv, strict=True),
                ls="--",
                marker="x",
                color=line.get_color(),
                label=f"{hospital} (PRV)",
            )
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_yscale("log")
    ax.set_title("formal privacy budget spent, by round")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_dcr_counts(
    histograms: Mapping[str, Mapping[str, Sequence[int]]],
    edges: Sequence[float],
    path: str | Path,
    title: str,
) -> Path:
    """Distance-to-closest-record histograms from counts on fixed bins (distance divided
    by the median holdout->train distance, so fresh real data centres on 1)."""
    plt = pyplot()
    spaces = list(histograms)
    fig, axes = plt.subplots(1, len(spaces), figsize=(6 * len(spaces), 3.8), squeeze=False)
    bins = np.asarray(edges)
    centres, width = (bins[:-1] + bins[1:]) / 2, np.diff(bins)
    for ax, space in zip(axes[0], spaces, strict=True):
        for name, label, style in (
            ("synthetic_to_train", "synthetic → nearest train", {"alpha": 0.5}),
            ("synthetic_to_holdout", "synthetic → nearest holdout", {"alpha": 0.5}),
        ):
            counts = np.asarray(histograms[space][name][:-1], dtype=float)
            ax.bar(centres, counts / max(counts.sum(), 1), width=width, label=label, **style)
        ref = np.asarray(histograms[space]["holdout_to_train"][:-1], dtype=float)
        ax.stairs(
            ref / max(ref.sum(), 1), edges, color="k", lw=2, label="holdout → nearest train (fresh real data)"
        )
        beyond = {n: histograms[space][n][-1] for n in ("synthetic_to_train", "holdout_to_train")}
        ax.set_title(f"{title} ({space})", fontsize=9)
        ax.set_xlabel(
            f"distance / median fresh-data distance (beyond {edges[-1]:g}: {beyond['synthetic_to_train']} "
            f"synthetic, {beyond['holdout_to_train']} holdout)",
            fontsize=7,
        )
        ax.set_ylabel("share of images")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path) -> Path:
    """Membership-inference ROC curves, name -> (FPR, TPR), on log axes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(np.asarray(fpr), 1e-4), np.maximum(np.asarray(tpr), 1e-4), label=name)
    grid = np.logspace(-4, 0, 50)
    ax.plot(grid, grid, "k--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false positive rate (fresh patients called members)")
    ax.set_ylabel("true positive rate (training patients found)")
    ax.set_title("membership inference ROC (log axes)")
    ax.legend(fontsize=6 if len(curves) > 6 else 7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
