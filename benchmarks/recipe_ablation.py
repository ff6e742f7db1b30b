"""Issue 25: which ingredients of the cdcgan recipe learn more per second, on three data sets.

    python -m benchmarks.recipe_ablation --budget 100         # about 35 minutes on 2 CPU cores
    python -m benchmarks.recipe_ablation --budget 20 --quick  # a few minutes: checks that it runs

A fast screen before the federated benchmarks (``benchmarks/recipe.py``): every arm trains
ONE central cdcgan in this process, with fedsynth's own training round
(``fedsynth.models.training.train_round``), for the same wall-clock budget on the same
threads, on each of three data sets with a different look:

- ``brain``: the de-duplicated brain MRI slices (4 diagnosis classes; real MR);
- ``phantom-lesion``: the phantom abdominal CT hospitals, liver slices, classes lesion / no
  lesion (synthetic CT);
- ``phantom-site``: every slice of the same phantoms (above, through and below the liver),
  classed by hospital, whose scanners differ in noise, contrast, field of view and blur.

Each arm's generator draws as many images as the holdout in the training class mix, scored
in the audit's classifier feature space (a small CNN trained on the real TRAIN slices
only) against the real holdout: FD and precision/recall (k = 5); real training slices give
the real-vs-real floor. The grids (fixed noise, 8 per class, not picked) go beside the
tables, so the numbers can be checked by eye.

With ``--downstream`` every arm also gets, on each data set:

- the low-data study of the audit (``fedsynth.audit.utility.utility_study``): a small
  hospital's share of train (``--lowdata-fraction`` of each class, whole patients), alone,
  with as many class-balancing synthetic images, with as many re-drawn real ones (the
  control) and with as many real training images it does not contain (the oracle: the
  ceiling of what a generator could transfer); 5 seeds, 95% bootstrap intervals over the
  holdout (whole patients where ids are known);
- the classification accuracy score (CAS): the same classifier trained on as many
  synthetic images alone, beside the one trained on the small real set;
- the audit's copy check: near copies after undoing mirror, rotation, zoom, shift and
  intensity curve, and the share of samples closer to train than to holdout.

The DP arms (``fed-dp-10``, ``fed-dp-1``: the default recipe under DP-SGD, epsilon per slice
on the brain MRI, per patient on the phantoms) are planned for ``--dp-rounds`` rounds, since a
DP plan sets its noise for the steps it will charge, and still stopped by ``--budget``; each
hospital's spending is read from the run's privacy ledger.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import FEDSYNTH, HERE, machine, machine_line, phantom_slices, prepare_brain, progress, run, write
from fedsynth.audit.memorization import (CopySearch, closer_to_train_within_classes, measure_distances, near_copies,
                                         share_distances_within)
from fedsynth.audit.utility import BALANCED, CONTROL, ORACLE, REAL, SYNTHETIC_ONLY, small_set, utility_study
from fedsynth.core.grids import grid_labels, save_grid
from fedsynth.data.sliceset import SliceSet
from fedsynth.metrics.features import ClassifierSpace
from fedsynth.metrics.fidelity import frechet_distance, precision_recall_density_coverage
from fedsynth.core.weights import load_weights
from fedsynth.models import build_gan, build_networks
from fedsynth.models.sampling import generate
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir
from fedsynth.server.bookkeeping import update_average
from fedsynth.synthesis.generator import load_generator

# The central plain conditional DCGAN of issue 12 (benchmarks/recipe.py's REFERENCE).
REFERENCE = {"model.upsample": "transpose", "train.batch-size": 64, "train.loss": "bce", "train.augment": "none",
             "train.diversity-weight": 0}
# fedsynth's default recipe (hinge loss, DiffAugment translation + cutout on half the images,
# mode seeking, batch 32, transposed-convolution generator), and the same with the upsample +
# conv generator.
DEFAULT: dict[str, Any] = {}
NEAREST = {"model.upsample": "nearest"}
ARMS: dict[str, dict[str, Any]] = {
    "reference": REFERENCE,
    "reference+nearest": {**REFERENCE, "model.upsample": "nearest"},
    "fedsynth": DEFAULT,
    "fedsynth+nearest": NEAREST,
    "nearest-no-cutout": {**NEAREST, "train.augment": "translation"},
    "nearest-no-augment": {**NEAREST, "train.augment": "none"},
    "nearest-no-mode-seeking": {**NEAREST, "train.diversity-weight": 0},
    "nearest-batch-64": {**NEAREST, "train.batch-size": 64},
    "lr-x2": {"train.lr-d": 4e-4, "train.lr-g": 4e-4},  # tried after the federation screen (below)
    "lr-x3": {"train.lr-d": 6e-4, "train.lr-g": 6e-4},
    # sqrt(3) x the shipped rates: Adam's square-root rule for the 3x larger effective batch of
    # averaging three hospitals (Malladi et al., NeurIPS 2022)
    "lr-sqrt3": {"train.lr-d": 3.46e-4, "train.lr-g": 3.46e-4},
    # the discriminator reads its last 4x4 map position by position (the default since it was
    # measured: `spatial` is the default recipe, written out), or averaged over positions (`mean`,
    # the default before; the earlier screens' `fedsynth` and `reference` rows had it)
    "spatial": {"model.d-readout": "spatial"},
    "spatial-lr-sqrt3": {"model.d-readout": "spatial", "train.lr-d": 3.46e-4, "train.lr-g": 3.46e-4},
    "mean": {"model.d-readout": "mean"},
    "mean-lr-sqrt3": {"model.d-readout": "mean", "train.lr-d": 3.46e-4, "train.lr-g": 3.46e-4},
    "reference+mean": {**REFERENCE, "model.d-readout": "mean"},
    # cutout on every image (the default before cutout-half was measured) leaks: generated
    # slices grow black squares the discriminator cannot tell from a real slice's cutout; on
    # half the images it does not (ADA). cutout-half is the default now, written out.
    "no-cutout": {"train.augment": "translation"},
    "cutout-half": {"train.augment": "translation,cutout:0.5"},
    "cutout-always": {"train.augment": "translation,cutout"},
}
CENTRAL_ARMS = tuple(a for a in ARMS if not a.startswith(("lr-", "spatial", "mean", "no-cutout", "cutout-"))
                     and a != "reference+mean")  # the default screen
# Candidates for the federation, run only as fed-<arm>: its generator makes about a third of the
# central steps in the same time (each hospital's copy steps once per batch, then they are averaged).
FEDERATED_ONLY: dict[str, dict[str, Any]] = {
    "batch-16": {"train.batch-size": 16},
    "ttur": {"train.lr-d": 4e-4, "train.lr-g": 1e-4},
    "local-steps-150": {"train.local-steps": 150},
    "local-steps-25": {"train.local-steps": 25},  # less drift between averages, more rounds
    "server-lr-2": {"federation.server-lr": 2.0},  # the server doubles the averaged update
    # sampling from the last round's generator itself, not the server's running average over rounds
    "no-average": {"federation.generator-average": 0},
    # the default recipe under DP-SGD on the discriminators, epsilon per privacy unit (a slice on the
    # brain MRI, a patient on the phantoms); planned for --dp-rounds rounds, still stopped by --budget
    "dp-10": {"dp.target-epsilon": 10},
    "dp-1": {"dp.target-epsilon": 1},
}
ARMS.update(FEDERATED_ONLY)
DATASETS = ("brain", "phantom-lesion", "phantom-site")
# the server's running average of the generator, read out of every fed- run at these decays per round
READOUT_DECAYS = (0.5, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class AblationConfig:
    budget: float = 100.0  # seconds of training per arm
    image_size: int = 64
    threads: int = 2
    local_steps: int = 25  # steps between budget checks
    classifier_steps: int = 480
    seed: int = 0
    fed_rounds: int = 0  # >0: fed- arms run this many rounds instead of the time budget (a per-step comparison)
    # DP arms: a DP plan sets its noise for the steps it will charge, so they are planned for this many
    # rounds (about 600 s of DP rounds on 2 cores at 64 px), and stopped by the budget if it runs out first
    dp_rounds: int = 24
    downstream: bool = False  # also the low-data study with its oracle, CAS and the copy check
    lowdata_fraction: float = 0.2
    lowdata_seeds: int = 5
    lowdata_steps: int | None = None  # the audit's default
    arms: tuple[str, ...] = CENTRAL_ARMS
    datasets: tuple[str, ...] = DATASETS


QUICK = dict(image_size=32, classifier_steps=60, arms=("reference", "fedsynth+nearest"), local_steps=5, lowdata_seeds=2,
             lowdata_steps=30)


def prepare(name: str, work: Path, size: int) -> Path:
    if name == "brain":
        return prepare_brain(work, size)
    path = work / f"{name}-{size}px.npz"
    if not path.exists():
        phantom_slices(size, classes=name.removeprefix("phantom-")).save(path)
    return path


def train_arm(cfg: AblationConfig, settings: dict[str, Any], train: SliceSet) -> tuple[torch.nn.Module, dict[str, Any]]:
    run = RunConfig.from_overrides({**settings, "data.image-size": cfg.image_size, "train.local-steps": cfg.local_steps,
                                    "train.seed": cfg.seed})
    torch.manual_seed(cfg.seed)
    gen, disc = build_gan(run.model, image_size=cfg.image_size, num_classes=len(train.class_names))
    opt_g, opt_d = make_optimizers(gen, disc, run.train)
    rng = torch.Generator().manual_seed(cfg.seed)
    images = torch.from_numpy(train.as_float())
    batches = BatchSource(images, torch.from_numpy(train.labels), batch_size=run.train.batch_size, generator=rng)
    start, steps, seen, last = time.perf_counter(), 0, 0, None
    while time.perf_counter() - start < cfg.budget:
        last = train_round(gen, disc, opt_g, opt_d, batches, run.train, generator=rng)
        steps += last.steps
        seen += last.images_seen
    seconds = time.perf_counter() - start
    assert last is not None
    return gen, {"seconds": seconds, "generator_steps": steps, "images_seen": seen, "images_per_second": seen / seconds,
                 "d_loss_last": last.d_loss, "g_loss_last": last.g_loss}


def train_federated(cfg: AblationConfig, settings: dict[str, Any], data: Path, work: Path) -> tuple[torch.nn.Module,
                                                                                                   dict[str, Any]]:
    """``fedsynth simulate``: 3 non-IID hospitals (Dirichlet 0.5 over classes) on Flower's simulation engine,
    stopped after the round in which the budget ran out; its last global generator."""
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    dp = "dp.target-epsilon" in settings
    cmd = [FEDSYNTH, "simulate", "--data", str(data), "--hospitals", "3", "--partition", "dirichlet:0.5",
           "--rounds", str(cfg.fed_rounds or (cfg.dp_rounds if dp else 10000)), "--out", str(run_dir),
           "--set", f"federation.time-budget={0 if cfg.fed_rounds else cfg.budget:g}",
           "--set", f"train.seed={cfg.seed}", "--set", "simulation.validation=0"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    seconds = run(cmd, log=work / "simulate.log")
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]
    loaded = load_generator(RunDir(run_dir))  # what `fedsynth sample` draws from
    per_hospital = [m for r in rounds for m in r.get("hospitals", {}).values()]
    seen = int(sum(m.get("images-seen", 0) for m in per_hospital))
    stats = {"seconds": seconds, "rounds": len(rounds), "images_seen": seen, "images_per_second": seen / seconds,
             "generator_steps": int(sum(m.get("steps", 0) for m in per_hospital))}
    if dp:  # what the ledger says each hospital spent (less than the target if the budget stopped it early)
        ledger = [json.loads(line) for line in (run_dir / "privacy.jsonl").read_text().splitlines() if line.strip()]
        spent = {r["hospital"]: r for r in ledger}  # the last row per hospital is its total
        stats["privacy"] = {h: {k: r.get(k) for k in ("epsilon_rdp", "privacy_unit", "units", "noise_multiplier", "delta")}
                            for h, r in sorted(spent.items())}
    return loaded.gen, stats


def round_readouts(run_dir: Path, draw: np.ndarray, score: Any, seed: int) -> dict[str, dict[str, float]]:
    """The same federated run read out other ways, paired (no training): the last round's
    generator itself, and the server's running average over rounds at each of
    ``READOUT_DECAYS``, recomputed from the run's checkpoints with the server's own update."""
    run = RunDir(run_dir)
    cfg = run.load_config()
    rounds = [r for r in run.checkpoint_rounds() if r > 0]
    # the benchmark's own runs: one invocation, every round checkpointed (the ramp reads round numbers)
    assert rounds == list(range(1, len(rounds) + 1)), f"{run_dir}: rounds {rounds}"
    gens = []
    for r in rounds:
        gen, _ = build_networks(cfg)
        load_weights(gen, run.read_checkpoint(r)[0])
        gens.append(gen)
    out = {"itself": score(generate(gens[-1], draw, seed=seed))}
    for decay in READOUT_DECAYS:
        average = copy.deepcopy(gens[0])
        for r, gen in zip(rounds, gens, strict=True):
            update_average(average, gen, r, decay)
        out[f"average-{decay:g}"] = score(generate(average, draw, seed=seed))
    return out


def measure(space: ClassifierSpace, holdout: np.ndarray, images: np.ndarray) -> dict[str, float]:
    real, fake = space.transform(holdout), space.transform(images)
    prdc = precision_recall_density_coverage(real, fake, k=5)
    return {"fd": frechet_distance(real, fake), "precision": float(prdc["precision"]), "recall": float(prdc["recall"])}


def downstream(cfg: AblationConfig, gen: torch.nn.Module, train: SliceSet, holdout: SliceSet,
               small: np.ndarray) -> dict[str, Any]:
    """The low-data study with its control and oracle, and CAS, for one generator."""
    counts = np.bincount(train.labels[small], minlength=len(train.class_names))
    # as many of each class as the small set's largest class: enough to balance it, and for
    # a synthetic-only set of its size in its class mix
    labels = np.repeat(np.arange(len(counts)), counts.max())
    images = generate(gen, labels, seed=cfg.seed + 2)
    study = utility_study(train.images[small], train.labels[small], holdout.images, holdout.labels, images, labels,
                          class_names=train.class_names, holdout_groups=holdout.patient_ids,
                          unseen_images=train.images[~small], unseen_labels=train.labels[~small],
                          seeds=cfg.lowdata_seeds, steps=cfg.lowdata_steps, ratios=(), seed=cfg.seed, threads=cfg.threads)
    cond, gains = study["conditions"], study["gains"]
    ba = {c: cond[c]["balanced_accuracy"]["mean"] for c in (REAL, CONTROL, BALANCED, ORACLE, SYNTHETIC_ONLY) if c in cond}
    oracle = study.get("oracle", {}).get("balanced_accuracy", {})
    return {"balanced_accuracy": ba, "small_set": int(small.sum()), "skipped": study.get("skipped", {}),
            "gain_over_control": gains.get(BALANCED, {}).get("over_control", {}).get("balanced_accuracy"),
            "oracle_over_control": gains.get(ORACLE, {}).get("over_control", {}).get("balanced_accuracy"),
            "oracle_headroom": oracle.get("headroom"),
            "share_of_oracle": (oracle.get("share_of_oracle") or {}).get(BALANCED),
            "cas_ratio": ba[SYNTHETIC_ONLY] / ba[REAL] if SYNTHETIC_ONLY in ba and ba[REAL] > 0 else None}


def copy_check(cfg: AblationConfig, images: np.ndarray, labels: np.ndarray, train: SliceSet,
               holdout: SliceSet) -> dict[str, Any]:
    """The audit's disguise-aware copy search for samples in the training class mix.

    - Near copies: samples closer to a training slice than 99% of holdout slices are, and
      exact copies, against the whole training set (as the audit does).
    - Closer to train: the share of samples nearer a training slice than any holdout slice,
      measured within each class (train subsampled to the class's holdout patients), then
      pooled over classes with one test (the audit's ``closer_to_train_within_classes``).
      Across classes, a holdout whose class mix differs from train's, as the phantom-site
      set's does, would tilt the share: a class with few holdout patients has its nearest
      slices in train.
    """
    search = CopySearch()
    d = measure_distances("pixels", search, synthetic=images, train=train.images, holdout=holdout.images,
                          seed=cfg.seed, train_patients=train.patient_ids, holdout_patients=holdout.patient_ids)
    copies = near_copies(d)
    skipped: dict[str, Any] = {}
    by_class: dict[str, Any] = {}
    for k, name in enumerate(train.class_names):
        s, t, h = labels == k, train.labels == k, holdout.labels == k
        if s.sum() == 0 or h.sum() < 2 or t.sum() < 2:
            skipped[name] = {"skipped": f"{int(s.sum())} samples, {int(t.sum())} train, {int(h.sum())} holdout slices"}
            continue
        by_class[name] = share_distances_within(d, search, synthetic=s, train=t, holdout=h, seed=cfg.seed)
    pooled: dict[str, Any] = {"closer_to_train": None, "closer_to_train_p": None}
    per_class = dict(skipped)
    if by_class:
        within = closer_to_train_within_classes(by_class)
        per_class |= {name: {"share": c["share"], "p_value": c["p_value"], "n": c["n"]}
                      for name, c in within["by_class"].items()}
        pooled = {"closer_to_train": within["share"], "closer_to_train_p": within["p_value"]}
    return {"near_copies": copies["count"], "near_copy_share": copies["share"],
            "near_copy_null_rate": copies["null_rate"], "near_copy_p": copies["p_value"],
            "exact_copies": copies["exact_copies"], "closer_to_train_by_class": per_class, **pooled}


def run_dataset(cfg: AblationConfig, name: str, work: Path, out: Path) -> dict[str, Any]:
    data = prepare(name, work, cfg.image_size)
    slices = SliceSet.load(data)
    train, holdout = slices.only("train"), slices.only("holdout")
    progress(f"{name}: {len(train)} train / {len(holdout)} holdout slices, classes {', '.join(train.class_names)}")
    space = ClassifierSpace(steps=cfg.classifier_steps, threads=cfg.threads, seed=cfg.seed)
    space.fit(train.images, train.labels, len(train.class_names), check=(holdout.images, holdout.labels))
    rng = np.random.default_rng(cfg.seed)
    real_pick = rng.choice(len(train), size=min(len(train), len(holdout)), replace=False)
    result: dict[str, Any] = {"train": len(train), "holdout": len(holdout), "classes": list(train.class_names),
                              "classifier": space.describe(), "real-train": measure(space, holdout.images,
                                                                                    train.images[real_pick])}
    draw = rng.choice(train.labels, size=len(holdout), replace=True)  # the training class mix
    fixed = grid_labels(len(train.class_names), 8)
    rows = list(train.class_names)
    small = small_set(train.labels, train.patient_ids, cfg.lowdata_fraction, seed=cfg.seed)
    for arm in cfg.arms:
        spent = f"{cfg.fed_rounds} rounds" if cfg.fed_rounds and arm.startswith("fed-") else f"{cfg.budget:g} s"
        progress(f"{name}: {arm}, {spent}")
        if arm.startswith("fed-"):
            gen, stats = train_federated(cfg, ARMS[arm.removeprefix("fed-")], data, work / f"{arm}-{name}")
        else:
            gen, stats = train_arm(cfg, ARMS[arm], train)
        images = generate(gen, draw, seed=cfg.seed + 1)
        result[arm] = {**stats, **measure(space, holdout.images, images)}
        if arm.startswith("fed-"):
            result[arm]["readouts"] = round_readouts(work / f"{arm}-{name}" / "run", draw,
                                                     lambda x: measure(space, holdout.images, x), cfg.seed + 1)
        # the scored samples, for measures added later (git ignores .npz: not in the repository)
        np.savez_compressed(out / "samples" / f"{name}-{arm}.npz", images=images, labels=draw)
        if cfg.downstream:
            progress(f"{name}: {arm}: low-data study ({cfg.lowdata_seeds} seeds), CAS and copy check")
            result[arm]["downstream"] = {**downstream(cfg, gen, train, holdout, small),
                                         **copy_check(cfg, images, draw, train, holdout)}
        save_grid(generate(gen, fixed, seed=12345), out / "grids" / f"{name}-{arm}.png", columns=8, row_names=rows,
                  title=f"{name}: {arm}, {spent}")
        progress(f"{name}: {arm}: FD {result[arm]['fd']:.2f}, precision {result[arm]['precision']:.2f}, "
                 f"recall {result[arm]['recall']:.2f}, {result[arm]['generator_steps']} steps")
    real = train.images[np.concatenate([np.flatnonzero(train.labels == k)[:8] for k in range(len(train.class_names))])]
    if name != "brain":  # the brain MRI's licence forbids redistribution: its slices stay out of the results
        save_grid(real, out / "grids" / f"{name}-real.png", columns=8, row_names=rows, title=f"{name}: real train")
    return result


def markdown(cfg: AblationConfig, result: dict[str, Any]) -> list[str]:
    fed = "; fed-: 3 hospitals through fedsynth simulate, steps summed over them" if any(
        a.startswith("fed-") for a in cfg.arms) else ""
    if fed and cfg.fed_rounds:
        fed += f", {cfg.fed_rounds} rounds each (not the time budget)"
    timed = not cfg.fed_rounds or any(not a.startswith("fed-") for a in cfg.arms)
    budget = f"; {cfg.budget:g} s per {'central ' if cfg.fed_rounds else ''}arm" if timed else ""
    lines = [f"# Recipe ablation: central cdcgan arms{fed}{budget}, {cfg.image_size} px", "",
             machine_line(result["machine"]), "",
             "Classifier-feature FD against the real holdout (lower is better), precision / recall (k = 5).", "",
             "| arm | " + " | ".join(cfg.datasets) + " |", "| --- |" + " --- |" * len(cfg.datasets)]
    for arm in ("real-train", *cfg.arms):
        cells = []
        for d in cfg.datasets:
            r = result["datasets"][d][arm]
            steps = f", {r['generator_steps']} steps" if "generator_steps" in r else ""
            cells.append(f"{r['fd']:.2f} ({r['precision']:.2f} / {r['recall']:.2f}{steps})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    fed_arms = [a for a in cfg.arms if a.startswith("fed-") and all(
        "readouts" in result["datasets"][d][a] for d in cfg.datasets)]
    if fed_arms:
        lines += ["", "The same federated runs read out other ways (paired, no training): the last round's generator "
                  "itself, and the server's running average over rounds at other decays, recomputed from each run's "
                  "checkpoints (the arm's own row above is what `fedsynth sample` draws: its "
                  "`federation.generator-average`). FD (precision / recall).", "",
                  "| arm | readout | " + " | ".join(cfg.datasets) + " |", "| --- | --- |" + " --- |" * len(cfg.datasets)]
        for arm in fed_arms:
            for readout in result["datasets"][cfg.datasets[0]][arm]["readouts"]:
                cells = [result["datasets"][d][arm]["readouts"][readout] for d in cfg.datasets]
                lines.append(f"| {arm} | {readout} | " + " | ".join(
                    f"{c['fd']:.2f} ({c['precision']:.2f} / {c['recall']:.2f})" for c in cells) + " |")
    dp_arms = [a for a in cfg.arms if "privacy" in result["datasets"][cfg.datasets[0]].get(a, {})]
    if dp_arms:
        lines += ["", "What the DP arms spent, from each run's privacy ledger: epsilon per privacy unit at each "
                  "hospital (noise multiplier, units).", "",
                  "| arm | " + " | ".join(cfg.datasets) + " |", "| --- |" + " --- |" * len(cfg.datasets)]
        for arm in dp_arms:
            cells = []
            for d in cfg.datasets:
                spent = result["datasets"][d][arm]["privacy"]
                unit = next(iter(spent.values()))["privacy_unit"]
                cells.append(f"per {unit}: " + ", ".join(
                    f"{r['epsilon_rdp']:.2f} ({r['noise_multiplier']:.2f}, {r['units']})" for r in spent.values()))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if cfg.downstream:
        lines += downstream_markdown(cfg, result)
    return lines


def _ci(g: dict[str, Any] | None) -> str:
    return "-" if not g else f"{g['mean']:+.3f} ({g['ci_low']:+.3f} to {g['ci_high']:+.3f})"


def _share(r: dict[str, Any]) -> str:
    if r.get("closer_to_train") is None:
        return "-"
    return f"{r['closer_to_train']:.2f} (p = {r['closer_to_train_p']:.2g})"


def downstream_markdown(cfg: AblationConfig, result: dict[str, Any]) -> list[str]:
    lines = ["", f"Low-data study: a small hospital's {cfg.lowdata_fraction:.0%} of each class of train (whole patients), "
             f"{cfg.lowdata_seeds} seeds, balanced accuracy on the real holdout; + synthetic and the control (re-drawn "
             "real) and the oracle (unseen real) add the same class-balancing numbers. CAS: the classifier trained on as "
             "many synthetic images alone, as a share of the one trained on the small real set. Copies: the audit's "
             "disguise-aware search on samples in the training class mix (near-copy share against its chance rate; the "
             "share closer to train than to holdout, measured within each class and pooled, 0.5 is honest, with "
             "its one-sided p).", ""]
    for d in cfg.datasets:
        lines += [f"**{d}**", "", "| arm | real | + control | + synthetic | + oracle | gain over control (95% CI) | "
                  "oracle over control (95% CI) | share of oracle | CAS (x real) | near copies (chance) | closer to train (by class) |",
                  "| --- |" + " --- |" * 10]
        for arm in cfg.arms:
            r = result["datasets"][d][arm].get("downstream")
            if not r:
                continue
            ba = r["balanced_accuracy"]

            def f(c: str) -> str:
                return f"{ba[c]:.3f}" if c in ba else "-"

            # a share of an oracle that gained nothing measurable means nothing
            share = "-" if r["share_of_oracle"] is None or not r["oracle_headroom"] else f"{r['share_of_oracle']:.0%}"
            headroom = {True: "", False: " (no headroom)", None: " (skipped)"}[r["oracle_headroom"]]
            cas = "-" if r["cas_ratio"] is None else f"{ba[SYNTHETIC_ONLY]:.3f} ({r['cas_ratio']:.2f})"
            lines.append(f"| {arm} | {f(REAL)} | {f(CONTROL)} | {f(BALANCED)} | {f(ORACLE)} | "
                         f"{_ci(r['gain_over_control'])} | {_ci(r['oracle_over_control'])}{headroom} | {share} | {cas} | "
                         f"{r['near_copy_share']:.1%} ({r['near_copy_null_rate']:.1%}, p = {r['near_copy_p']:.2g}) | "
                         f"{_share(r)} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=100.0, help="seconds of training per arm")
    p.add_argument("--fed-rounds", type=int, default=0,
                   help="fed- arms run this many rounds, not --budget seconds: compares recipes per step, which "
                   "other load on the cores cannot bias (for changes that leave a step's cost alone)")
    p.add_argument("--dp-rounds", type=int, default=24,
                   help="rounds the DP arms (fed-dp-*) plan their noise for and run, unless --budget runs out first")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks that it runs")
    p.add_argument("--arms", default="", help=f"comma-separated arms (default: {', '.join(CENTRAL_ARMS)}; any as fed-ARM, "
                   f"and {', '.join(sorted(FEDERATED_ONLY))} only as fed-ARM)")
    p.add_argument("--datasets", default="", help=f"comma-separated data sets (default: {', '.join(DATASETS)})")
    p.add_argument("--downstream", action="store_true",
                   help="also the low-data study with its control and oracle, CAS and the copy check, per arm")
    p.add_argument("--lowdata-fraction", type=float, default=0.2, help="the small hospital's share of each class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "recipe-ablation")
    p.add_argument("--work", type=Path, default=HERE / ".work")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.arms:
        overrides["arms"] = tuple(args.arms.split(","))
    if args.datasets:
        overrides["datasets"] = tuple(args.datasets.split(","))
    cfg = AblationConfig(budget=args.budget, fed_rounds=args.fed_rounds, dp_rounds=args.dp_rounds, downstream=args.downstream,
                         lowdata_fraction=args.lowdata_fraction, seed=args.seed, **overrides)
    central_only = [a for a in cfg.arms if a in FEDERATED_ONLY]
    if central_only:
        raise SystemExit(f"{', '.join(central_only)}: federated-only arms, run as fed-ARM")
    unknown = [a for a in cfg.arms if a.removeprefix("fed-") not in ARMS] + [d for d in cfg.datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown arm or data set: {', '.join(unknown)}")
    torch.set_num_threads(cfg.threads)
    (args.out / "grids").mkdir(parents=True, exist_ok=True)
    (args.out / "samples").mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"config": asdict(cfg), "machine": machine(), "datasets": {}}
    for name in cfg.datasets:
        result["datasets"][name] = run_dataset(cfg, name, args.work, args.out)
        (args.out / "partial.json").write_text(json.dumps(result, indent=1, default=str))
    write(args.out, "recipe_ablation", result, markdown(cfg, result))


if __name__ == "__main__":
    main()
