"""Draw images from a generator, reproducibly, and lay them out as labelled grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

__all__ = ["generate", "grid_labels", "save_grid", "to_uint8"]


@torch.no_grad()
def generate(
    gen: nn.Module,
    labels: np.ndarray | torch.Tensor,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    truncation: float = 1.0,
) -> np.ndarray:
    """Images for the given class labels as a (N, H, W) uint8 array.

    The same seed, labels and weights give the same images, so grids from successive
    rounds show the same noise vectors.
    """
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels_t), gen.latent_dim, generator=rng)
    was_training = gen.training
    gen.eval()
    out = []
    for start in range(0, len(labels_t), batch_size):
        zb = z[start : start + batch_size].to(device)
        yb = labels_t[start : start + batch_size].to(device)
        extra = {"truncation": truncation} if truncation != 1.0 else {}
        with torch.no_grad():
            out.append(gen(zb, yb, **extra).float().cpu())
    gen.train(was_training)
    images = torch.cat(out) if out else torch.zeros(0, 1, gen.image_size, gen.image_size)
    return to_uint8(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float (N, 1, H, W) to uint8 (N, H, W)."""
    scaled = (images.clamp(-1, 1) + 1) * 127.5
    return scaled.round().to(torch.uint8).squeeze(1).numpy()


def grid_labels(num_classes: int, per_class: int) -> np.ndarray:
    """Labels for a grid with one row per class."""
    return np.repeat(np.arange(num_classes), per_class)


def save_grid(
    images: np.ndarray,
    path: str | Path,
    *,
    columns: int,
    row_names: list[str] | None = None,
    title: str | None = None,
    scale: int = 2,
) -> Path:
    """Write images (N, H, W) uint8 as a PNG grid, ``columns`` per row, optional row names
    on the left and a title on top, scaled up by ``scale`` (nearest neighbour) so small
    slices are visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    rows = max(1, -(-n // columns))
    pad = 2
    tile = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad), dtype=np.uint8)
    tile[:] = 40
    for i in range(n):
        r, c = divmod(i, columns)
        tile[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = images[i]
    grid = Image.fromarray(tile).resize((tile.shape[1] * scale, tile.shape[0] * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default()
    left = 0
    if row_names:
        left = 8 + max(int(ImageDraw.Draw(grid).textlength(name, font=font)) for name in row_names)
    top = 18 if title else 0
    canvas = Image.new("L", (grid.width + left, grid.height + top), color=20)
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill=235, font=font)
    for r, name in enumerate(row_names or []):
        y = top + (pad + r * (h + pad) + h // 2) * scale - 6
        draw.text((4, y), name, fill=235, font=font)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
