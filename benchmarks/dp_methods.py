"""DP methods at the same epsilon: DP-SGD on the discriminator against a one-shot DP-MERF release.

    python -m benchmarks.dp_methods --budget 150          # about 40 minutes on 2 CPU cores
    python -m benchmarks.dp_methods --budget 30 --quick   # minutes: checks that it runs
    python -m benchmarks.dp_methods --epsilons 10 --n-critic 1,5 --no-merf   # DP-SGD schedules only

On three data sets at 64 px (the de-duplicated brain MRI, one unit per slice; the phantom
CT hospitals' liver slices classed by lesion, one unit per patient; the phantoms' whole
abdomen classed by scanner, per patient), three non-IID hospitals (Dirichlet 0.5 over
classes), each arm trained by ``fedsynth simulate`` for about ``--budget`` seconds:

- ``no-dp``: the default recipe (cdcgan), ``federation.time-budget`` = budget;
- ``dp-sgd eps E``: the same under DP-SGD for epsilon E per unit, planned for the rounds
  ``no-dp`` completed (so the budget is spent, not left over);
- ``dp-sgd eps E n-critic K`` (``--n-critic``): the DP-SGD schedule of Bie et al. (TMLR
  2023), K discriminator steps per generator step; every schedule keeps the round's 50
  charged discriminator steps, so all are charged alike and only the generator's share changes;
- ``dp-merf eps E`` and ``dp-merf no-dp``: one release per hospital, the server's fit given
  as many steps as fit the budget (``model.merf-fit-steps``, from a timed probe).

Every arm's last generator draws ``n_synthetic`` images in the training class mix, scored
against the holdout in the penultimate features of a classifier trained on the real
training slices (the audit's classifier space; its holdout balanced accuracy is
recorded) and in pixel PCA: FD, KID, precision and recall (k = 5). The real training
slices give the real-vs-real floor.

Downstream, with the audit's small CNN (``classifier_steps`` steps, ``downstream_seeds``
seeds), balanced accuracy on the holdout of a classifier trained on each arm's images
alone (the classification accuracy score, CAS), on as many real training slices (the
reference CAS is read against), and, at each epsilon, by DP-SGD on all the real training
slices (Dockhorn et al., TMLR 2023: the private release that DP images must approach).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.runs.rundir import RunDir

from .common import FEDSYNTH, HERE, machine, machine_line, phantom_slices, prepare_brain, progress, run, write


@dataclass(frozen=True)
class DPMethodsConfig:
    budget: float = 150.0
    epsilons: tuple[float, ...] = (10.0, 1.0)
    size: int = 64
    n_synthetic: int = 1000
    classifier_steps: int = 480
    limit: int | None = None  # slices per data set (None: all)
    datasets: tuple[str, ...] = ("brain-mri", "phantom-lesion", "phantom-scanner")
    seed: int = 0
    threads: int = 2
    # DP-SGD arms: discriminator steps per generator step. Each keeps the round's 50
    # discriminator steps (local-steps 50 / k generator steps), so every schedule is charged
    # the same steps at the same noise; only how many generator steps they feed changes.
    n_critic: tuple[int, ...] = (1,)
    merf: bool = True
    downstream_seeds: int = 3  # classifiers per arm for the classification accuracy score


LOCAL_STEPS = 50  # train.local-steps' default: the no-dp arm's generator steps per round

QUICK = {"size": 32, "n_synthetic": 200, "classifier_steps": 60, "limit": 600, "epsilons": (10.0,),
         "datasets": ("brain-mri", "phantom-lesion")}


def prepare(name: str, cfg: DPMethodsConfig, work: Path) -> Path:
    path = work / f"{name}-{cfg.size}px.npz"
    if path.exists():
        return path
    if name == "brain-mri":
        shutil.copyfile(prepare_brain(work, cfg.size, limit=cfg.limit), path)
        return path
    slices = phantom_slices(cfg.size, classes="lesion" if name == "phantom-lesion" else "site")
    if cfg.limit is not None and len(slices) > cfg.limit:
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(slices), size=cfg.limit, replace=False))
        slices = slices.subset(pick)
    return slices.save(path)


def simulate(data: Path, out: Path, settings: dict[str, Any], *, rounds: int = 200) -> float:
    """Train one arm; an arm that finished before (its ``.seconds`` file beside it, the same
    settings) is reused, so an interrupted benchmark picks up where it stopped."""
    stamp = out.parent / f"{out.name}.seconds"
    key = json.dumps({"data": str(data), "settings": settings, "rounds": rounds}, sort_keys=True)
    if stamp.exists() and RunDir(out).status().get("state") == "finished":
        saved = json.loads(stamp.read_text())
        if saved["key"] == key:
            return float(saved["seconds"])
    cmd = [FEDSYNTH, "simulate", "--data", str(data), "--hospitals", "3", "--partition", "dirichlet:0.5",
           "--rounds", str(rounds), "--out", str(out)]
    for name, value in settings.items():
        cmd += ["--set", f"{name}={value}"]
    if out.exists():
        shutil.rmtree(out)
    seconds = run(cmd, log=out.parent / f"{out.name}.log")
    stamp.write_text(json.dumps({"key": key, "seconds": seconds}))
    return seconds


def fit_steps_for(budget: float, cfg: DPMethodsConfig, data: Path, work: Path) -> int:
    """Server fit steps that take about ``budget`` seconds with the hospitals' release: a
    probe of 20 steps gives the rate (the release and Flower's start are in both)."""
    done = work / "merf-no-dp"
    if (work / "merf-no-dp.seconds").exists() and (done / "config.yaml").exists():
        return RunDir(done).load_config().model.merf_fit_steps  # measured when that arm was trained
    probe, steps = work / "probe", 20
    seconds = simulate(data, probe, {"model.name": "dp-merf", "model.merf-fit-steps": steps, "train.seed": cfg.seed},
                       rounds=1)
    fit = json.loads((probe / "rounds.jsonl").read_text().splitlines()[-1])["fit"]
    overhead = seconds - fit["fit-seconds"]
    return max(20, int((budget - overhead) / (fit["fit-seconds"] / steps)))


def train_arms(cfg: DPMethodsConfig, data: Path, work: Path) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    base = {"train.seed": cfg.seed}
    progress(f"{data.stem}: no-dp (cdcgan, {cfg.budget:g} s)")
    seconds = simulate(data, work / "no-dp", {**base, "federation.time-budget": cfg.budget})
    rounds = RunDir(work / "no-dp").last_round() or 1
    runs["no-dp"] = {"run": work / "no-dp", "seconds": seconds, "rounds": rounds}
    merf: dict[str, Any] = {}
    if cfg.merf:
        steps = fit_steps_for(cfg.budget, cfg, data, work)
        merf = {**base, "model.name": "dp-merf", "model.merf-fit-steps": steps}
        progress(f"{data.stem}: dp-merf no-dp ({steps} fit steps)")
        runs["dp-merf no-dp"] = {"run": work / "merf-no-dp", "rounds": 1,
                                 "seconds": simulate(data, work / "merf-no-dp", merf, rounds=1)}
    for eps in cfg.epsilons:
        for k in cfg.n_critic:
            arm, folder = f"dp-sgd eps {eps:g}", f"dp-sgd-eps-{eps:g}"
            dp = {**base, "dp.target-epsilon": eps}
            if k != 1:
                arm, folder = f"{arm} n-critic {k}", f"{folder}-n-critic-{k}"
                dp.update({"train.n-critic": k, "train.local-steps": LOCAL_STEPS // k})
            progress(f"{data.stem}: {arm} ({rounds} rounds, as no-dp)")
            runs[arm] = {"run": work / folder, "rounds": rounds, "epsilon": eps,
                         "seconds": simulate(data, work / folder, dp, rounds=rounds)}
        if not cfg.merf:
            continue
        progress(f"{data.stem}: dp-merf eps {eps:g}")
        out = work / f"merf-eps-{eps:g}"
        runs[f"dp-merf eps {eps:g}"] = {"run": out, "rounds": 1, "epsilon": eps,
                                        "seconds": simulate(data, out, {**merf, "dp.target-epsilon": eps}, rounds=1)}
    return runs


def measure(cfg: DPMethodsConfig, data: Path, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from fedsynth.data.sliceset import SliceSet
    from fedsynth.metrics.features import ClassifierSpace, PixelSpace
    from fedsynth.metrics.fidelity import frechet_distance, kernel_inception_distance, precision_recall_density_coverage

    from .quality import draw

    slices = SliceSet.load(data)
    train, holdout = slices.only("train"), slices.only("holdout")
    proportions = np.bincount(train.labels, minlength=len(train.class_names)).astype(float)
    classifier = ClassifierSpace(steps=cfg.classifier_steps, seed=cfg.seed, threads=cfg.threads).fit(
        train.images, train.labels, len(train.class_names), check=(holdout.images, holdout.labels))
    spaces = {"classifier": classifier, "pixels": PixelSpace(components=64, seed=cfg.seed).fit(train.images)}
    hold = {k: s.transform(holdout.images) for k, s in spaces.items()}

    def row(images: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, space in spaces.items():
            f = space.transform(images)
            try:
                out[f"fd_{name}"] = frechet_distance(f, hold[name])
            except ValueError:
                out[f"fd_{name}"] = None
            out[f"kid_{name}"] = kernel_inception_distance(f, hold[name], subset_size=min(1000, len(f), len(hold[name])),
                                                           seed=cfg.seed)["mean"]
        pr = precision_recall_density_coverage(hold["classifier"], spaces["classifier"].transform(images), k=5)
        out.update({k: pr[k] for k in ("precision", "recall")})
        return out

    rng = np.random.default_rng(cfg.seed)
    real = train.subset(rng.choice(len(train), size=min(cfg.n_synthetic, len(train)), replace=False))
    arms: dict[str, Any] = {"real train (floor)": {**row(real.images),
                                                   "cas": cas(cfg, real.images, real.labels, holdout)}}
    for arm, info in runs.items():
        images, labels = draw(info["run"], cfg.n_synthetic, proportions, cfg.seed)
        arms[arm] = {**row(images), **{k: v for k, v in info.items() if k != "run"}}
        if labels is not None:
            arms[arm]["cas"] = cas(cfg, images, labels, holdout)
        privacy = info["run"] / "privacy.jsonl"
        if privacy.exists():
            rows = [json.loads(line) for line in privacy.read_text().splitlines()]
            arms[arm]["epsilon_spent"] = max(r["epsilon_rdp"] for r in rows)
            arms[arm]["privacy_unit"] = rows[0]["privacy_unit"]
    private = {f"{eps:g}": private_classifier(cfg, train, holdout, eps) for eps in cfg.epsilons}
    return {"classifier": classifier.describe(), "train": len(train), "holdout": len(holdout),
            "classes": list(train.class_names), "arms": arms, "dp_sgd_classifier": private}


def _balanced_accuracy(net: Any, holdout: Any) -> float:
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from fedsynth.metrics.classifier import predict_proba

    probs = predict_proba(net, torch.from_numpy(holdout.images)[:, None], torch.device("cpu"))
    return float(balanced_accuracy_score(holdout.labels, probs.argmax(axis=1)))


def cas(cfg: DPMethodsConfig, images: np.ndarray, labels: np.ndarray, holdout: Any) -> dict[str, Any]:
    """Balanced accuracy on the holdout of the audit's CNN trained on ``images`` alone:
    mean and per seed."""
    import torch

    from fedsynth.metrics.classifier import train_classifier

    torch.set_num_threads(cfg.threads)
    scores = []
    for s in range(cfg.downstream_seeds):
        net, _, _ = train_classifier(torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)),
                                     model="cnn", n_classes=int(holdout.labels.max()) + 1, steps=cfg.classifier_steps,
                                     batch_size=64, init_seed=cfg.seed + s, order_seed=cfg.seed + s,
                                     device=torch.device("cpu"))
        scores.append(_balanced_accuracy(net, holdout))
    return {"mean": float(np.mean(scores)), "per_seed": scores}


def private_classifier(cfg: DPMethodsConfig, train: Any, holdout: Any, epsilon: float) -> dict[str, Any]:
    """The audit's CNN trained by DP-SGD on all the real training slices at ``epsilon`` per
    privacy unit (the slice set's: patient or slice), as many steps as the CAS classifiers."""
    import torch

    from fedsynth.privacy.accounting import plan_privacy
    from fedsynth.privacy.classifier import train_private_classifier
    from fedsynth.runs.config import DPConfig

    torch.set_num_threads(cfg.threads)
    unit = train.privacy_unit
    units = train.patient_ids.astype(str) if unit == "patient" else np.arange(len(train)).astype(str)
    plan = plan_privacy(DPConfig(target_epsilon=epsilon), units=len(np.unique(units)), unit=unit, batch_size=64,
                        planned_steps=cfg.classifier_steps)
    scores, spent = [], 0.0
    for s in range(cfg.downstream_seeds):
        net, _, _, spent = train_private_classifier(
            torch.from_numpy(train.images)[:, None], torch.from_numpy(train.labels.astype(np.int64)), units, plan,
            n_classes=int(train.labels.max()) + 1, init_seed=cfg.seed + s,
            device=torch.device("cpu"), generator=torch.Generator().manual_seed(cfg.seed + s))
        scores.append(_balanced_accuracy(net, holdout))
    return {"mean": float(np.mean(scores)), "per_seed": scores, "epsilon_spent": spent, "unit": unit,
            "noise_multiplier": plan.noise_multiplier}


def grids(runs: dict[str, dict[str, Any]], out: Path, name: str) -> None:
    folder = out / "grids" / "dp_methods"
    folder.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))["run"]
    shutil.copyfile(first / "samples" / "real.png", folder / f"{name}-real.png")
    for arm, info in runs.items():
        last = sorted((info["run"] / "samples").glob("round-*.png"))[-1]
        shutil.copyfile(last, folder / f"{name}-{arm.replace(' ', '-')}.png")


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    title = ("DP methods at the same epsilon: DP-SGD against a one-shot DP-MERF release" if cfg.get("merf", True)
             else "DP-SGD at the same epsilon: discriminator schedules, and the private baseline")
    lines = [f"### {title}", "",
             f"`{result['command']}` on {machine_line(result['machine'])}; {cfg['size']} px, 3 hospitals "
             f"(Dirichlet 0.5), about {cfg['budget']:g} s per arm; {cfg['n_synthetic']} images per arm against the "
             "holdout. FD and KID (x1000) in the classifier's features (trained on the real train split) and in "
             "pixel PCA; precision and recall (k = 5) in the classifier's features.", ""]
    for name, data in result["datasets"].items():
        acc = data["classifier"].get("holdout_balanced_accuracy")
        lines += [f"**{name}** ({data['train']} train / {data['holdout']} holdout slices, classes "
                  f"{', '.join(data['classes'])}, so chance is {1 / len(data['classes']):.2f}; the classifier's "
                  f"holdout balanced accuracy {_f(acc, '.2f')})", "",
                  "| arm | epsilon spent (unit) | rounds | seconds | FD classifier | KID classifier | FD pixels | "
                  "precision | recall | CAS |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for arm, r in data["arms"].items():
            eps = f"{r['epsilon_spent']:.2f} ({r['privacy_unit']})" if "epsilon_spent" in r else "-"
            kid = None if r["kid_classifier"] is None else 1000 * r["kid_classifier"]
            lines.append(f"| {arm} | {eps} | {r.get('rounds', '-')} | {_f(r.get('seconds'), '.0f')} | "
                         f"{_f(r['fd_classifier'], '.3g')} | {_f(kid, '.3g')} | {_f(r['fd_pixels'], '.4g')} | "
                         f"{_f(r['precision'], '.2f')} | {_f(r['recall'], '.2f')} | "
                         f"{_f((r.get('cas') or {}).get('mean'), '.3f')} |")
        for eps, p in (data.get("dp_sgd_classifier") or {}).items():
            lines.append(f"| DP-SGD classifier on the real slices, eps {eps} | {p['epsilon_spent']:.2f} ({p['unit']}) "
                         f"| - | - | - | - | - | - | - | {p['mean']:.3f} |")
        lines += ["", "CAS: balanced accuracy on the holdout of a classifier trained on the arm's images alone "
                  f"({cfg.get('downstream_seeds', 3)} seeds); the real-train row trains on as many real slices; the "
                  "DP-SGD rows train on all the real training slices at that epsilon: the private release a DP "
                  "generator's images must approach.", ""]
        lines += ["", f"Grids: `grids/dp_methods/{name}-*.png` (fixed noise, not picked).", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dp_methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds of training per arm (default 150)")
    parser.add_argument("--quick", action="store_true", help="32 px, 600 slices, two data sets, epsilon 10 only")
    parser.add_argument("--datasets", help="comma-separated subset of brain-mri, phantom-lesion, phantom-scanner")
    parser.add_argument("--epsilons", help="comma-separated epsilons of the DP arms (default 10,1)")
    parser.add_argument("--n-critic", help="comma-separated discriminator steps per generator step for the DP-SGD "
                        "arms, each with the same 50 charged discriminator steps per round (default 1)")
    parser.add_argument("--no-merf", action="store_true", help="leave out the dp-merf arms")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/full)")
    parser.add_argument("--work", type=Path, help="training runs and logs (default OUT/work/dp_methods)")
    args = parser.parse_args(argv)
    # everything the measurements import, imported now: the arms take long, and a fedsynth
    # edited meanwhile must not be mixed with the one already loaded
    import fedsynth.metrics.classifier  # noqa: F401
    import fedsynth.metrics.features  # noqa: F401
    import fedsynth.metrics.fidelity  # noqa: F401
    import fedsynth.privacy.classifier  # noqa: F401
    import fedsynth.server.bookkeeping  # noqa: F401
    from . import quality  # noqa: F401

    settings: dict[str, Any] = dict(QUICK) if args.quick else {}
    settings["budget"] = args.budget
    if args.datasets:
        settings["datasets"] = tuple(args.datasets.split(","))
    if args.epsilons:
        settings["epsilons"] = tuple(float(e) for e in args.epsilons.split(","))
    if args.n_critic:
        settings["n_critic"] = tuple(int(k) for k in args.n_critic.split(","))
        uneven = [k for k in settings["n_critic"] if k < 1 or LOCAL_STEPS % k]
        if uneven:
            parser.error(f"--n-critic {uneven}: each must divide {LOCAL_STEPS} (the round's charged steps)")
    settings["merf"] = not args.no_merf
    cfg = DPMethodsConfig(**settings)
    out = args.out or HERE / "results" / ("quick" if args.quick else "full")
    work = args.work or out / "work" / "dp_methods"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"config": asdict(cfg), "machine": machine(), "datasets": {},
                              "command": "python -m benchmarks.dp_methods " + " ".join(sys.argv[1:] if argv is None else argv)}
    for name in cfg.datasets:
        progress(f"{name}: preparing {cfg.size} px slices")
        data = prepare(name, cfg, work)
        runs = train_arms(cfg, data, work / name)
        progress(f"{name}: measuring {len(runs)} arms")
        result["datasets"][name] = measure(cfg, data, runs)
        grids(runs, out, name)
        result["seconds"] = round(time.perf_counter() - started, 1)
        write(out, "dp_methods", result, markdown(result))  # after every data set: nothing measured is lost
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
