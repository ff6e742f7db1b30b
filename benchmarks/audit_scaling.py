"""How the audit scales: n synthetic x n training images at 64 px on this machine (the
figure behind "the audit of 50,000 x 50,000 finishes in under 10 minutes on 2 cores").

At each size: the copy detector's search alone (indexing both sets, then every synthetic
image's nearest training image with its disguise undone), the whole audit without the
utility study (`run_audit(..., utility=False)`: feature spaces, memorization in both
spaces, fidelity, membership inference, figures) and, inside it, the memorization step.

Training, holdout and synthetic images come from disjoint parts of the brain MRI slices in
../shared/data, each grown to its size under light random disguises (so the synthetic
images are new images, not copies of training ones), the versions of one slice one
"patient" (about 40 each at 50,000, like a CT volume's slices); without the folder,
smooth random images stand in. The measurement itself is ``benchmarks.perf.audit_scale`` (also run by
``python -m benchmarks.run``); this script runs it alone and writes
benchmarks/results/audit_scaling.{json,md}.

    python -m benchmarks.audit_scaling [--sizes 50000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from benchmarks import disguises
from benchmarks.common import BRAIN_MRI, HERE, machine, machine_line
from fedsynth.metrics.copies import CopyDetector


def base_images(size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Real slices to grow the sets from, their labels, and what they are."""
    if BRAIN_MRI.exists():
        from fedsynth.data.ingest import ingest_image_folder

        slices, _ = ingest_image_folder(BRAIN_MRI, size=size)
        return slices.images, slices.labels, f"brain MRI slices ({len(slices)}) from {BRAIN_MRI}"
    rng = np.random.default_rng(0)
    noise = gaussian_filter(rng.normal(size=(2000, size, size)), sigma=(0, 3, 3))
    scaled = (noise - noise.min()) / (noise.max() - noise.min()) * 255
    return scaled.astype(np.uint8), rng.integers(0, 2, 2000), "smooth random images (shared data not found)"


def grown(rows: np.ndarray, images: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` of the images at ``rows``, each under a light random disguise, and which
    image each came from (the versions of one image are one "patient")."""
    pick = rows[np.random.default_rng(seed).integers(0, len(rows), n)]
    out = np.empty((n, *images.shape[1:]), dtype=np.uint8)
    for start in range(0, n, 2000):
        chunk = pick[start : start + 2000]
        out[start : start + len(chunk)], _ = disguises.mixed(images[chunk], seed=seed + start)
    return out, pick


def sets(base: np.ndarray, n: int, holdout: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train (n), holdout and synthetic (n) images, each with the base image it came from,
    grown from disjoint parts of ``base`` sized in proportion, so every set has about as
    many versions of each of its base images (train and holdout patients alike)."""
    sizes = {"train": n, "holdout": holdout, "synthetic": n}
    cuts = np.cumsum([round(len(base) * size / sum(sizes.values())) for size in sizes.values()])[:-1]
    parts = np.split(np.random.default_rng(0).permutation(len(base)), cuts)
    return {
        name: grown(rows, base, size, seed)
        for seed, (name, size, rows) in enumerate(zip(sizes, sizes.values(), parts, strict=True), start=1)
    }


def search_times(synthetic: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Seconds for the copy detector: indexing both sets, then every synthetic image to train."""
    detector = CopyDetector()
    t = time.perf_counter()
    synthetic_index, train_index = detector.index(synthetic), detector.index(train)
    indexed = time.perf_counter() - t
    t = time.perf_counter()
    detector.nearest(synthetic_index, train_index)
    return {"index_both_sets_s": indexed, "copy_search_s": time.perf_counter() - t}


def main() -> None:
    from benchmarks.perf import audit_scale

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        result, lines = audit_scale(
            args.sizes, image_size=args.size, threads=args.threads, full_audit_max=max(args.sizes), work=Path(work)
        )
    result["machine"] = machine()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "audit_scaling.json").write_text(json.dumps(result, indent=2))
    (out / "audit_scaling.md").write_text("\n".join([*lines, "", machine_line(result["machine"])]) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
