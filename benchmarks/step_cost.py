"""What one training step of the default recipe pays for: DiffAugment, the mode-seeking
term, channels-last memory, and ``torch.compile``.

    python -m benchmarks.step_cost                       # 64 px, 1 thread (a hospital's share of the cores)
    python -m benchmarks.step_cost --threads 2 --size 128
    python -m benchmarks.step_cost --device cuda         # on a GPU

Every variant trains the default cdcgan with fedsynth's own ``train_round`` on the brain
MRI slices (``../shared/data``) or, without them, on the phantom CT slices. The variants
run in one process, alternating and repeated (a rotated order, so no variant always runs
first), and each is reported as its median seconds per step over the default's: these
machines are noisy, ratios measured side by side are what compare. Steps here are
generator steps (one discriminator update each, as the default recipe). Writes
``OUT/step_cost.{json,md}``. Run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .common import BRAIN_MRI, HERE, machine, machine_line, phantom_slices, prepare_brain, progress, spread, write
from fedsynth.data.sliceset import SliceSet
from fedsynth.models import build_gan
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no DiffAugment": {"train.augment": "none"},
    "no mode-seeking term": {"train.diversity-weight": 0},
    "neither": {"train.augment": "none", "train.diversity-weight": 0},
    "channels-last": {"channels_last": True},
    "torch.compile": {"compile": True},
}


def _slices(work: Path, size: int) -> tuple[SliceSet, str]:
    if BRAIN_MRI.is_dir():
        return SliceSet.load(prepare_brain(work, size)).only("train"), f"brain MRI, {size} px"
    return phantom_slices(size, classes="site").only("train"), f"phantom CT (the brain MRI is absent), {size} px"


def _variant(settings: dict[str, Any], slices: SliceSet, size: int, steps: int, batch: int,
             device: torch.device) -> Callable[[], None]:
    opts = {k: v for k, v in settings.items() if "." in k}
    cfg = RunConfig.from_overrides({**opts, "data.image-size": size, "train.local-steps": steps,
                                    "train.batch-size": batch})
    torch.manual_seed(0)
    gen, disc = build_gan(cfg.model, image_size=size, num_classes=len(slices.class_names))
    gen, disc = gen.to(device), disc.to(device)
    if settings.get("channels_last"):
        gen, disc = gen.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    if settings.get("compile"):
        gen, disc = torch.compile(gen), torch.compile(disc)  # type: ignore[assignment]
    images = torch.from_numpy(slices.as_float()).to(device)
    if settings.get("channels_last"):
        images = images.contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    batches = BatchSource(images, torch.from_numpy(slices.labels).to(device), batch_size=batch, generator=g)

    def once() -> None:
        train_round(gen, disc, opt_g, opt_d, batches, cfg.train, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return once


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="the default recipe's batch")
    p.add_argument("--steps", type=int, default=10, help="generator steps per timed repeat")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a hospital's share under the default plan)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--work", type=Path, default=HERE / ".work")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.work.mkdir(parents=True, exist_ok=True)
    slices, described = _slices(args.work, args.size)
    names = ["default", *[v for v in args.variants.split(",") if v != "default"]]
    runs: dict[str, Callable[[], None]] = {}
    for name in names:
        progress(f"step cost: building and warming up '{name}'")
        runs[name] = _variant(VARIANTS[name], slices, args.size, args.steps, args.batch, device)
        start = time.perf_counter()
        runs[name]()  # warm-up (and, for torch.compile, the compilation)
        runs[name]()
        progress(f"step cost: '{name}' warm-up {time.perf_counter() - start:.1f} s")
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["default"])
    result = {"machine": machine(), "data": described, **{k: v for k, v in vars(args).items() if k not in ("out", "work")},
              "seconds_per_step": {n: spread(v) for n, v in times.items()},
              "ratio_to_default": {n: statistics.median(v) / base for n, v in times.items()},
              "pairwise": {n: spread([a / b for a, b in zip(v, times["default"], strict=True)]) for n, v in times.items()}}
    lines = [f"### Step cost of the default recipe ({described}, batch {args.batch}, {args.threads} thread(s), "
             f"{args.device})", "", machine_line(result["machine"]), "",
             "| variant | median s/step | images/s (real, through D) | / default | pairwise range |",
             "| --- | --- | --- | --- | --- |"]
    for n, v in times.items():
        pw = result["pairwise"][n]
        lines.append(f"| {n} | {statistics.median(v):.4f} | {args.batch / statistics.median(v):.0f} | "
                     f"{result['ratio_to_default'][n]:.2f} | {pw['min']:.2f}-{pw['max']:.2f} |")
    suffix = "" if (args.size, args.threads, args.device) == (64, 1, "cpu") else f"-{args.size}px-{args.threads}t-{args.device}"
    write(args.out, f"step_cost{suffix}", result, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
