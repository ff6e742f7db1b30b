"""Issue 11: pix2pix (mask -> slice), federated across two hospitals on the real CT and
MR volumes with their TotalSegmentator label maps; paired fidelity on a patient never
trained on, and the segmentation utility of its synthetic (mask, slice) pairs.

    python -m benchmarks.pix2pix --budget 300          # about 15 minutes on 2 CPU cores
    python -m benchmarks.pix2pix --budget 30 --quick   # a minute or two: checks that it runs

Data (``../shared/data/ct-volumes``, 64 px, masks kept): three patients with label maps.
``hospital-a`` holds the abdominal CT (30 slices), ``hospital-b`` the MR (20 slices);
the DICOM CT series (20 slices, another patient and scanner) is the holdout, never
trained on. This is all the paired data there is here: the figures are indicative, with
bootstrap CIs over slices, not a clinical validation.

Measured:

- **paired fidelity**: for each holdout mask, SSIM and PSNR of the generated slice
  against the real slice of that mask; and the same over the training masks (the gap is
  what the model reproduces of the patients it trained on). Two baselines that need no
  GAN: the mean training slice (ignores the mask), and a label painter (each pixel the
  mean training intensity of its label value: the mask's information with no texture).
- **segmentation utility** (``fedsynth.audit.segmentation``, as the audit runs it): a
  small U-Net segments the liver (label 5) on the holdout (Dice), trained on the real
  training pairs alone, + as many synthetic pairs (the generator's slices for the
  training masks moved by a random flip and shift), or + the same moves applied to the
  real pairs (the control: does the generator add anything beyond the geometric
  augmentation of its input masks?). Several seeds, mean and 95% CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import FEDSYNTH, HERE, SHARED, forget_other_config, machine, machine_line, progress, run, write

CT_VOLUMES = SHARED / "ct-volumes"
PAIRS = {  # volume (relative to ct-volumes) -> its label map
    "example_ct_sm.nii.gz": "example_seg.nii.gz",
    "example_mr_sm.nii.gz": "example_seg_mr.nii.gz",
    "example_ct_dicom": "example_seg_dicom.nii.gz",
}
HOLDOUT_VOLUME = "example_ct_dicom"
LIVER = 5


@dataclass(frozen=True)
class Pix2pixConfig:
    budget: float = 300.0
    image_size: int = 64
    width: int = 32
    local_steps: int = 20
    batch: int = 16
    seed: int = 0
    seg_seeds: int = 5
    seg_steps: int = 300
    threads: int = 2


QUICK = dict(image_size=32, width=8, local_steps=5, seg_seeds=2, seg_steps=30)


def prepare_ct(work: Path, size: int) -> Path:
    """The three volumes with label maps as one slice set; the DICOM patient is the holdout."""
    from fedsynth.data.sliceset import HOLDOUT, TRAIN, SliceSet

    out = work / f"ct-mr-{size}px.npz"
    if out.exists():
        return out
    if not CT_VOLUMES.exists():
        raise SystemExit(f"the CT volumes are not at {CT_VOLUMES} (set FEDSYNTH_SHARED_DATA to the shared data folder)")
    raw = work / f"ct-mr-{size}px-raw.npz"
    cmd = [FEDSYNTH, "prepare", str(CT_VOLUMES), "--out", str(raw), "--size", str(size), "--keep-masks",
           "--holdout", "0", "--validation", "0"]
    for volume, mask in PAIRS.items():
        cmd += ["--pair", f"{volume}={mask}"]
    run(cmd, log=work / "logs" / "prepare.log")
    slices = SliceSet.load(raw)
    holdout = np.array([HOLDOUT_VOLUME in str(s) for s in slices.source])
    if not holdout.any() or holdout.all():
        raise SystemExit(f"{raw}: expected slices of {HOLDOUT_VOLUME} and of other volumes (see logs/prepare.log)")
    split = np.where(holdout, HOLDOUT, TRAIN)
    from dataclasses import replace

    return replace(slices, split=split).save(out)


def train(cfg: Pix2pixConfig, data: Path, work: Path, progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    out = work / "pix2pix"
    timing = work / "logs" / "train-pix2pix.seconds"
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
    if not (status.get("state") == "finished" and timing.exists()):
        shutil.rmtree(out, ignore_errors=True)
        progress(f"pix2pix: 2 hospitals, {cfg.budget:g} s of training, {cfg.local_steps} steps per round")
        cmd = [FEDSYNTH, "simulate", "--data", str(data), "--hospitals", "2", "--rounds", "10000",
               "--local-steps", str(cfg.local_steps), "--out", str(out),
               "--set", "model.name=pix2pix", "--set", f"model.width={cfg.width}",
               "--set", f"train.batch-size={cfg.batch}", "--set", f"train.seed={cfg.seed}",
               "--set", f"federation.time-budget={cfg.budget:g}", "--set", "federation.min-hospitals=2",
               "--set", "simulation.parallel-hospitals=2", "--set", "simulation.validation=0"]
        seconds = run(cmd, log=work / "logs" / "train-pix2pix.log")
        timing.write_text(f"{seconds}\n")
        status = json.loads((out / "status.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["images-per-second"] for r in rounds for m in r["hospitals"].values() if "images-per-second" in m]
    return {"run": out, "rounds": status.get("rounds"), "local_steps": cfg.local_steps,
            "wall_seconds": float(timing.read_text()),
            "images_per_second_per_hospital": float(np.mean(rates)) if rates else None,
            "l1_first_last": [float(np.mean([m["l1"] for m in rounds[i]["hospitals"].values()])) for i in (0, -1)]}


def evaluate(cfg: Pix2pixConfig, data: Path, trained: dict[str, Any], out: Path, progress) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from fedsynth.audit.paired import paired_fidelity, psnr, ssim
    from fedsynth.audit.segmentation import segmentation_utility
    from fedsynth.synthesis.sample import sample_images
    from fedsynth.runs.rundir import RunDir
    from fedsynth.core.grids import mask_to_uint8, save_grid
    from fedsynth.data.sliceset import SliceSet

    slices = SliceSet.load(data)
    train, holdout = slices.only("train"), slices.only("holdout")
    assert train.masks is not None and holdout.masks is not None
    run_dir = RunDir(trained["run"])
    progress("paired fidelity on the holdout patient and the training patients")
    gen_hold, *_ = sample_images(run_dir, n=len(holdout), label=None, round_="last", seed=cfg.seed,
                                 masks=holdout.masks)
    gen_train, *_ = sample_images(run_dir, n=len(train), label=None, round_="last", seed=cfg.seed + 1,
                                  masks=train.masks)
    paired = paired_fidelity(gen_hold, holdout.images, gen_train, train.images, seed=cfg.seed)
    # Baselines without a GAN.
    mean_slice = np.repeat(train.images.mean(axis=0, keepdims=True).round().astype(np.uint8), len(holdout), axis=0)
    lut = np.full(256, train.images[train.masks == 0].mean() if (train.masks == 0).any() else 0.0)
    for value in np.unique(train.masks):
        lut[value] = train.images[train.masks == value].mean()
    painter = lut[holdout.masks].round().astype(np.uint8)
    baselines = {name: {"ssim": float(ssim(imgs, holdout.images).mean()), "psnr": float(psnr(imgs, holdout.images).mean())}
                 for name, imgs in (("mean training slice", mean_slice), ("label painter", painter))}
    grid_n = min(8, len(holdout))
    pick = np.linspace(0, len(holdout) - 1, grid_n).round().astype(int)
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    tiles = np.concatenate([mask_to_uint8(holdout.masks[pick]), holdout.images[pick], gen_hold[pick], painter[pick]])
    save_grid(tiles, grids / "pix2pix-holdout.png", columns=grid_n,
              row_names=["mask", "real", "pix2pix", "painter"],
              title="holdout patient (never trained on): mask, real slice, pix2pix, label painter",
              scale=max(1, 128 // cfg.image_size))

    progress(f"liver segmentation: real vs + synthetic vs + moved real ({cfg.seg_seeds} seeds x {cfg.seg_steps} steps)")

    def synthesize(masks: np.ndarray, seed: int) -> np.ndarray:
        return sample_images(run_dir, n=len(masks), label=None, round_="last", seed=seed, masks=masks)[0]

    seg = segmentation_utility(train.images, train.masks, holdout.images, holdout.masks, synthesize, label=LIVER,
                               seeds=cfg.seg_seeds, steps=cfg.seg_steps, seed=cfg.seed, threads=cfg.threads)
    return {"train_slices": len(train), "holdout_slices": len(holdout), "paired": paired, "baselines": baselines,
            "segmentation": seg}


def markdown(result: dict[str, Any]) -> list[str]:
    cfg, ev, tr = result["config"], result["evaluation"], result["training"]

    def ci(s: dict[str, Any], digits: int = 3) -> str:
        return f"{s['mean']:.{digits}f} ({s['ci_low']:.{digits}f} to {s['ci_high']:.{digits}f})"

    p, seg = ev["paired"], ev["segmentation"]
    lines = [f"# pix2pix, federated (2 hospitals: CT and MR), {cfg['budget']:g} s of training", "",
             f"Machine: {machine_line(result['machine'])}.",
             f"{cfg['image_size']} px; {ev['train_slices']} training slices (hospital-a the CT, hospital-b the MR), "
             f"{ev['holdout_slices']} holdout slices (the DICOM CT patient, never trained on). "
             f"{tr['rounds']} rounds x {tr['local_steps']} steps; "
             f"{tr['images_per_second_per_hospital'] or float('nan'):.0f} real images/s per hospital; "
             f"L1 (in [-1, 1] units) {tr['l1_first_last'][0]:.3f} in round 1, {tr['l1_first_last'][1]:.3f} in the last.",
             "", "| generated for | SSIM with the real slice of the mask (95% CI) | PSNR dB (95% CI) |",
             "| --- | --- | --- |",
             f"| holdout masks (unseen patient) | {ci(p['holdout']['ssim'])} | {ci(p['holdout']['psnr'], 1)} |",
             f"| training masks | {ci(p['train']['ssim'])} | {ci(p['train']['psnr'], 1)} |"]
    for name, b in ev["baselines"].items():
        lines.append(f"| holdout, baseline: {name} | {b['ssim']:.3f} | {b['psnr']:.1f} |")
    lines += ["", f"SSIM gap, training minus holdout masks: {ci(p['ssim_gap'])}.", "",
              f"Liver segmentation on the holdout (Dice; {cfg['seg_seeds']} seeds x {cfg['seg_steps']} steps; "
              f"liver in {seg['slices_with_label']['train']} training and {seg['slices_with_label']['holdout']} "
              "holdout slices):", "", "| training pairs | Dice (95% CI) |", "| --- | --- |"]
    for name, s in seg["dice"].items():
        lines.append(f"| {name} | {ci(s)} |")
    lines += ["", "| gain | Dice difference (95% CI) |", "| --- | --- |"]
    for name, s in seg["gains"].items():
        lines.append(f"| {name} | {ci(s)} |")
    lines += ["", f"Total {result['seconds'] / 60:.0f} min for this invocation."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pix2pix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of federated training (default 300)")
    parser.add_argument("--quick", action="store_true", help="32 px, narrow networks, fewer seeds and steps")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/pix2pix)")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = dict(QUICK) if args.quick else {}
    cfg = Pix2pixConfig(budget=args.budget, **settings)
    out = args.out or HERE / "results" / ("pix2pix-quick" if args.quick else "pix2pix")
    work = out / "work"

    started = time.perf_counter()
    forget_other_config(work, asdict(cfg), progress, "pix2pix")
    data = prepare_ct(work, cfg.image_size)
    trained = train(cfg, data, work, progress)
    evaluation = evaluate(cfg, data, trained, out, progress)
    result = {"machine": machine(), "config": asdict(cfg), "data": str(data),
              "training": {k: v for k, v in trained.items() if k != "run"}, "evaluation": evaluation,
              "seconds": time.perf_counter() - started}
    shutil.copyfile(trained["run"] / "samples" / "real.png", out / "grids" / "real.png")
    last = sorted((trained["run"] / "samples").glob("round-*.png"))[-1]
    shutil.copyfile(last, out / "grids" / "pix2pix-shape-model.png")
    write(out, "pix2pix", result, markdown(result))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
