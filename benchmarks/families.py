"""Issue 10: the GAN families side by side, federated across three hospitals, each given
the same wall-clock; and a leave-one-hospital-out classifier test.

    python -m benchmarks.families --budget 300          # about 35 minutes on 2 CPU cores
    python -m benchmarks.families --budget 60 --quick   # minutes: checks that it runs

Arms (every one through ``fedsynth simulate``: 3 hospitals, Dirichlet 0.5 over classes,
``--budget`` seconds of training, ``federation.time-budget``), on the de-duplicated brain
MRI slices at 64 px:

- ``vanilla-gan``: seed 001's fully connected GAN (unconditional);
- ``cdcgan``: fedsynth's default (conditional DCGAN with the default recipe);
- ``medscangan``: seed 003's recipe on the wgan-gp family (residual blocks, spectral
  norm, WGAN-GP with lambda 10, 5 critic steps, G 1e-4 / D 4e-4, 256-d latent);
- ``stylegan2-lite``: the StyleGAN2-style generator (EMA sampling, style mixing, lazy R1).

Each arm's final generator is measured as in ``benchmarks.recipe`` (one encoder and one
pixel space fit on all real slices; FD, KID, precision/recall k = 5, memorization) and,
for the conditional families, the low-data utility study (20% of the real training
slices vs + re-drawn real control vs + synthetic). The leave-one-hospital-out test trains
a classifier on two hospitals' real training slices, with and without the federated
cdcgan's class-balanced samples (and with the re-drawn real control), and tests it on
the third hospital's slices (all of them: it never trained on any). The generator did
see the third hospital's slices through federation: that is the point of the test (does
what a hospital contributed reach the others' classifiers?), and it is said so in the
output.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import (HERE, copy_last_grids, forget_other_config, machine, machine_line, prepare_brain, progress,
                     utility_row, write)
from .quality import _ci, _f
from .recipe import Arm, RecipeConfig, evaluate, train
from fedsynth.runs.rundir import RunDir

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
FAMILIES = {
    "vanilla-gan": {"model.name": "vanilla-gan"},
    "cdcgan": {},
    "medscangan": {"model.name": "medscangan"},
    "stylegan2-lite": {"model.name": "stylegan2-lite"},
}
CONDITIONAL = ("cdcgan", "medscangan", "stylegan2-lite")
# Generator steps per round, as a share of the config's: the budget is checked after each
# round, so a round must be short against it. On 2 CPU cores at 64 px a medscangan step
# (5 critic steps with the gradient penalty's double backward through a spectrally
# normalised residual critic) costs about 50 cdcgan steps, a stylegan2-lite step about 13.
STEP_SHARE = {"medscangan": 0.1, "stylegan2-lite": 0.25}


@dataclass(frozen=True)
class FamiliesConfig(RecipeConfig):
    families: tuple[str, ...] = tuple(FAMILIES)
    loho_seeds: int = 3


QUICK = dict(image_size=32, batch=32, federated_steps=5, n_synthetic=200, encoder_steps=100, lowdata_seeds=2,
             lowdata_steps=30, limit=600, loho_seeds=2)


def leave_one_hospital_out(cfg: FamiliesConfig, run_dir: Path, progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from fedsynth.audit.utility import utility_study
    from fedsynth.data.sliceset import SliceSet

    from .quality import draw

    parts = {h: SliceSet.load(RunDir(run_dir).hospitals.slices(h)) for h in HOSPITALS}
    k = len(next(iter(parts.values())).class_names)
    out: dict[str, Any] = {"generator": str(run_dir), "seeds": cfg.loho_seeds, "steps": cfg.lowdata_steps,
                           "note": "the federated generator was trained with the tested hospital's slices too",
                           "tested": {}}
    for i, held in enumerate(HOSPITALS):
        others = [parts[h].only("train") for h in HOSPITALS if h != held]
        images = np.concatenate([p.images for p in others])
        labels = np.concatenate([p.labels for p in others])
        test = parts[held]
        present = np.unique(test.labels)
        if len(present) < k:
            out["tested"][held] = {"skipped": f"{held} lacks a class (it has {len(present)} of {k})"}
            continue
        progress(f"leave-one-hospital-out: train on the others, test on {held} ({len(test)} slices)")
        # as many per class as the two hospitals hold in all: enough to balance any class
        synth, synth_labels = draw(run_dir, k * max(len(images), 100), np.ones(k), cfg.seed + 10 + i)
        study = utility_study(images, labels, test.images, test.labels, synth, synth_labels,
                              class_names=test.class_names, seeds=cfg.loho_seeds, steps=cfg.lowdata_steps,
                              ratios=(1.0,), seed=cfg.seed, threads=cfg.threads)
        out["tested"][held] = {"train_slices": int(len(images)), "test_slices": int(len(test)), **utility_row(study)}
    return out


def run_families(cfg: FamiliesConfig, work: Path, out: Path, progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    forget_other_config(work, asdict(cfg), progress, "families")
    progress(f"families: preparing the brain MRI slices at {cfg.image_size} px")
    data = prepare_brain(work, cfg.image_size, limit=cfg.limit, seed=cfg.seed)
    arms = [Arm(name, data, 3, dict(FAMILIES[name]),
                local_steps=max(1, round(cfg.federated_steps * STEP_SHARE[name])) if name in STEP_SHARE else None)
            for name in cfg.families]
    runs = train(cfg, arms, work, progress)
    fid = evaluate(cfg, data, runs, progress, utility_arms=tuple(a for a in cfg.families if a in CONDITIONAL))
    result: dict[str, Any] = {
        "machine": machine(), "config": asdict(cfg), "data": str(data),
        "training": {a: {k: v for k, v in r.items() if k != "run"} for a, r in runs.items()},
        "fidelity": fid,
    }
    if "cdcgan" in runs:
        result["leave_one_hospital_out"] = leave_one_hospital_out(cfg, runs["cdcgan"]["run"], progress)
    result["throughput"] = {a: _throughput(r["run"]) for a, r in runs.items()}
    result["seconds"] = time.perf_counter() - started
    copy_last_grids(runs, out)
    write(out, "families", result, markdown(result))
    return result


def _throughput(run_dir: Path) -> dict[str, float]:
    """Mean real images per second a hospital's discriminator took in, over all rounds."""
    import json

    rates = [m["images-per-second"] for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()
             for m in json.loads(line).get("hospitals", {}).values() if "images-per-second" in m]
    return {"images_per_second_per_hospital": float(np.mean(rates)) if rates else float("nan")}


def markdown(result: dict[str, Any]) -> list[str]:
    cfg, fid, training = result["config"], result["fidelity"], result["training"]
    lines = [f"# GAN families, federated (3 hospitals, Dirichlet 0.5), {cfg['budget']:g} s of training each", "",
             f"Machine: {machine_line(result['machine'])}.",
             f"Brain MRI, {cfg['image_size']} px: {fid['train_size']} training slices, {fid['holdout_size']} holdout. "
             "Fidelity against the holdout in an encoder trained on all real slices and in 64-component pixel "
             "PCA; the final round's generator.", "",
             "| family | rounds x steps | D images/s per hospital | FD encoder | KID encoder | FD pixels | "
             "precision | recall | closer to train |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in fid["arms"].items():
        t = training.get(name)
        shape = f"{t['rounds']} x {t['local_steps']}" if t else "-"
        rate = result["throughput"].get(name, {}).get("images_per_second_per_hospital") if t else None
        lines.append(f"| {name} | {shape} | {_f(rate, '.0f')} | {_f(row['fd_encoder'], '.1f')} | "
                     f"{_f(row['kid_encoder'], '.2f')} | {_f(row['fd_pixels'], '.1f')} | {row['precision']:.2f} | "
                     f"{row['recall']:.2f} | {_f(row.get('closer_to_train'), '.2f')} |")
    util = fid["utility"]
    lines += ["", f"Low-data utility ({util['train_slices']} real training slices, {util['seeds']} seeds x "
              f"{util['steps']} steps, balanced accuracy on the holdout; vanilla-gan is unconditional, so its "
              "images have no class to train on):", "",
              "| family | real | + re-drawn real (control) | + synthetic | gain over real (95% CI) | "
              "gain over control (95% CI) |", "| --- | --- | --- | --- | --- | --- |"]
    for name, u in util["arms"].items():
        lines.append(f"| {name} | {_f(u['real'], '.3f')} | {_f(u['control'], '.3f')} | {_f(u['synthetic'], '.3f')} | "
                     f"{_ci(u['over_real'])} | {_ci(u['over_control'])} |")
    loho = result.get("leave_one_hospital_out")
    if loho:
        lines += ["", f"Leave one hospital out (classifier on two hospitals' real training slices, tested on all of "
                  f"the third's; {loho['seeds']} seeds; synthetic images from the federated cdcgan, which {loho['note'][4:]}):",
                  "", "| tested at | train / test slices | real | + control | + synthetic | gain over control (95% CI) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for held, row in loho["tested"].items():
            if "skipped" in row:
                lines.append(f"| {held} | - | - | - | - | {row['skipped']} |")
                continue
            lines.append(f"| {held} | {row['train_slices']} / {row['test_slices']} | {_f(row['real'], '.3f')} | "
                         f"{_f(row['control'], '.3f')} | {_f(row['synthetic'], '.3f')} | {_ci(row['over_control'])} |")
    lines += ["", f"Total {result['seconds'] / 60:.0f} min for this invocation."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.families", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600.0, help="seconds of training per family (default 600)")
    parser.add_argument("--quick", action="store_true", help="32 px, 600 slices, fewer seeds")
    parser.add_argument("--families", help=f"comma-separated subset of {', '.join(FAMILIES)}")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/families)")
    parser.add_argument("--work", type=Path, help="training runs and logs (default OUT/work)")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = dict(QUICK) if args.quick else {}
    settings["budget"] = args.budget
    if args.families:
        chosen = tuple(args.families.split(","))
        unknown = set(chosen) - set(FAMILIES)
        if unknown:
            parser.error(f"--families: unknown {', '.join(sorted(unknown))} (choose from {', '.join(FAMILIES)})")
        settings["families"] = chosen
    cfg = FamiliesConfig(**settings, locals_=False, dp=False, ablations=())
    out = args.out or HERE / "results" / ("families-quick" if args.quick else "families")
    work = args.work or out / "work"

    result = run_families(cfg, work, out, progress)
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
