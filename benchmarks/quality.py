"""Quality on the real brain MRI slices: does federation help, what does privacy cost,
do the synthetic images help a small hospital's classifier.

Every arm is trained by fedsynth's own command (``fedsynth simulate`` on Flower's
simulation engine) with the same model and training settings:

- ``federated``: 3 non-IID hospitals (Dirichlet 0.5 by patient), R rounds x L local steps each;
- ``local-<hospital>``: each hospital alone on its own slices, R x L steps (its share of the compute);
- ``pooled``: all training slices in one place, R x 3L steps (the federation's total compute);
- ``vanilla-gan``: seed 001's fully connected GAN, federated, same budget (the baseline to beat);
- ``dp-eps-E``: federated with every hospital under DP-SGD at target epsilon E;
- ``lowdata-federated`` / ``lowdata-dp-eps-10``: the same three hospitals keeping only
  ``lowdata_fraction`` of their training slices (stratified by class), federated. The
  low-data classifiers get synthetic images from these, so no synthetic image carries a
  slice the small hospitals do not hold.

Fidelity is measured for every arm in ONE feature space (PCA and the audit's encoder, fit
once on all real slices) against the same pooled holdout, so arms compare. Privacy and
utility come from ``fedsynth audit`` on each federated arm. The low-data study trains each
small hospital's classifiers on its real slices vs real + the low-data federation's
synthetic images (and the re-drawn-real control), scored on the pooled holdout.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.runs.rundir import RunDir

from .common import FEDSYNTH, forget_other_config, prepare_brain, run, write


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
    audit_classifier_steps: int
    lowdata_fraction: float
    lowdata_seeds: int
    lowdata_steps: int
    threads: int
    seed: int = 0
    # the hospitals trained alone (the "local" arms of the gap closed); the quick run trains one,
    # since the others take the same code path and each costs a Flower start-up
    local_hospitals: tuple[str, ...] = ("hospital-a", "hospital-b", "hospital-c")
    # the low-data federation also trained under DP at epsilon 10 (when 10 is among the epsilons);
    # the quick run leaves it out: the dp-eps-10 arm runs the same DP code path
    lowdata_dp: bool = True


QUICK = QualityConfig(image_size=32, limit=600, rounds=2, local_steps=10, batch=32, epsilons=(10.0,), n_synthetic=200,
                      audit_seeds=2, audit_utility_steps=30, audit_encoder_steps=200, audit_classifier_steps=60, lowdata_fraction=0.2,
                      lowdata_seeds=2, lowdata_steps=30, threads=2, local_hospitals=("hospital-a",),
                      lowdata_dp=False)
FULL = QualityConfig(image_size=32, limit=None, rounds=8, local_steps=100, batch=32, epsilons=(10.0, 3.0, 1.0),
                     n_synthetic=2000, audit_seeds=5, audit_utility_steps=200, audit_encoder_steps=500, audit_classifier_steps=480,
                     lowdata_fraction=0.15, lowdata_seeds=5, lowdata_steps=200, threads=2)
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def _lowdata_set(cfg: QualityConfig, work: Path) -> Path:
    """The federated arm's hospitals, each keeping ``lowdata_fraction`` of every class of
    its training slices (at least 2 where it has any) and all its holdout slices; the
    site column names the hospital, for ``--partition by-site``."""
    from dataclasses import replace

    from fedsynth.data.sliceset import SliceSet

    path = work / "lowdata.npz"
    if path.exists():
        return path
    rng = np.random.default_rng(cfg.seed)
    parts = []
    for h in HOSPITALS:
        part = SliceSet.load(RunDir(work / "federated").hospitals.slices(h))
        keep = part.split != "train"
        for c in range(len(part.class_names)):
            members = np.flatnonzero((part.labels == c) & (part.split == "train"))
            take = min(len(members), max(2, int(round(cfg.lowdata_fraction * len(members)))))
            keep[rng.choice(members, size=take, replace=False)] = True
        small = part.subset(keep)
        parts.append(replace(small, site=np.full(len(small), h)))
    first = parts[0]
    merged = replace(first, **{k: np.concatenate([getattr(p, k) for p in parts])
                               for k in ("images", "labels", "patient_ids", "split", "source", "site")})
    return merged.save(path)


def train_arms(cfg: QualityConfig, data: Path, work: Path, progress) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Train every arm; an arm whose run finished under this same config is kept (a re-run
    resumes), and a retrained arm's audit is dropped."""
    common = ["--set", f"train.batch-size={cfg.batch}", "--set", f"train.seed={cfg.seed}"]
    fed = ["--hospitals", "3", "--partition", "dirichlet:0.5", "--set", "federation.min-hospitals=3"]
    plan: dict[str, Any] = {"federated": ["--data", str(data), *fed]}
    for h in cfg.local_hospitals:
        plan[f"local-{h}"] = ["--data", str(RunDir(work / "federated").hospitals.slices(h)), "--hospitals", "1"]
    plan["pooled"] = ["--data", str(data), "--hospitals", "1"]
    plan["vanilla-gan"] = ["--data", str(data), *fed, "--set", "model.name=vanilla-gan"]
    for e in cfg.epsilons:
        plan[f"dp-eps-{e:g}"] = ["--data", str(data), *fed, "--set", f"dp.target-epsilon={e:g}"]
    small = ["--hospitals", "3", "--partition", "by-site", "--set", "federation.min-hospitals=3"]
    plan["lowdata-federated"] = lambda: ["--data", str(_lowdata_set(cfg, work)), *small]
    if 10.0 in cfg.epsilons and cfg.lowdata_dp:
        plan["lowdata-dp-eps-10"] = lambda: ["--data", str(_lowdata_set(cfg, work)), *small,
                                             "--set", "dp.target-epsilon=10"]
    done: dict[str, dict[str, Any]] = {}
    for i, (arm, args) in enumerate(plan.items(), 1):
        out = work / arm
        steps = cfg.local_steps * (3 if arm == "pooled" else 1)
        progress(f"quality: training arm {i}/{len(plan)}: {arm} ({cfg.rounds} rounds x {steps} steps)")
        status = out / "status.json"
        timing = work / "logs" / f"train-{arm}.seconds"
        if not (status.exists() and '"finished"' in status.read_text() and timing.exists()):
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(work / "audits" / arm, ignore_errors=True)
            args = args() if callable(args) else args
            seconds = run([FEDSYNTH, "simulate", *args, "--rounds", str(cfg.rounds), "--local-steps", str(steps),
                           "--out", str(out), *common], log=work / "logs" / f"train-{arm}.log")
            timing.write_text(f"{seconds}\n")
        seconds = float(timing.read_text())
        done[arm] = {"run": out, "seconds": seconds, "local_steps": steps}
    return done


def draw(run_dir: Path, n: int, proportions: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` images from a run's last generator, classes in ``proportions`` (the real
    data's mix, so FD is not biased against conditional generators); labels None for an
    unconditional generator."""
    from fedsynth.audit.utility import _largest_remainder
    from fedsynth.models.sampling import generate
    from fedsynth.synthesis.generator import load_generator

    labels = np.repeat(np.arange(len(proportions)), _largest_remainder(n, proportions))
    loaded = load_generator(RunDir(run_dir))
    gen, cfg = loaded.gen, loaded.cfg
    conditional = cfg.model.family.conditional(cfg.model)
    # an unconditional generator ignores the labels: they are not its images' classes
    return generate(gen, labels, seed=seed), (labels if conditional else None)


def gap_closed(local_fds: list[float], pooled: float, federated: float) -> float | None:
    """Share of the gap between the hospitals alone (mean FD) and pooled data that
    federation closes: 1 = as good as pooling, 0 = no better than alone. None when pooling
    is not clearly better than training alone (the share would mean nothing)."""
    local = float(np.mean(local_fds))
    if not (local - pooled > 0.05 * abs(local)):
        return None
    return (local - federated) / (local - pooled)


def _spaces(real: np.ndarray, cfg: QualityConfig):  # type: ignore[no-untyped-def]
    from fedsynth.metrics.features import AutoencoderSpace, PixelSpace

    pixels = PixelSpace(components=64, seed=cfg.seed).fit(real)
    encoder = AutoencoderSpace(steps=cfg.audit_encoder_steps, seed=cfg.seed, threads=cfg.threads).fit(real)
    return {"pixels": pixels, "encoder": encoder}


def fidelity(cfg: QualityConfig, data: Path, runs: dict[str, dict[str, Any]], progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """FD and KID to the pooled holdout in shared spaces, class-matched SSIM (seed 003's
    protocol, against held-out slices), MS-SSIM diversity; the real train set as reference."""
    from fedsynth.metrics.fidelity import (
        class_matched_ssim_psnr,
        frechet_distance,
        kernel_inception_distance,
        ms_ssim_diversity,
    )
    from fedsynth.data.sliceset import SliceSet

    slices = SliceSet.load(data)
    train, holdout = slices.only("train"), slices.only("holdout")
    proportions = np.bincount(train.labels, minlength=len(train.class_names)).astype(float)
    progress("quality: fitting the shared feature spaces on all real slices")
    spaces = _spaces(np.concatenate([train.images, holdout.images]), cfg)
    hold_f = {k: s.transform(holdout.images) for k, s in spaces.items()}

    def measure(images: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for name, space in spaces.items():
            f = space.transform(images)
            try:
                row[f"fd_{name}"] = frechet_distance(f, hold_f[name])
            except ValueError as err:  # e.g. a collapsed generator's singular covariance
                row[f"fd_{name}"], row[f"fd_{name}_error"] = None, str(err)
            kid = kernel_inception_distance(f, hold_f[name], subset_size=min(1000, len(f), len(hold_f[name])),
                                            seed=cfg.seed)
            row[f"kid_{name}"] = kid["mean"]
        ssim = class_matched_ssim_psnr(images, labels, holdout.images, holdout.labels, seed=cfg.seed)
        row["ssim_class_matched"] = ssim["ssim_mean"]
        row["ssim_matched_by_class"] = labels is not None
        row["psnr_class_matched"] = ssim["psnr_mean"]
        row["ms_ssim_diversity"] = ms_ssim_diversity(images, seed=cfg.seed)["mean"]
        return row

    rng = np.random.default_rng(cfg.seed)
    ref = train.subset(rng.choice(len(train), size=min(cfg.n_synthetic, len(train)), replace=False))
    out: dict[str, Any] = {"real train (reference)": measure(ref.images, ref.labels)}
    for arm, info in runs.items():
        if arm.startswith("lowdata-"):
            continue
        progress(f"quality: fidelity of {arm}")
        images, labels = draw(info["run"], cfg.n_synthetic, proportions, cfg.seed)
        out[arm] = {**measure(images, labels), "conditional": labels is not None}
    gap = {}
    for space in ("encoder", "pixels"):
        locals_ = [out[f"local-{h}"][f"fd_{space}"] for h in cfg.local_hospitals]
        pooled, fed = out["pooled"][f"fd_{space}"], out["federated"][f"fd_{space}"]
        ok = None not in (*locals_, pooled, fed)
        gap[space] = {"local": locals_, "local_mean": float(np.mean(locals_)) if ok else None, "pooled": pooled,
                      "federated": fed, "share_closed": gap_closed(locals_, pooled, fed) if ok else None}
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
                 "--classifier-steps", str(cfg.audit_classifier_steps),
                 "--threads", str(cfg.threads), "--seed", str(cfg.seed)], log=work / "logs" / f"audit-{arm}.log")
        audit = json.loads((folder / "audit.json").read_text())
        attacks = audit["membership_inference"]["attacks"]
        worst = max(attacks, key=lambda k: attacks[k]["auc"])
        # real + synthetic (class-balancing) against real alone and against the control that
        # adds the same number of re-drawn real images per class, as the audit's verdict does
        gains = audit["utility"].get("gains", {}).get("real+synthetic-balanced", {})
        out[arm] = {
            "verdicts": {k: v["verdict"] for k, v in audit["checks"].items()},
            "mia_auc_max": attacks[worst]["auc"], "mia_worst_attack": worst,
            "mia_auc": {k: v["auc"] for k, v in attacks.items()},
            "gain_over_real": gains.get("over_real", {}).get("balanced_accuracy"),
            "gain_over_control": gains.get("over_control", {}).get("balanced_accuracy"),
            # the private release to compare with (a DP run's audit only): DP-SGD on the real slices
            "dp_sgd_classifier": audit["utility"].get("conditions", {}).get("real-dp-sgd", {}).get("balanced_accuracy"),
            "epsilon": max((h["epsilon_rdp"] for h in audit["privacy"]["hospitals"].values()
                            if h.get("epsilon_rdp") is not None), default=None),
            "report": str(folder / "report.html"),
        }
    return out


def lowdata(cfg: QualityConfig, data: Path, runs: dict[str, dict[str, Any]], progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Each small hospital (``lowdata_fraction`` of its slices): classifiers on its real
    slices vs real + the low-data federation's synthetic images (class-balancing) vs the
    control (as many re-drawn real images), scored on the pooled holdout."""
    from fedsynth.audit.utility import utility_study
    from fedsynth.data.sliceset import SliceSet

    holdout = SliceSet.load(data).only("holdout")
    generators = [a for a in ("lowdata-federated", "lowdata-dp-eps-10") if a in runs]
    result: dict[str, Any] = {"fraction": cfg.lowdata_fraction, "seeds": cfg.lowdata_seeds, "steps": cfg.lowdata_steps,
                              "holdout_size": len(holdout), "generators": generators, "studies": {}}
    for h in HOSPITALS:
        small = SliceSet.load(RunDir(runs["lowdata-federated"]["run"]).hospitals.slices(h)).only("train")
        missing = [n for c, n in enumerate(small.class_names) if not (small.labels == c).any()]
        for gen_arm in generators:
            key = f"{h}/{gen_arm}"
            if missing:
                result["studies"][key] = {"hospital": h, "generator": gen_arm, "train_slices": len(small),
                                          "skipped": f"no training slices of {', '.join(missing)}"}
                continue
            progress(f"quality: low-data classifiers, {h} with {len(small)} slices + {gen_arm} images")
            n = max(8 * len(small), 400)
            images, labels = draw(runs[gen_arm]["run"], n, np.ones(len(small.class_names)), cfg.seed + 1)
            study = utility_study(small.images, small.labels, holdout.images, holdout.labels, images, labels,
                                  class_names=small.class_names, seeds=cfg.lowdata_seeds, steps=cfg.lowdata_steps,
                                  ratios=(1.0,), seed=cfg.seed, threads=cfg.threads)
            gains = study["gains"].get("real+synthetic-balanced", {})
            result["studies"][key] = {
                "hospital": h, "generator": gen_arm, "train_slices": len(small),
                "real_balanced_accuracy": study["conditions"]["real"]["balanced_accuracy"]["mean"],
                "over_real": gains.get("over_real", {}).get("balanced_accuracy"),
                "over_control": gains.get("over_control", {}).get("balanced_accuracy"),
                "skipped": study.get("skipped", {}),
            }
    return result


def run_quality(cfg: QualityConfig, work: Path, out: Path, progress) -> tuple[dict[str, Any], list[str]]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    forget_other_config(work, asdict(cfg), progress, "quality", files=("lowdata.npz",))
    progress(f"quality: preparing the brain MRI slices at {cfg.image_size} px")
    data = prepare_brain(work, cfg.image_size, limit=cfg.limit, seed=cfg.seed, reuse_from=work.parent)
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
              "fidelity": fid, "audits": aud, "lowdata": low,
              "seconds_this_invocation": time.perf_counter() - started}  # finished arms reused are not counted
    write(out, "quality", result, markdown(result))  # before the plots: a plotting error loses no figure
    try:
        plots(result, out)
    except Exception as err:  # noqa: BLE001 - report, keep the figures
        progress(f"quality: plots failed ({err}); the figures are in quality.json")
        result["plots_error"] = str(err)
    return result, markdown(result)


def _bars(values: list[dict[str, Any] | None]) -> tuple[list[float], list[list[float]]]:
    """Means and non-negative error-bar lengths (a bootstrap interval need not contain the mean)."""
    mean = [v["mean"] if v else np.nan for v in values]
    lo = [max(0.0, v["mean"] - v["ci_low"]) if v else 0.0 for v in values]
    hi = [max(0.0, v["ci_high"] - v["mean"]) if v else 0.0 for v in values]
    return mean, [lo, hi]


def _num(value: float | None) -> float:
    return np.nan if value is None else value


def plots(result: dict[str, Any], out: Path) -> None:
    """fidelity_arms.png, privacy_utility.png and lowdata_gain.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = result["fidelity"]["arms"]
    names = [a for a in fid if a != "real train (reference)"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(names, [_num(fid[a]["fd_encoder"]) for a in names],
           color=["C0" if a == "federated" else "C7" for a in names])
    ax.axhline(_num(fid["real train (reference)"]["fd_encoder"]), color="C2", ls="--", label="real train slices")
    ax.set_ylabel("FD to the holdout (encoder space)")
    ax.set_yscale("log")
    ax.set_title("Fidelity per arm (lower is better; log scale)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fidelity_arms.png", dpi=110)
    plt.close(fig)

    cfg = result["config"]
    eps_arms = [("inf", "federated"), *((f"{e:g}", f"dp-eps-{e:g}") for e in cfg["epsilons"])]
    labels = [e for e, _ in eps_arms]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].plot(labels, [_num(fid[a]["fd_encoder"]) for _, a in eps_arms], "o-")
    axes[0].set_title("FD to holdout (lower better)")
    mean, err = _bars([result["audits"][a]["gain_over_real"] for _, a in eps_arms])
    axes[1].errorbar(labels, mean, yerr=err, fmt="o-", capsize=4)
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

    studies = {k: v for k, v in result["lowdata"]["studies"].items() if v.get("over_real")}
    fig, ax = plt.subplots(figsize=(8, 3.4))
    keys = list(studies)
    for j, which in enumerate(("over_real", "over_control")):
        mean, err = _bars([studies[k].get(which) for k in keys])
        ax.errorbar(np.arange(len(keys)) + (j - 0.5) * 0.3, mean, yerr=err, fmt="o", capsize=4,
                    label=f"gain {which.replace('_', ' ')}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(keys)), [k.replace("/", "\n") for k in keys], fontsize=8)
    ax.set_ylabel("balanced-accuracy gain")
    ax.set_title(f"Low-data hospitals ({result['lowdata']['fraction']:.0%} of their slices): "
                 "real+synthetic, 95% CI", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lowdata_gain.png", dpi=110)
    plt.close(fig)


def _ci(v: dict[str, Any] | None) -> str:
    if not v:
        return "n/a"
    return f"{v['mean']:+.3f} ({v['ci_low']:+.3f} to {v['ci_high']:+.3f})"


def _f(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    fid = result["fidelity"]
    ref = fid["arms"]["real train (reference)"]["fd_encoder"]
    lines = [f"### Quality arms (brain MRI, {fid['train_size']} train / {fid['holdout_size']} holdout slices, "
             f"{cfg['image_size']} px, {cfg['rounds']} rounds x {cfg['local_steps']} local steps, batch {cfg['batch']})",
             "", "| arm | training (s) | FD encoder (x real reference) | KID encoder | FD pixels | class-matched SSIM "
             "| MS-SSIM (diversity; real ~ reference row) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, row in fid["arms"].items():
        secs = result["training_seconds"].get(arm)
        fd = row["fd_encoder"]
        ratio = f" ({fd / ref:.3g}x)" if fd is not None and ref else ""
        ssim = _f(row["ssim_class_matched"], ".3f") + ("" if row.get("ssim_matched_by_class", True) else " (unmatched)")
        lines.append(f"| {arm} | {'-' if secs is None else f'{secs:.0f}'} | {_f(fd, '.4g')}{ratio} | "
                     f"{_f(row['kid_encoder'], '.3g')} | {_f(row['fd_pixels'], '.1f')} | {ssim} | "
                     f"{_f(row['ms_ssim_diversity'], '.3f')} |")
    lines += ["", "Training seconds are not a speed comparison: `fedsynth simulate` runs federated arms' hospitals "
              "two at a time on one core each, and single-hospital arms on one core."]
    gap_rows = []
    for space, v in fid["gap_closed"].items():
        share = "n/a (pooling is not clearly better than training alone)" if v["share_closed"] is None \
            else f"{v['share_closed']:.0%}"
        gap_rows.append(f"| {space} | {_f(v['local_mean'], '.4g')} | {_f(v['pooled'], '.4g')} | "
                        f"{_f(v['federated'], '.4g')} | {share} |")
    lines += ["", "Share of the local -> pooled FD gap that federation closes (goal >= 80%):", "",
              "| space | hospitals alone (mean FD) | pooled | federated | share closed |",
              "| --- | --- | --- | --- | --- |", *gap_rows, "",
              "### Privacy-utility (fedsynth audit of each federated arm)", "",
              "Gains are real + synthetic (class-balancing) over real alone, and over the control that adds as many "
              "re-drawn real images per class; balanced accuracy, mean over seeds, 95% bootstrap CI. Under DP, "
              "the audit also trains the private baseline: a classifier trained by DP-SGD on the real training "
              "slices at the epsilon the run spent (its balanced accuracy).", "",
              "| arm | epsilon spent | FD encoder | gain over real | gain over control | DP-SGD classifier | "
              "strongest MIA AUC | verdicts |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm, a in result["audits"].items():
        eps = "inf" if a["epsilon"] is None else f"{a['epsilon']:.2f}"
        verdicts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in a["verdicts"].items())
        private = a.get("dp_sgd_classifier")
        private_ba = "-" if private is None else f"{private['mean']:.3f}"
        lines.append(f"| {arm} | {eps} | {_f(fid['arms'][arm]['fd_encoder'], '.4g')} | {_ci(a['gain_over_real'])} | "
                     f"{_ci(a['gain_over_control'])} | {private_ba} | {a['mia_auc_max']:.3f} ({a['mia_worst_attack']}) "
                     f"| {verdicts} |")
    low = result["lowdata"]
    lines += ["", f"### Low-data hospitals ({low['fraction']:.0%} of their training slices, {low['seeds']} seeds, "
              f"scored on the pooled holdout of {low['holdout_size']})", "",
              "The synthetic images come from a federation of these small hospitals only.", "",
              "| hospital / generator | slices | real-only balanced accuracy | gain over real | gain over control |",
              "| --- | --- | --- | --- | --- |"]
    for key, st in low["studies"].items():
        if "real_balanced_accuracy" not in st:
            lines.append(f"| {key} | {st['train_slices']} | - | skipped: {st['skipped']} | - |")
            continue
        lines.append(f"| {key} | {st['train_slices']} | {st['real_balanced_accuracy']:.3f} | {_ci(st['over_real'])} | "
                     f"{_ci(st['over_control'])} |")
    return lines
