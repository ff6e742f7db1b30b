"""Segmentation utility of synthetic (mask, slice) pairs: does a segmentation model
trained on real pairs get better on new patients when a pix2pix generator's pairs are
added?

A small two-level U-Net segments one label (binary) and is scored by Dice on the
holdout slices. Three training sets, each over several seeds:

- ``real``: the real training pairs;
- ``real+synthetic``: plus one synthetic pair per real one: the training masks moved
  (random left-right flip and a shift of up to 1/8 of the side), and the generator's
  slice for each moved mask;
- ``real+moved-real``: plus the same moves applied to the real pairs themselves. This
  is the control: a gain of ``real+synthetic`` over ``real`` that ``real+moved-real``
  matches comes from the geometric augmentation of the masks, not from the generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsynth.core.progress import Progress
from fedsynth.core.stats import mean_interval

__all__ = ["SegmentationUNet", "dice", "moved", "segmentation_utility", "train_segmenter"]

CONDITIONS = ("real", "real+synthetic", "real+moved-real")


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU())


class SegmentationUNet(nn.Module):
    """Slice (N, 1, H, W) in [-1, 1] to one label's logits (N, 1, H, W); two poolings."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.e1, self.e2, self.e3 = _block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w)
        self.u2, self.u1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.out = nn.Conv2d(w, 1, 1)
        self.pool, self.up = nn.MaxPool2d(2), nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(self.pool(a))
        c = self.e3(self.pool(b))
        b = self.u2(torch.cat([self.up(c), b], dim=1))
        return self.out(self.u1(torch.cat([self.up(b), a], dim=1)))


def _as_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1)[:, None]


def train_segmenter(
    images: np.ndarray, targets: np.ndarray, *, steps: int, seed: int, batch: int = 16
) -> SegmentationUNet:
    """A U-Net trained for ``steps`` steps of ``batch`` pairs (Adam 1e-3, binary cross-entropy)."""
    torch.manual_seed(seed)
    net = SegmentationUNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = _as_input(images), torch.from_numpy(targets.astype(np.float32))[:, None]
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(x), batch))
        loss = F.binary_cross_entropy_with_logits(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


def dice(net: SegmentationUNet, images: np.ndarray, targets: np.ndarray) -> float:
    """Dice of the thresholded prediction over all slices pooled (1.0 when both are empty)."""
    with torch.no_grad():
        pred = np.concatenate(
            [(net(_as_input(images[i : i + 64])) > 0).numpy()[:, 0] for i in range(0, len(images), 64)]
        )
    truth = targets.astype(bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def moved(
    masks: np.ndarray, images: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Each mask (and its slice, if given) flipped left-right with probability 1/2 and
    shifted by up to 1/8 of the side; what moves in is background (label 0, intensity 0)."""
    n, size, _ = masks.shape
    out_m = np.zeros_like(masks)
    out_i = None if images is None else np.zeros_like(images)
    reach = size // 8
    for k in range(n):
        flip = rng.random() < 0.5
        dy, dx = rng.integers(-reach, reach + 1, size=2)
        m = masks[k][:, ::-1] if flip else masks[k]
        out_m[k] = _shift(m, dy, dx)
        if images is not None and out_i is not None:
            out_i[k] = _shift(images[k][:, ::-1] if flip else images[k], dy, dx)
    return out_m, out_i


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _ci(values: list[float]) -> dict[str, Any]:
    return {**mean_interval(values, method="normal"), "values": [float(v) for v in values]}


def segmentation_utility(
    train_images: np.ndarray,
    train_masks: np.ndarray,
    holdout_images: np.ndarray,
    holdout_masks: np.ndarray,
    synthesize: Callable[[np.ndarray, int], np.ndarray],
    *,
    label: int | None = None,
    seeds: int = 3,
    steps: int = 300,
    seed: int = 0,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Dice on the holdout for each training set (see the module), with the mean and a
    95% CI over seeds, and the paired gains over ``real`` and of synthetic over the
    control. ``synthesize(masks, seed)`` returns the generator's slices for masks.
    ``label``: the label to segment (default: the most frequent non-zero label in the
    training masks)."""
    if label is None:
        values, counts = np.unique(train_masks[train_masks > 0], return_counts=True)
        if not len(values):
            return {"skipped": "the training masks hold no label"}
        label = int(values[np.argmax(counts)])
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    scores: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    try:
        for s in range(seeds):
            rng = np.random.default_rng(seed + 1000 + s)
            moved_masks, moved_images = moved(train_masks, train_images, rng)
            assert moved_images is not None
            synthetic = synthesize(moved_masks, seed + 2000 + s)
            sets = {
                "real": (train_images, train_masks),
                "real+synthetic": (
                    np.concatenate([train_images, synthetic]),
                    np.concatenate([train_masks, moved_masks]),
                ),
                "real+moved-real": (
                    np.concatenate([train_images, moved_images]),
                    np.concatenate([train_masks, moved_masks]),
                ),
            }
            for i, (name, (x, m)) in enumerate(sets.items()):
                if progress:
                    progress(
                        s * len(sets) + i,
                        seeds * len(sets),
                        f"segmentation utility: {name}, seed {s + 1}/{seeds}",
                    )
                net = train_segmenter(x, m == label, steps=steps, seed=seed + s)
                scores[name].append(dice(net, holdout_images, holdout_masks == label))
    finally:
        torch.set_num_threads(previous)

    def diff(a: str, b: str) -> dict[str, Any]:
        return _ci([x - y for x, y in zip(scores[a], scores[b], strict=True)])

    return {
        "label": label,
        "seeds": seeds,
        "steps": steps,
        "slices_with_label": {
            "train": int((train_masks == label).any(axis=(1, 2)).sum()),
            "holdout": int((holdout_masks == label).any(axis=(1, 2)).sum()),
        },
        "dice": {name: _ci(v) for name, v in scores.items()},
        "gains": {
            "synthetic over real": diff("real+synthetic", "real"),
            "control over real": diff("real+moved-real", "real"),
            "synthetic over control": diff("real+synthetic", "real+moved-real"),
        },
    }
