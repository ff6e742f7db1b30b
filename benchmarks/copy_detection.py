"""Copy detection through disguises: how often the audit's copy detector flags a training
slice returned mirrored, turned, zoomed, shifted or with another intensity curve, how that
falls with the disguise's strength, and whether a real generator run with 5% disguised
copies mixed into its samples is judged red.

- **Detection table**, on each data set (the brain MRI slices, the phantom CT hospitals,
  and the phantom hospitals' whole abdominal range classed by scanner, a different look):
  150 training slices under each light disguise and each combination of two
  (``benchmarks/disguises.py``, made with SciPy), flagged as near copies exactly as the
  audit flags them (closer to train than 99% of holdout slices are); the false-alarm rate
  on the holdout and on a fresh pool of training patients kept out of train.
- **Strength curves**: detection rate against rotation angle, zoom and gamma (a plot).
- **Partial memorisation**: a conditional DCGAN trained for ``--train-seconds`` on the
  brain MRI (``fedsynth simulate``, one hospital), 1,000 samples audited with
  ``fedsynth audit`` as they are and with 5% of them replaced by disguised training slices.

    python -m benchmarks.copy_detection [--work DIR] [--train-seconds 300] [--threads 2]

Writes benchmarks/results/copy_detection/{copy_detection.json, copy_detection.md,
strength.png}. No image of the brain MRI set is written to the results (it may not be
redistributed).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import disguises
from benchmarks.common import FEDSYNTH, HERE, machine, machine_line, phantom_slices, prepare_brain, progress, run, write
from fedsynth.audit import memorization
from fedsynth.core.plotting import pyplot
from fedsynth.data.sliceset import HOLDOUT, TRAIN, SliceSet

OUT = HERE / "results" / "copy_detection"
COPIES = 150
STRENGTH = {
    "rotation (degrees)": ([0, 5, 10, 15, 20, 30, 45], lambda x, v: disguises.rotate(x, v)),
    "zoom": ([0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2], lambda x, v: disguises.zoom(x, v)),
    "gamma": ([0.4, 0.5, 0.7, 1.0, 1.4, 2.0, 2.5], lambda x, v: disguises.gamma(x, v)),
}


def split(slices: SliceSet, seed: int = 0) -> tuple[SliceSet, SliceSet, SliceSet]:
    """train, holdout, and a fresh pool: a quarter of the training patients kept out of train."""
    train, holdout = slices.only(TRAIN), slices.only(HOLDOUT)
    patients = np.unique(train.patient_ids)
    rng = np.random.default_rng(seed)
    fresh = np.isin(train.patient_ids, rng.choice(patients, len(patients) // 4, replace=False))
    return train.subset(~fresh), holdout, train.subset(fresh)


def flagged(synthetic: np.ndarray, train: SliceSet, holdout: SliceSet) -> tuple[np.ndarray, dict[str, Any]]:
    """Which synthetic images the audit's near-copy test flags in the pixel space."""
    d = memorization.measure_distances(
        "pixels", memorization.CopySearch(), synthetic=synthetic, train=train.images, holdout=holdout.images,
        train_patients=train.patient_ids, holdout_patients=holdout.patient_ids,
    )
    near = memorization.near_copies(d)
    out = np.zeros(len(synthetic), dtype=bool)
    out[near["indices"]] = True
    return out, near


def calibrate(name: str, slices: SliceSet) -> dict[str, Any]:
    train, holdout, fresh = split(slices)
    originals = np.random.default_rng(1).choice(len(train), min(COPIES, len(train)), replace=False)
    source = train.images[originals]
    kinds = {**disguises.SINGLE, **disguises.PAIRS, **disguises.PLAIN}
    sets = {k: f(source) for k, f in kinds.items()}
    strength_sets = {(axis, v): f(source, v) for axis, (values, f) in STRENGTH.items() for v in values}
    everything = [fresh.images, *sets.values(), *strength_sets.values()]
    t = time.perf_counter()
    hit, near = flagged(np.concatenate(everything), train, holdout)
    seconds = time.perf_counter() - t
    n = len(originals)
    rates, at = {}, len(fresh)
    for key in [*sets, *strength_sets]:
        rates[key] = float(hit[at : at + n].mean())
        at += n
    return {
        "data": name,
        "train": len(train), "holdout": len(holdout), "fresh_pool": len(fresh), "copies_per_disguise": n,
        "false_alarms": {"holdout": near["holdout_share"], "fresh_pool": float(hit[: len(fresh)].mean())},
        "threshold": near["threshold"],
        "detection": {k: v for k, v in rates.items() if isinstance(k, str)},
        "strength": {axis: {str(v): rates[(axis, v)] for v in values} for axis, (values, _) in STRENGTH.items()},
        "search_seconds": seconds,
        "images_searched": int(sum(len(x) for x in everything)),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(STRENGTH), figsize=(5 * len(STRENGTH), 3.6))
    for ax, (axis, (values, _)) in zip(axes, STRENGTH.items(), strict=True):
        for r in results:
            ax.plot(values, [r["strength"][axis][str(v)] for v in values], marker="o", label=r["data"])
        ax.axhline(0.95, color="grey", ls="--", lw=1)
        ax.set_xlabel(axis)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("flagged as near copies")
    axes[0].legend(fontsize=8)
    fig.suptitle("Training slices under a disguise, flagged at 1% false alarms (holdout)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def partial_memorisation(work: Path, seconds: int, threads: int) -> dict[str, Any]:
    data = prepare_brain(work, 64)
    run_dir = work / "brain-run"
    if not (run_dir / "rounds.jsonl").exists():
        progress(f"training a conditional DCGAN on the brain MRI for {seconds} s")
        run([FEDSYNTH, "simulate", "--data", str(data), "--hospitals", "1", "--rounds", "1000", "--out",
             str(run_dir), "--set", f"federation.time-budget={seconds}"], log=work / "simulate.log")
    sample_dir = work / "brain-sample"
    if not any(sample_dir.glob("*.npz")):
        run([FEDSYNTH, "sample", "--run", str(run_dir), "--n", "1000", "--format", "npz", "--out", str(sample_dir)])
    sampled = SliceSet.load(next(sample_dir.glob("*.npz")))
    real = SliceSet.load(data)
    train = real.only(TRAIN)
    n = len(sampled) // 20
    rng = np.random.default_rng(5)
    copies, kinds = disguises.mixed(train.images[rng.choice(len(train), n, replace=False)], seed=5)
    images = sampled.images.copy()
    images[:n] = copies
    arms = {"generator": sampled, "generator + 5% disguised copies": replace(sampled, images=images)}
    out: dict[str, Any] = {"train_seconds": seconds, "synthetic_images": len(sampled), "copies": n}
    for arm, slices in arms.items():
        path = slices.save(work / f"{arm.split()[0]}-{len(arm)}.npz")
        audit_dir = work / f"audit-{len(arm)}"
        if not (audit_dir / "audit.json").exists():
            progress(f"auditing: {arm}")
            run([FEDSYNTH, "audit", "--data", str(data), "--synthetic", str(path), "--out", str(audit_dir),
                 "--no-utility", "--threads", str(threads), "--no-pdf"], log=work / f"audit-{len(arm)}.log")
        audit = json.loads((audit_dir / "audit.json").read_text())
        near = audit["memorization"]["pixels"]["near_copies"]
        out[arm] = {
            "copying": audit["summary"]["copying"],
            "near_copies": near["count"], "near_copy_share": near["share"], "null_rate": near["null_rate"],
            "lights": {f"{r['figure']} ({r.get('space')})": r["verdict"] for r in audit["checks"]["copying"]["figures"]},
            "memorization_seconds": audit["seconds"]["memorization"],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedsynth-copy-detection"))
    parser.add_argument("--train-seconds", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    data = {
        "brain MRI": lambda: SliceSet.load(prepare_brain(args.work, 64)),
        "phantom CT (liver slices)": lambda: phantom_slices(64, classes="lesion"),
        "phantom CT (all slices, by scanner)": lambda: phantom_slices(64, classes="site"),
    }
    results = []
    for name, load in data.items():
        progress(f"calibrating on {name}")
        results.append(calibrate(name, load()))
    OUT.mkdir(parents=True, exist_ok=True)
    plot(results, OUT / "strength.png")
    partial = partial_memorisation(args.work, args.train_seconds, args.threads)
    m = machine()
    lines = [
        "# Copy detection through disguises", "", machine_line(m), "",
        "Share of training slices returned under a disguise that the audit flags as near copies (closer to "
        "a training slice than 99% of holdout slices are, in the pixel space with the disguise undone), "
        f"{COPIES} slices per disguise; false alarms on the holdout and on a fresh pool of training patients "
        "kept out of train.", "",
        "| disguise | " + " | ".join(r["data"] for r in results) + " |",
        "| --- | " + " | ".join("---" for _ in results) + " |",
    ]
    for key in results[0]["detection"]:
        lines.append(f"| {key} | " + " | ".join(f"{r['detection'][key]:.0%}" for r in results) + " |")
    for which in ("holdout", "fresh_pool"):
        lines.append(f"| *false alarms, {which.replace('_', ' ')}* | "
                     + " | ".join(f"{r['false_alarms'][which]:.1%}" for r in results) + " |")
    lines.append("| *train / holdout / fresh pool slices* | "
                 + " | ".join(f"{r['train']} / {r['holdout']} / {r['fresh_pool']}" for r in results) + " |")
    lines += ["", "Detection against the disguise's strength:", "", "![detection rate against strength](strength.png)", "",
              "| strength | " + " | ".join(r["data"] for r in results) + " |",
              "| --- | " + " | ".join("---" for _ in results) + " |"]
    for axis, (values, _) in STRENGTH.items():
        for v in values:
            lines.append(f"| {axis} {v} | " + " | ".join(f"{r['strength'][axis][str(v)]:.0%}" for r in results) + " |")
    lines += ["", f"## A real generator run ({partial['train_seconds']} s of training on the brain MRI), "
              f"{partial['synthetic_images']} samples", "",
              "| synthetic set | copying verdict | near copies (pixels) | share (null rate) |",
              "| --- | --- | --- | --- |"]
    for arm in ("generator", "generator + 5% disguised copies"):
        a = partial[arm]
        lines.append(f"| {arm} | {a['copying']} | {a['near_copies']} | {a['near_copy_share']:.1%} "
                     f"({a['null_rate']:.1%}) |")
    write(OUT, "copy_detection", {"machine": m, "data_sets": results, "partial_memorisation": partial}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
