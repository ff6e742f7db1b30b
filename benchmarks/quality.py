"""Quality on the real brain MRI slices: does federation help, what does privacy cost,
do the synthetic images help a small hospital's classifier.

Every arm is trained by fedsynth's own command (``fedsynth simulate`` on Flower's
simulation engine) with the same model and training settings:

- ``federated``: 3 non-IID hospitals (Dirichlet 0.5 by patient), R rounds x L local steps each;
- ``local-<hospital>``: each hospital alone on its own slices, R x L steps (its share of the compute);
- ``pooled``: all training slices in one place, R x 3L steps (the federation's total compute);
- ``vanilla-gan``: seed 001's fully connected GAN, federated, same budget (the baseline to beat);
- ``dp-eps-E``: federated with every hospital under DP-SGD at target epsilon E.

Fidelity is measured for every arm in ONE feature space (PCA and the audit's encoder, fit
once on all real slices) against the same pooled holdout, so arms compare. Privacy and
utility come from ``fedsynth audit`` on each federated arm. The low-data study gives each
hospital a small share of its slices and trains classifiers on real vs real+synthetic
(and the re-drawn-real control), scored on the pooled holdout.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import FEDSYNTH, prepare_brain, run


@dataclass(frozen=True)
class QualityConfig:
    image_size: int
    limit: int | None  # slices kept from the brain MRI set (None: all)
    rounds: int
    local_steps: int
    batch: int
    epsilons: tuple[float, ...]
    n_synthetic: int
    audit_seeds: int
    audit_utility_steps: int
    audit_encoder_steps: int
    lowdata_fraction: float
    lowdata_seeds: int
    lowdata_steps: int
    threads: int
    seed: int = 0


QUICK = QualityConfig(image_size=32, limit=600, rounds=2, local_steps=10, batch=32, epsilons=(10.0,), n_synthetic=200,
                      audit_seeds=2, audit_utility_steps=30, audit_encoder_steps=200, lowdata_fraction=0.2,
                      lowdata_seeds=2, lowdata_steps=30, threads=2)
FULL = QualityConfig(image_size=32, limit=None, rounds=8, local_steps=100, batch=32, epsilons=(10.0, 3.0, 1.0),
                     n_synthetic=2000, audit_seeds=5, audit_utility_steps=200, audit_encoder_steps=500,
                     lowdata_fraction=0.15, lowdata_seeds=5, lowdata_steps=200, threads=2)
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def arms(cfg: QualityConfig) -> list[str]:
    return ["federated", *(f"local-{h}" for h in HOSPITALS), "pooled", "vanilla-gan",
            *(f"dp-eps-{e:g}" for e in cfg.epsilons)]


def train_arms(cfg: QualityConfig, data: Path, work: Path, progress) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Train every arm (skipping one whose run already finished: a re-run resumes)."""
    common = ["--set", f"train.batch-size={cfg.batch}", "--set", f"train.seed={cfg.seed}"]
    fed = ["--hospitals", "3", "--partition", "dirichlet:0.5", "--set", "federation.min-hospitals=3"]
    plan: dict[str, list[str]] = {"federated": ["--data", str(data), *fed]}
    for h in HOSPITALS:
        plan[f"local-{h}"] = ["--data", str(work / "federated" / "hospitals" / h / "slices.npz"), "--hospitals", "1"]
    plan["pooled"] = ["--data", str(data), "--hospitals", "1"]
    plan["vanilla-gan"] = ["--data", str(data), *fed, "--set", "model.name=vanilla-gan"]
    for e in cfg.epsilons:
        plan[f"dp-eps-{e:g}"] = ["--data", str(data), *fed, "--set", f"dp.target-epsilon={e:g}"]
    done: dict[str, dict[str, Any]] = {}
    for i, (arm, args) in enumerate(plan.items(), 1):
        out = work / arm
        steps = cfg.local_steps * (3 if arm == "pooled" else 1)
        progress(f"quality: training arm {i}/{len(plan)}: {arm} ({cfg.rounds} rounds x {steps} steps)")
        status = out / "status.json"
        timing = work / "logs" / f"train-{arm}.seconds"
        if not (status.exists() and '"finished"' in status.read_text() and timing.exists()):
            shutil.rmtree(out, ignore_errors=True)
            seconds = run([FEDSYNTH, "simulate", *args, "--rounds", str(cfg.rounds), "--local-steps", str(steps),
                           "--out", str(out), *common], log=work / "logs" / f"train-{arm}.log")
            timing.write_text(f"{seconds}\n")
        seconds = float(timing.read_text())
        done[arm] = {"run": out, "seconds": seconds, "local_steps": steps}
    return done


def _spaces(real: np.ndarray, cfg: QualityConfig):  # type: ignore[no-untyped-def]
    from fedsynth.audit.features import AutoencoderSpace, PixelSpace

    pixels = PixelSpace(components=64, seed=cfg.seed).fit(real)
    encoder = AutoencoderSpace(steps=cfg.audit_encoder_steps, seed=cfg.seed, threads=cfg.threads).fit(real)
    return {"pixels": pixels, "encoder": encoder}


def fidelity(cfg: QualityConfig, data: Path, runs: dict[str, dict[str, Any]], progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """FD and KID to the pooled holdout in shared spaces, class-matched SSIM (seed 003's
    protocol, against held-out slices), MS-SSIM diversity; the real train set as reference."""
    from fedsynth.audit.fidelity import (
        class_matched_ssim_psnr,
        frechet_distance,
        kernel_inception_distance,
        ms_ssim_diversity,
    )
    from fedsynth.commands.sample import sample_images
    from fedsynth.shared.rundir import RunDir
    from fedsynth.shared.sliceset import SliceSet

    slices = SliceSet.load(data)
    train, holdout = slices.only("train"), slices.only("holdout")
    progress("quality: fitting the shared feature spaces on all real slices")
    spaces = _spaces(np.concatenate([train.images, holdout.images]), cfg)
    hold_f = {k: s.transform(holdout.images) for k, s in spaces.items()}

    def measure(images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for name, space in spaces.items():
            f = space.transform(images)
            row[f"fd_{name}"] = frechet_distance(f, hold_f[name])
            kid = kernel_inception_distance(f, hold_f[name], subset_size=min(1000, len(f), len(hold_f[name])),
                                            seed=cfg.seed)
            row[f"kid_{name}"] = kid["mean"]
        ssim = class_matched_ssim_psnr(images, labels, holdout.images, holdout.labels, seed=cfg.seed)
        row["ssim_class_matched"] = ssim["ssim_mean"]
        row["psnr_class_matched"] = ssim["psnr_mean"]
        row["ms_ssim_diversity"] = ms_ssim_diversity(images, seed=cfg.seed)["mean"]
        return row

    rng = np.random.default_rng(cfg.seed)
    ref = train.subset(rng.choice(len(train), size=min(cfg.n_synthetic, len(train)), replace=False))
    out: dict[str, Any] = {"real train (reference)": measure(ref.images, ref.labels)}
    for arm, info in runs.items():
        progress(f"quality: fidelity of {arm}")
        images, labels, _, used, conditional = sample_images(RunDir(info["run"]), n=cfg.n_synthetic, label=None,
                                                             round_=None, seed=cfg.seed)
        out[arm] = {**measure(images, labels if conditional else None), "round": used, "conditional": conditional}
    gap = {}
    for space in ("encoder", "pixels"):
        local_mean = float(np.mean([out[f"local-{h}"][f"fd_{space}"] for h in HOSPITALS]))
        pooled, fed = out["pooled"][f"fd_{space}"], out["federated"][f"fd_{space}"]
        gap[space] = {"local_mean": local_mean, "pooled": pooled, "federated": fed,
                      "share_closed": (local_mean - fed) / (local_mean - pooled) if local_mean != pooled else None}
    return {"arms": out, "gap_closed": gap, "holdout_size": len(holdout),
            "train_size": len(train)}


def audits(cfg: QualityConfig, runs: dict[str, dict[str, Any]], work: Path, progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """``fedsynth audit`` (pooled over the consortium's slices) of every federated arm:
    downstream gain, membership-inference AUC, near-copies, and the verdicts."""
    import json

    out = {}
    targets = ["federated", "vanilla-gan", *(f"dp-eps-{e:g}" for e in cfg.epsilons)]
    for i, arm in enumerate(targets, 1):
        progress(f"quality: audit {i}/{len(targets)}: {arm}")
        folder = work / "audits" / arm
        if not (folder / "audit.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            run([FEDSYNTH, "audit", "--run", str(runs[arm]["run"]), "--out", str(folder), "--no-pdf",
                 "--seeds", str(cfg.audit_seeds),
                 "--utility-steps", str(cfg.audit_utility_steps), "--encoder-steps", str(cfg.audit_encoder_steps),
                 "--threads", str(cfg.threads), "--seed", str(cfg.seed)], log=work / "logs" / f"audit-{arm}.log")
        audit = json.loads((folder / "audit.json").read_text())
        attacks = audit["membership_inference"]["attacks"]
        worst = max(attacks, key=lambda k: attacks[k]["auc"])
        gains = audit["utility"].get("gains", {}).get("real+synthetic-1x", {})
        out[arm] = {
            "verdicts": {k: v["verdict"] for k, v in audit["checks"].items()},
            "mia_auc_max": attacks[worst]["auc"], "mia_worst_attack": worst,
            "mia_auc": {k: v["auc"] for k, v in attacks.items()},
            "gain_over_real": gains.get("over_real", {}).get("balanced_accuracy"),
            "gain_over_control": gains.get("over_control", {}).get("balanced_accuracy"),
            "epsilon": max((h["epsilon_rdp"] for h in audit["privacy"]["hospitals"].values()
                            if h.get("epsilon_rdp") is not None), default=None),
            "report": str(folder / "report.html"),
        }
    return out


def lowdata(cfg: QualityConfig, data: Path, runs: dict[str, dict[str, Any]], progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Each hospital keeps ``lowdata_fraction`` of its training slices; classifiers on real
    vs real+synthetic (1x) vs the control, scored on the pooled holdout, for the federated
    generator and the epsilon-10 one."""
    from fedsynth.audit.utility import utility_study
    from fedsynth.commands.sample import sample_images
    from fedsynth.shared.rundir import RunDir
    from fedsynth.shared.sliceset import SliceSet

    holdout = SliceSet.load(data).only("holdout")
    generators = ["federated", *([f"dp-eps-{10.0:g}"] if 10.0 in cfg.epsilons else [])]
    result: dict[str, Any] = {"fraction": cfg.lowdata_fraction, "seeds": cfg.lowdata_seeds, "steps": cfg.lowdata_steps,
                              "holdout_size": len(holdout), "studies": {}}
    rng = np.random.default_rng(cfg.seed)
    for h in HOSPITALS:
        train = SliceSet.load(runs["federated"]["run"] / "hospitals" / h / "slices.npz").only("train")
        # The same share of every class (at least 2 slices of each, where the hospital has them).
        keep = []
        for c in range(len(train.class_names)):
            members = np.flatnonzero(train.labels == c)
            take = min(len(members), max(2, int(round(cfg.lowdata_fraction * len(members)))))
            keep.extend(rng.choice(members, size=take, replace=False))
        small = train.subset(np.sort(np.array(keep)))
        missing = [n for c, n in enumerate(train.class_names) if not (small.labels == c).any()]
        if missing:
            result["studies"][h] = {"hospital": h, "skipped": f"no training slices of {', '.join(missing)}"}
            continue
        for gen_arm in generators:
            progress(f"quality: low-data classifiers, {h} with {len(small)} slices + {gen_arm} images")
            images, labels, _, _, _ = sample_images(RunDir(runs[gen_arm]["run"]), n=max(4 * len(small), 200),
                                                    label=None, round_=None, seed=cfg.seed + 1)
            study = utility_study(small.images, small.labels, holdout.images, holdout.labels, images, labels,
                                  class_names=small.class_names, seeds=cfg.lowdata_seeds, steps=cfg.lowdata_steps,
                                  ratios=(1.0,), seed=cfg.seed, threads=cfg.threads)
            gains = study["gains"]["real+synthetic-1x"]
            result["studies"][f"{h}/{gen_arm}"] = {
                "hospital": h, "generator": gen_arm, "train_slices": len(small),
                "real_balanced_accuracy": study["conditions"]["real"]["balanced_accuracy"]["mean"],
                "over_real": gains["over_real"]["balanced_accuracy"],
                "over_control": gains["over_control"]["balanced_accuracy"],
                "skipped": study.get("skipped", {}),
            }
    return result


def run_quality(cfg: QualityConfig, work: Path, out: Path, progress) -> tuple[dict[str, Any], list[str]]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    progress(f"quality: preparing the brain MRI slices at {cfg.image_size} px")
    data = prepare_brain(work, cfg.image_size, limit=cfg.limit, seed=cfg.seed)
    runs = train_arms(cfg, data, work, progress)
    fid = fidelity(cfg, data, runs, progress)
    aud = audits(cfg, runs, work, progress)
    low = lowdata(cfg, data, runs, progress)
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(runs["federated"]["run"] / "samples" / "real.png", grids / "real.png")
    for arm, info in runs.items():
        last = sorted((info["run"] / "samples").glob("round-*.png"))[-1]
        shutil.copyfile(last, grids / f"{arm}.png")
    result = {"config": asdict(cfg), "data": str(data), "training_seconds": {a: r["seconds"] for a, r in runs.items()},
              "fidelity": fid, "audits": aud, "lowdata": low, "seconds": time.perf_counter() - started}
    plots(result, out)
    return result, markdown(result)


def plots(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = result["fidelity"]["arms"]
    names = [a for a in fid if a != "real train (reference)"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(names, [fid[a]["fd_encoder"] for a in names], color=["C0" if a == "federated" else "C7" for a in names])
    ax.axhline(fid["real train (reference)"]["fd_encoder"], color="C2", ls="--", label="real train slices")
    ax.set_ylabel("FD to the holdout (encoder space)")
    ax.set_title("Fidelity per arm (lower is better)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fidelity_arms.png", dpi=110)
    plt.close(fig)

    cfg = result["config"]
    eps_arms = [("inf", "federated"), *((f"{e:g}", f"dp-eps-{e:g}") for e in cfg["epsilons"])]
    labels = [e for e, _ in eps_arms]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].plot(labels, [fid[a]["fd_encoder"] for _, a in eps_arms], "o-")
    axes[0].set_title("FD to holdout (lower better)")
    gain = [result["audits"][a]["gain_over_real"] for _, a in eps_arms]
    mean = [g["mean"] if g else np.nan for g in gain]
    lo = [g["mean"] - g["ci_low"] if g else 0 for g in gain]
    hi = [g["ci_high"] - g["mean"] if g else 0 for g in gain]
    axes[1].errorbar(labels, mean, yerr=[lo, hi], fmt="o-", capsize=4)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_title("balanced-accuracy gain, real+synthetic\nover real (95% CI)")
    axes[2].plot(labels, [result["audits"][a]["mia_auc_max"] for _, a in eps_arms], "o-", color="C3")
    axes[2].axhline(0.5, color="grey", lw=0.8)
    axes[2].set_title("strongest membership attack AUC\n(0.5 = guessing)")
    for ax in axes:
        ax.set_xlabel("target epsilon")
    fig.tight_layout()
    fig.savefig(out / "privacy_utility.png", dpi=110)
    plt.close(fig)

    studies = {k: v for k, v in result["lowdata"]["studies"].items() if "over_real" in v}
    fig, ax = plt.subplots(figsize=(8, 3.4))
    keys = list(studies)
    for j, which in enumerate(("over_real", "over_control")):
        vals = [studies[k][which] for k in keys]
        x = np.arange(len(keys)) + (j - 0.5) * 0.3
        ax.errorbar(x, [v["mean"] for v in vals], yerr=[[v["mean"] - v["ci_low"] for v in vals],
                                                         [v["ci_high"] - v["mean"] for v in vals]],
                    fmt="o", capsize=4, label=f"gain {which.replace('_', ' ')}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=8)
    ax.set_ylabel("balanced-accuracy gain")
    ax.set_title(f"Low-data hospitals ({result['lowdata']['fraction']:.0%} of their slices): real+synthetic, 95% CI")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lowdata_gain.png", dpi=110)
    plt.close(fig)


def _ci(v: dict[str, Any] | None) -> str:
    if not v:
        return "n/a"
    return f"{v['mean']:+.3f} ({v['ci_low']:+.3f} to {v['ci_high']:+.3f})"


def markdown(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    fid = result["fidelity"]
    lines = [f"### Quality arms (brain MRI, {fid['train_size']} train / {fid['holdout_size']} holdout slices, "
             f"{cfg['image_size']} px, {cfg['rounds']} rounds x {cfg['local_steps']} local steps, batch {cfg['batch']})", "",
             "| arm | training (s) | FD encoder (x real reference) | KID encoder | FD pixels | class-matched SSIM | MS-SSIM (diversity) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, row in fid["arms"].items():
        secs = result["training_seconds"].get(arm)
        secs_s = "-" if secs is None else f"{secs:.0f}"
        ref = fid["arms"]["real train (reference)"]["fd_encoder"]
        lines.append(f"| {arm} | {secs_s} | {row['fd_encoder']:.4g} ({row['fd_encoder'] / ref:.3g}x) | "
                     f"{row['kid_encoder']:.3g} | {row['fd_pixels']:.1f} | "
                     f"{row['ssim_class_matched']:.3f} | {row['ms_ssim_diversity']:.3f} |")
    g = fid["gap_closed"]
    lines += ["", "Share of the local -> pooled FD gap that federation closes: " + ", ".join(
        f"{space} {v['share_closed']:.0%}" if v["share_closed"] is not None else f"{space} n/a"
        for space, v in g.items()) + " (goal >= 80%).", "",
        "### Privacy-utility (fedsynth audit of each federated arm)", "",
        "| arm | epsilon spent | FD encoder | gain over real (95% CI) | gain over control | strongest MIA AUC | verdicts |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, a in result["audits"].items():
        eps = "inf" if a["epsilon"] is None else f"{a['epsilon']:.2f}"
        verdicts = ", ".join(f"{k} {v}" for k, v in a["verdicts"].items())
        lines.append(f"| {arm} | {eps} | {fid['arms'][arm]['fd_encoder']:.2f} | {_ci(a['gain_over_real'])} | "
                     f"{_ci(a['gain_over_control'])} | {a['mia_auc_max']:.3f} ({a['mia_worst_attack']}) | {verdicts} |")
    low = result["lowdata"]
    lines += ["", f"### Low-data hospitals ({low['fraction']:.0%} of their training slices, {low['seeds']} seeds, "
              f"scored on the pooled holdout of {low['holdout_size']})", "",
              "| hospital / generator | slices | real-only balanced accuracy | gain over real (95% CI) | gain over control |",
              "| --- | --- | --- | --- | --- |"]
    for key, s in low["studies"].items():
        if "over_real" not in s:
            lines.append(f"| {key} | - | - | skipped: {s['skipped']} | - |")
            continue
        lines.append(f"| {key} | {s['train_slices']} | {s['real_balanced_accuracy']:.3f} | {_ci(s['over_real'])} | "
                     f"{_ci(s['over_control'])} |")
    return lines
