"""How the audit's nearest-neighbour search scales: 50,000 synthetic x 50,000 training
images at 64 px on this machine, plain and aligned (the minimum over 1-pixel shifts).

Images are the brain MRI slices from ../shared/data (flipped, shifted and noised to reach
50,000 distinct images each side); without the folder, smooth random images stand in.
Writes benchmarks/results/audit_scaling.{json,md}.

    python benchmarks/audit_scaling.py [--n 50000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

if __package__ in (None, ""):  # run as a script: python benchmarks/audit_scaling.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BRAIN_MRI
from fedsynth.metrics.features import PixelSpace
from fedsynth.audit.memorization import aligned_nearest
from fedsynth.metrics.neighbours import nearest

HERE = Path(__file__).resolve().parent


def base_images(size: int) -> tuple[np.ndarray, str]:
    folder = BRAIN_MRI
    if folder.exists():
        from fedsynth.data.ingest import ingest_image_folder

        slices, _ = ingest_image_folder(folder, size=size)
        return slices.images, f"brain MRI slices ({len(slices)}) from {folder}, augmented"
    rng = np.random.default_rng(0)
    noise = gaussian_filter(rng.normal(size=(2000, size, size)), sigma=(0, 3, 3))
    scaled = (noise - noise.min()) / (noise.max() - noise.min()) * 255
    return scaled.astype(np.uint8), "smooth random images (shared data not found)"


def augmented(images: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pick = images[rng.integers(0, len(images), n)].astype(np.float32)
    flip = rng.random(n) < 0.5
    pick[flip] = pick[flip][:, :, ::-1]
    pick += rng.normal(0, 4, pick.shape).astype(np.float32)
    return np.clip(pick, 0, 255).astype(np.uint8)


def search_times(synthetic: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Seconds for each step of the audit's nearest-neighbour search, synthetic -> train."""
    figures: dict[str, float] = {}
    t = time.perf_counter()
    space = PixelSpace(components=64).fit(train[:10_000])
    figures["pca_fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train_f = space.transform(train)
    synthetic_f = space.transform(synthetic)
    figures["project_both_sets_s"] = time.perf_counter() - t
    t = time.perf_counter()
    nearest(synthetic_f, train_f)
    figures["nearest_neighbour_search_s"] = time.perf_counter() - t
    t = time.perf_counter()
    aligned_nearest(space.transform, synthetic, train_f, align=1)
    figures["aligned_search_9_shifts_s"] = time.perf_counter() - t
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, what = base_images(args.size)
    synthetic, train = augmented(base, args.n, 1), augmented(base, args.n, 2)
    figures = search_times(synthetic, train)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    result = {"n_synthetic": args.n, "n_train": args.n, "image_size": args.size, "dimensions": 64, "images": what,
              "machine": machine, "seconds": {k: round(v, 2) for k, v in figures.items()}}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "audit_scaling.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| {k.removesuffix('_s').replace('_', ' ')} | {v:.1f} s |" for k, v in figures.items())
    (out / "audit_scaling.md").write_text(
        f"# Audit nearest-neighbour search, {args.n:,} x {args.n:,} at {args.size} px\n\n"
        f"Machine: {machine['cores']} cores, {args.threads} threads, torch {machine['torch']}, "
        f"GPU: {machine['gpu'] or 'none'}. Images: {what}. Exact search in 64 PCA dimensions.\n\n"
        f"| step | time |\n| --- | --- |\n{rows}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
