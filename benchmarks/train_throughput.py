"""Local training throughput of the default model: images per second per hospital.

Runs fedsynth's own training round (``client.train.train_round``) on real brain MRI
slices when ../shared/data is present (else on phantom slices) at the given sizes and
thread counts, repeats each setting, and writes the medians and spread to
``benchmarks/results/train_throughput.{json,md}`` with the machine it ran on.

    python benchmarks/train_throughput.py                 # 32 and 64 px, 1 and 2 threads
    python benchmarks/train_throughput.py --sizes 64 --steps 40 --repeats 5
    python benchmarks/train_throughput.py --families all --sizes 64 --threads 2   # every family -> family_throughput.*
    python benchmarks/train_throughput.py --families all --sizes 128 256 --device cuda   # on a GPU (bfloat16 autocast)

Images per second count the real slices the discriminator takes in (for WGAN-GP, every
critic step's batch); generator steps per second are given beside them. pix2pix trains on
the same slices paired with masks from the shape model (the cost depends on the shapes,
not on what the masks show).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import platform
import statistics
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/train_throughput.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BRAIN_MRI, phantom_slices
from fedsynth import __version__
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig
from fedsynth.data.ingest import ingest_image_folder
from fedsynth.models import FAMILIES, MASK, build_gan, presets
from fedsynth.models.sampling import shape_masks

HERE = Path(__file__).resolve().parent


def load_slices(size: int):  # type: ignore[no-untyped-def]
    if BRAIN_MRI.exists():
        slices, _ = ingest_image_folder(BRAIN_MRI, size=size)
        return slices.only("train"), f"brain MRI ({BRAIN_MRI})"
    return phantom_slices(size).only("train"), "phantom CT"


def measure(slices, size: int, threads: int, steps: int, batch: int, repeats: int,  # type: ignore[no-untyped-def]
            family: str = "cdcgan", device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    cfg = RunConfig.from_overrides({"data.image-size": size, "train.local-steps": steps, "train.batch-size": batch,
                                    "train.device": device, "model.name": family})
    torch.manual_seed(0)
    gen, disc = build_gan(cfg.model, image_size=size, num_classes=len(slices.class_names))
    dev = torch.device(device)
    gen.to(dev)
    disc.to(dev)
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    rng = torch.Generator().manual_seed(0)
    condition = torch.from_numpy(slices.labels)
    if cfg.model.family.condition == MASK:  # pix2pix: a mask per slice
        condition = torch.from_numpy(shape_masks(len(slices), size, [1, 2], seed=0).astype("int64"))
    batches = BatchSource(torch.from_numpy(slices.as_float()).to(dev), condition.to(dev),
                          batch_size=batch, generator=rng)
    warm = cfg.train.model_copy(update={"local_steps": 2})
    train_round(gen, disc, opt_g, opt_d, batches, warm, generator=rng)
    stats = [train_round(gen, disc, opt_g, opt_d, batches, cfg.train, generator=rng) for _ in range(repeats)]
    rates = [s.images_per_second for s in stats]
    return {"family": family, "size": size, "threads": threads, "batch": batch, "steps": steps, "repeats": repeats,
            "device": device, "critic_steps_per_step": cfg.train.critic_steps_per_step,
            "images_per_second_median": statistics.median(rates), "images_per_second_min": min(rates),
            "images_per_second_max": max(rates),
            "generator_steps_per_second": statistics.median(steps / s.seconds for s in stats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--families", nargs="+", default=["cdcgan"],
                        help="model families (or presets) to measure; 'all': every family and medscangan")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    families = [*FAMILIES, *presets()] if args.families == ["all"] else args.families
    rows, data = [], ""
    for size in args.sizes:
        slices, data = load_slices(size)
        for family in families:
            for threads in args.threads:
                row = measure(slices, size, threads, args.steps, args.batch, args.repeats, family, args.device)
                print(f"{family}, {size} px, {threads} thread(s): {row['images_per_second_median']:.0f} img/s "
                      f"(min {row['images_per_second_min']:.0f}, max {row['images_per_second_max']:.0f}), "
                      f"{row['generator_steps_per_second']:.2f} G steps/s")
                rows.append(row)
    machine = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "python": platform.python_version(), "torch": torch.__version__, "fedsynth": __version__}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "train_throughput" if families == ["cdcgan"] else "family_throughput"
    result = {"benchmark": name, "device": args.device, "data": data, "machine": machine, "rows": rows}
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Local training throughput ({', '.join(families)}; width 32, batch {args.batch}, {args.device})", "",
             f"Machine: {machine['cpus']} CPUs, GPU {machine['gpu']}, torch {machine['torch']}. Data: {data}. "
             "Images/s: real slices the discriminator takes in per second (all critic steps).", "",
             "| family | size | threads | img/s (median) | min | max | generator steps/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['family']} | {r['size']} | {r['threads']} | {r['images_per_second_median']:.0f} | "
              f"{r['images_per_second_min']:.0f} | {r['images_per_second_max']:.0f} | "
              f"{r['generator_steps_per_second']:.2f} |" for r in rows]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / (name + '.json')} and .md")


if __name__ == "__main__":
    main()
