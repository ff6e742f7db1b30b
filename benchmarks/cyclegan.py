"""Issue 11: CycleGAN (unpaired A <-> B translation), federated, on toy domains where the
true mapping is known.

    python -m benchmarks.cyclegan --budget 400          # about 25 minutes on 2 CPU cores
    python -m benchmarks.cyclegan --budget 20 --quick   # a minute or two: checks that it runs

Domains: the brain MRI slices (64 px, de-duplicated) as domain A, and the
intensity-inverted slices (255 - x) as domain B. The training slices are split at random
into two halves, one kept as A and the other inverted into B, so no slice appears in both
domains (unpaired, as between two hospitals' scanners). The holdout slices are never
trained on; their true translations are known (x <-> 255 - x), so translation quality is
measured directly: mean absolute error in grey levels, SSIM and PSNR against the truth,
for A -> B and B -> A, and the cycle error A -> B -> A.

Arms, each ``--budget`` seconds of federated training on 2 simulated hospitals:

- **both domains at each hospital** (FedMed-GAN's setting): each hospital holds half of
  the A slices and half of the B slices;
- **one domain per hospital**: hospital ``original`` holds only A, hospital ``inverted``
  only B; each trains the translator into its own domain and the server averages each
  translator over the hospitals that hold its target domain;
- **one domain per hospital, shared PatchGANs** (``federation.aggregate-discriminator``):
  the same, but each domain's PatchGAN is averaged over the hospitals holding that
  domain and sent to all, so the hospital holding only A judges A -> B with D_B (trained
  at the other hospital on real B) and trains both translators. The price: PatchGANs
  trained on real slices leave the hospitals.

Baselines without training: leaving the slice as it is (identity), and histogram
matching (a monotone grey-level map from A's training histogram to B's, the classic
intensity harmonisation; it cannot invert contrast).

Also measured: the cost of one CycleGAN step at 64 px (width 32, batch 64 per domain,
2 threads, nothing else running), in the units of ``benchmarks/train_throughput.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .common import FEDSYNTH, HERE, forget_other_config, machine, machine_line, prepare_brain, progress, run, write

# arm -> (its folder, the partition, extra settings)
ARMS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "both domains at each hospital": ("iid", "iid", ()),
    "one domain per hospital": ("by-site", "by-site", ()),
    "one domain per hospital, shared PatchGANs": ("by-site-shared-d", "by-site",
                                                  ("federation.aggregate-discriminator=true",)),
}
SHORT = {"both domains at each hospital": "both", "one domain per hospital": "one each",
         "one domain per hospital, shared PatchGANs": "shared D"}


@dataclass(frozen=True)
class CycleConfig:
    budget: float = 400.0
    image_size: int = 64
    limit: int = 1500
    width: int = 32
    local_steps: int = 10
    batch: int = 16
    seed: int = 0
    threads: int = 2


QUICK = dict(image_size=32, limit=300, width=8, local_steps=3)


def toy_domains(work: Path, cfg: CycleConfig) -> Path:
    """The brain slices as A and B = other slices inverted (sites ``original`` and
    ``inverted``); the holdout stays A (its inversion is computed when scoring)."""
    from fedsynth.data.sliceset import TRAIN, SliceSet

    out = work / f"toy-domains-{cfg.image_size}px.npz"
    if out.exists():
        return out
    slices = SliceSet.load(prepare_brain(work, cfg.image_size, limit=cfg.limit, seed=cfg.seed))
    rng = np.random.default_rng(cfg.seed)
    inverted = (slices.split == TRAIN) & (rng.random(len(slices)) < 0.5)
    images = np.where(inverted[:, None, None], 255 - slices.images, slices.images).astype(np.uint8)
    site = np.where(inverted, "inverted", "original")
    return replace(slices, images=images, site=site, meta={**slices.meta, "toy_domains": "B = 255 - A"}).save(out)


def train(cfg: CycleConfig, data: Path, work: Path, arm: str) -> dict[str, Any]:
    folder, partition, extra = ARMS[arm]
    out = work / folder
    timing = work / "logs" / f"train-{folder}.seconds"
    status = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
    if not (status.get("state") == "finished" and timing.exists()):
        shutil.rmtree(out, ignore_errors=True)
        progress(f"{arm}: 2 hospitals, {cfg.budget:g} s of training, {cfg.local_steps} steps per round")
        cmd = [FEDSYNTH, "simulate", "--data", str(data), "--hospitals", "2", "--partition", partition,
               "--rounds", "10000", "--local-steps", str(cfg.local_steps), "--out", str(out),
               "--set", "model.name=cyclegan", "--set", f"model.width={cfg.width}",
               "--set", "data.domain-a=original", "--set", "data.domain-b=inverted",
               "--set", f"train.batch-size={cfg.batch}", "--set", f"train.seed={cfg.seed}",
               "--set", f"federation.time-budget={cfg.budget:g}", "--set", "federation.min-hospitals=2",
               "--set", "simulation.parallel-hospitals=2", "--set", "simulation.validation=0"]
        for setting in extra:
            cmd += ["--set", setting]
        seconds = run(cmd, log=work / "logs" / f"train-{folder}.log")
        timing.write_text(f"{seconds}\n")
        status = json.loads((out / "status.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["images-per-second"] for r in rounds for m in r["hospitals"].values() if "images-per-second" in m]
    return {"run": out, "rounds": status.get("rounds"), "local_steps": cfg.local_steps,
            "wall_seconds": float(timing.read_text()),
            "images_per_second_per_hospital": float(np.mean(rates)) if rates else None,
            "cycle_first_last": [float(np.mean([m["l1"] for m in rounds[i]["hospitals"].values()])) for i in (0, -1)],
            "weights_last_round": {h: [m.get("weight-a2b"), m.get("weight-b2a")]
                                   for h, m in rounds[-1]["hospitals"].items()}}


def scores(made: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from fedsynth.audit.paired import psnr, ssim

    return {"mae": float(np.abs(made.astype(np.float64) - truth).mean()), "ssim": float(ssim(made, truth).mean()),
            "psnr": float(psnr(made, truth).mean())}


def histogram_match(x: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """A monotone grey-level map sending ``source``'s histogram onto ``target``'s."""
    q = np.linspace(0, 100, 257)
    src, dst = np.percentile(source, q), np.percentile(target, q)
    return np.interp(x.astype(np.float64), src, dst).round().astype(np.uint8)


def evaluate(cfg: CycleConfig, data: Path, trained: dict[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    from fedsynth.commands.translate import translate_slices
    from fedsynth.runs.rundir import RunDir
    from fedsynth.core.grids import save_grid
    from fedsynth.data.sliceset import SliceSet

    slices = SliceSet.load(data)
    train, holdout = slices.only("train"), slices.only("holdout")
    a = holdout.images
    b = (255 - a).astype(np.uint8)
    holdout_b = replace(holdout, images=b, site=np.full(len(holdout), "inverted"))
    train_a = train.images[train.site == "original"]
    train_b = train.images[train.site == "inverted"]
    rows: dict[str, dict[str, Any]] = {
        "identity (input unchanged)": {"a2b": scores(a, b), "b2a": scores(b, a)},
        "histogram matching": {"a2b": scores(histogram_match(a, train_a, train_b), b),
                               "b2a": scores(histogram_match(b, train_b, train_a), a)},
    }
    made: dict[str, dict[str, np.ndarray]] = {}
    for arm, info in trained.items():
        progress(f"{arm}: translating {len(holdout)} holdout slices each way")
        run_dir = RunDir(info["run"])
        to_b = translate_slices(run_dir, holdout, "a2b")[0].images
        to_a = translate_slices(run_dir, holdout_b, "b2a")[0].images
        back = translate_slices(run_dir, replace(holdout, images=to_b, site=np.full(len(holdout), "inverted")),
                                "b2a")[0].images
        made[arm] = {"a2b": to_b, "b2a": to_a}
        rows[arm] = {"a2b": scores(to_b, b), "b2a": scores(to_a, a), "cycle_a": scores(back, a)}
    n = min(8, len(holdout))
    pick = np.linspace(0, len(holdout) - 1, n).round().astype(int)
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    for direction, source, truth in (("a2b", a, b), ("b2a", b, a)):
        tiles = [source[pick], truth[pick]] + [made[arm][direction][pick] for arm in trained]
        save_grid(np.concatenate(tiles), grids / f"cyclegan-{direction}.png", columns=n,
                  row_names=["input", "truth", *[SHORT[arm] for arm in trained]],
                  title=f"holdout {direction} (never trained on): input, true translation, each arm",
                  scale=max(1, 128 // cfg.image_size))
    return {"train_slices": {"a": len(train_a), "b": len(train_b)}, "holdout_slices": len(holdout), "rows": rows}


def step_cost(cfg: CycleConfig) -> dict[str, float]:
    """Seconds per CycleGAN step at the benchmark's size (width 32, batch 64 per domain),
    median of 2 rounds of 5 steps after a warm-up, on ``cfg.threads`` threads."""
    import torch

    from fedsynth.models.cyclegan import train_round_cycle
    from fedsynth.models.training import BatchSource, make_optimizers
    from fedsynth.runs.config import RunConfig
    from fedsynth.models import build_gan

    torch.set_num_threads(cfg.threads)
    size = 64 if cfg.image_size == 64 else cfg.image_size
    run_cfg = RunConfig.from_overrides({"model.name": "cyclegan", "model.width": 32, "data.image-size": size,
                                        "train.local-steps": 5, "train.batch-size": 64})
    gen, disc = build_gan(run_cfg.model, image_size=size, num_classes=1)
    opt_g, opt_d = make_optimizers(gen, disc, run_cfg.train)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(256, 1, size, size, generator=g) * 2 - 1
    a = BatchSource(x[:128], torch.zeros(128), batch_size=64, generator=g)
    b = BatchSource(x[128:], torch.zeros(128), batch_size=64, generator=g)
    train_round_cycle(gen, disc, opt_g, opt_d, a, b, replace_steps(run_cfg.train, 1), generator=g)  # warm-up
    runs = [train_round_cycle(gen, disc, opt_g, opt_d, a, b, run_cfg.train, generator=g) for _ in range(2)]
    seconds = float(np.median([r.seconds for r in runs]))
    return {"image_size": size, "width": 32, "batch_per_domain": 64, "threads": cfg.threads,
            "seconds_per_step": seconds / 5, "generator_steps_per_second": 5 / seconds,
            "real_images_per_second": 5 * 128 / seconds}


def replace_steps(train_cfg, steps: int):  # type: ignore[no-untyped-def]
    return train_cfg.model_copy(update={"local_steps": steps})


def markdown(result: dict[str, Any]) -> list[str]:
    cfg, ev, tr, cost = result["config"], result["evaluation"], result["training"], result["step_cost"]
    lines = [f"# CycleGAN on toy domains (brain MRI <-> its inversion), {cfg['budget']:g} s of training per arm", "",
             f"Machine: {machine_line(result['machine'])}.",
             f"{cfg['image_size']} px; {ev['train_slices']['a']} training slices kept as A and "
             f"{ev['train_slices']['b']} other ones inverted into B (unpaired); {ev['holdout_slices']} holdout slices "
             "never trained on, scored against their known translation (x <-> 255 - x).", ""]
    for arm, info in tr.items():
        lines.append(f"- {arm}: {info['rounds']} rounds x {info['local_steps']} steps, "
                     f"{info['images_per_second_per_hospital'] or float('nan'):.0f} real images/s per hospital; cycle "
                     f"L1 {info['cycle_first_last'][0]:.3f} in round 1, {info['cycle_first_last'][1]:.3f} in the last; "
                     f"translator weights (a2b, b2a) in the last round {info['weights_last_round']}.")
    lines += ["", "| translation | A -> B MAE (grey levels) | SSIM | PSNR dB | B -> A MAE | SSIM | PSNR dB | "
              "A -> B -> A MAE |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in ev["rows"].items():
        ab, ba = row["a2b"], row["b2a"]
        cyc = f"{row['cycle_a']['mae']:.1f}" if "cycle_a" in row else "-"
        lines.append(f"| {name} | {ab['mae']:.1f} | {ab['ssim']:.3f} | {ab['psnr']:.1f} | {ba['mae']:.1f} | "
                     f"{ba['ssim']:.3f} | {ba['psnr']:.1f} | {cyc} |")
    lines += ["", f"Cost of one CycleGAN step at {cost['image_size']} px (width {cost['width']}, batch "
              f"{cost['batch_per_domain']} per domain, {cost['threads']} threads): {cost['seconds_per_step']:.2f} s; "
              f"{cost['generator_steps_per_second']:.2f} generator steps/s, {cost['real_images_per_second']:.0f} "
              "real images/s into the discriminators.", "",
              f"Total {result['seconds'] / 60:.0f} min for this invocation."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cyclegan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=400.0, help="seconds of federated training per arm")
    parser.add_argument("--quick", action="store_true", help="32 px, 300 slices, narrow networks")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/cyclegan)")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = dict(QUICK) if args.quick else {}
    cfg = CycleConfig(budget=args.budget, **settings)
    out = args.out or HERE / "results" / ("cyclegan-quick" if args.quick else "cyclegan")
    work = out / "work"

    started = time.perf_counter()
    forget_other_config(work, asdict(cfg), progress, "cyclegan")
    progress("cost of one step, alone on the machine")
    cost = step_cost(cfg)
    data = toy_domains(work, cfg)
    trained = {arm: train(cfg, data, work, arm) for arm in ARMS}
    evaluation = evaluate(cfg, data, trained, out)
    for arm, info in trained.items():
        last = sorted((info["run"] / "samples").glob("round-*.png"))[-1]
        shutil.copyfile(last, out / "grids" / f"round-grid-{ARMS[arm][0]}.png")
    result = {"machine": machine(), "config": asdict(cfg), "data": str(data), "step_cost": cost,
              "training": {arm: {k: v for k, v in info.items() if k != "run"} for arm, info in trained.items()},
              "evaluation": evaluation, "seconds": time.perf_counter() - started}
    write(out, "cyclegan", result, markdown(result))
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
