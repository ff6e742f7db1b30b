"""How quality grows with compute: fedsynth's federated default against the central plain
conditional DCGAN, at several wall-clock budgets, on one data set (the brain MRI by default).

    python -m benchmarks.compute_curve                                   # 150, 300, 600, 1800 s
    python -m benchmarks.compute_curve --budgets 150,300 --datasets brain,phantom-lesion

Each budget is one ``benchmarks.recipe_ablation --downstream`` run of the two arms
(``reference``, ``fed-fedsynth``) into ``OUT/budget-N``: classifier-feature FD against the
real holdout, the low-data study's gain over the re-drawn-real control (with its oracle),
CAS and the copy check. A budget whose results are already there is not run again, so an
interrupted curve resumes where it stopped. The plot ``OUT/compute_curve.png`` and the
table ``OUT/compute_curve.md`` gather every budget found. Run it alone: a second torch
process on the same cores halves the compute of every arm.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import HERE, progress, write
from .recipe_ablation import main as ablation

ARMS = ("reference", "fed-fedsynth")
NAMES = {"reference": "central plain DCGAN", "fed-fedsynth": "fedsynth, 3 hospitals"}


def collect(out: Path, datasets: list[str]) -> dict[str, Any]:
    """{data set: {arm: [(budget, FD, gain over control or None), ...]}} from every budget run found."""
    curve: dict[str, Any] = {d: {a: [] for a in ARMS} for d in datasets}
    results = [json.loads(path.read_text()) for path in out.glob("budget-*/recipe_ablation.json")]
    for result in sorted(results, key=lambda r: float(r["config"]["budget"])):
        budget = float(result["config"]["budget"])
        for d in datasets:
            for arm in ARMS:
                r = result["datasets"].get(d, {}).get(arm)
                if r is None:
                    continue
                gain = (r.get("downstream") or {}).get("gain_over_control")
                curve[d][arm].append({"budget": budget, "fd": r["fd"], "precision": r["precision"],
                                      "recall": r["recall"], "gain_over_control": gain,
                                      "cas_ratio": (r.get("downstream") or {}).get("cas_ratio")})
    return curve


def plot(curve: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(curve), 2, figsize=(10, 3.6 * len(curve)), squeeze=False)
    for row, (d, arms) in enumerate(curve.items()):
        fd_ax, gain_ax = axes[row]
        for arm, points in arms.items():
            if not points:
                continue
            x = [p["budget"] for p in points]
            fd_ax.plot(x, [p["fd"] for p in points], "o-", label=NAMES[arm])
            gains = [(p["budget"], p["gain_over_control"]) for p in points if p["gain_over_control"]]
            if gains:
                gx = [b for b, _ in gains]
                mean = [g["mean"] for _, g in gains]
                low = [g["mean"] - g["ci_low"] for _, g in gains]
                high = [g["ci_high"] - g["mean"] for _, g in gains]
                gain_ax.errorbar(gx, mean, yerr=[low, high], fmt="o-", capsize=3, label=NAMES[arm])
        fd_ax.set(xscale="log", yscale="log", xlabel="seconds of training per arm (budget)",
                  ylabel="classifier-feature FD (lower is better)", title=f"{d}: fidelity")
        gain_ax.axhline(0, color="grey", linewidth=1)
        gain_ax.set(xscale="log", xlabel="seconds of training per arm (budget)",
                    ylabel="balanced accuracy gain over control", title=f"{d}: low-data gain (95% CI)")
        for ax in (fd_ax, gain_ax):
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(curve: dict[str, Any]) -> list[str]:
    lines = ["| data set | arm | seconds | FD classifier | precision / recall | gain over control (95% CI) | CAS (x real) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for d, arms in curve.items():
        for arm, points in arms.items():
            for p in points:
                g = p["gain_over_control"]
                gain = "-" if not g else f"{g['mean']:+.3f} ({g['ci_low']:+.3f} to {g['ci_high']:+.3f})"
                cas = "-" if p["cas_ratio"] is None else f"{p['cas_ratio']:.2f}"
                lines.append(f"| {d} | {NAMES[arm]} | {p['budget']:g} | {p['fd']:.2f} | "
                             f"{p['precision']:.2f} / {p['recall']:.2f} | {gain} | {cas} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="150,300,600,1800", help="comma-separated seconds of training per arm")
    p.add_argument("--datasets", default="brain", help="comma-separated data sets of benchmarks.recipe_ablation")
    p.add_argument("--out", type=Path, default=HERE / "results" / "compute-curve")
    p.add_argument("--work", type=Path, default=HERE / ".work")
    args = p.parse_args(argv)
    datasets = args.datasets.split(",")
    for budget in (float(b) for b in args.budgets.split(",")):
        target = args.out / f"budget-{budget:g}"
        if (target / "recipe_ablation.json").exists():
            done = json.loads((target / "recipe_ablation.json").read_text())
            complete = set(datasets) <= set(done["config"]["datasets"]) and done["config"].get("downstream")
            # results from before the copy check was measured within classes are measured again
            current = all("closer_to_train_by_class" in (arm.get("downstream") or {})
                          for name in datasets for arm in done["datasets"].get(name, {}).values()
                          if isinstance(arm, dict) and "downstream" in arm)
            if complete and current:
                progress(f"{budget:g} s: already measured in {target}")
                continue
            progress(f"{budget:g} s: {target} lacks some of {', '.join(datasets)}, the downstream study or the "
                     "within-class copy check: measured again")
        progress(f"{budget:g} s per arm")
        ablation(["--budget", f"{budget:g}", "--arms", ",".join(ARMS), "--datasets", args.datasets, "--downstream",
                  "--out", str(target), "--work", str(args.work)])
    curve = collect(args.out, datasets)
    plot(curve, args.out / "compute_curve.png")
    write(args.out, "compute_curve", curve, markdown(curve))
    print("\n".join(markdown(curve)))


if __name__ == "__main__":
    main()
