"""Draw images from a generator, reproducibly; a shape model of masks that reads no patient data."""

from __future__ import annotations

import numpy as np
import torch

from fedsynth.models.networks import GeneratorNet

__all__ = ["generate", "shape_masks", "to_uint8"]


@torch.no_grad()
def generate(
    gen: GeneratorNet,
    labels: np.ndarray | torch.Tensor,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    truncation: float = 1.0,
) -> np.ndarray:
    """Images for the given class labels as a (N, H, W) uint8 array.

    The same seed, labels and weights give the same images, so grids from successive
    rounds show the same noise vectors. For pix2pix, ``labels`` are masks (N, H, W) and
    the seed fixes its dropout noise.
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels_t), gen.latent_dim, generator=rng)
    was_training = gen.training
    gen.eval()
    out = []
    # Noise drawn inside the generator (per-layer noise, pix2pix's dropout) comes from
    # torch's global generator: seed it too, without disturbing the caller's stream.
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        for start in range(0, len(labels_t), batch_size):
            zb = z[start : start + batch_size].to(device)
            yb = labels_t[start : start + batch_size].to(device)
            extra = {"truncation": truncation} if truncation != 1.0 else {}
            out.append(gen(zb, yb, **extra).float().cpu())
    gen.train(was_training)
    images = torch.cat(out) if out else torch.zeros(0, 1, gen.image_size, gen.image_size)
    return to_uint8(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N, 1, H, W) to uint8 (N, H, W)."""
    scaled = (images.clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).squeeze(1).numpy()


def shape_masks(n: int, size: int, values: list[int] | tuple[int, ...], *, seed: int) -> np.ndarray:
    """``n`` label maps (N, size, size) uint8 from a simple shape model that reads no
    patient data: each map holds 1 to 4 of the label values, chosen at random, each an
    ellipse of random centre, semi-axes (8-25% of the side) and angle, later ones drawn
    over earlier ones. For round grids on the server, which holds no masks, and
    ``fedsynth sample --random-masks`` where no masks are at hand."""
    rng = np.random.default_rng(seed)
    values = [int(v) for v in values] or [1]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n):
        chosen = rng.choice(values, size=min(len(values), int(rng.integers(1, 5))), replace=False)
        for value in chosen:
            cy, cx = rng.uniform(0.3, 0.7, size=2)
            ay, ax = rng.uniform(0.08, 0.25, size=2)
            theta = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            out[i][(u / ax) ** 2 + (v / ay) ** 2 <= 1] = value
    return out
