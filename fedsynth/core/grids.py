"""Images laid out as labelled PNG grids: rows of slices, or of masks and their slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["grid_labels", "mask_to_uint8", "paired_grid", "save_grid"]


def mask_to_uint8(masks: np.ndarray) -> np.ndarray:
    """Label maps to grey levels for viewing: background black, each label value present
    its own evenly spaced level (brightest for the largest value)."""
    values = [v for v in np.unique(masks) if v != 0]
    lut = np.zeros(256, dtype=np.uint8)
    for rank, value in enumerate(values, start=1):
        lut[value] = int(round(80 + 175 * rank / len(values)))
    return lut[masks]


def paired_grid(
    masks: np.ndarray,
    images: np.ndarray,
    path: str | Path,
    *,
    columns: int,
    title: str | None = None,
    scale: int = 2,
) -> Path:
    """A grid of (mask, slice) pairs: rows alternate masks and the slices for them."""
    n = len(images)
    tiles: list[np.ndarray] = []
    grey = mask_to_uint8(masks)  # one grey level per label across the whole grid
    for start in range(0, n, columns):
        rows_m = list(grey[start : start + columns])
        rows_i = list(images[start : start + columns])
        pad = [np.zeros_like(images[0])] * (columns - len(rows_i))
        tiles += rows_m + pad + rows_i + pad
    rows = len(tiles) // columns
    names = [("masks" if r % 2 == 0 else "slices") for r in range(rows)]
    return save_grid(np.stack(tiles), path, columns=columns, row_names=names, title=title, scale=scale)


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
        tile[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            images[i]
        )
    grid = Image.fromarray(tile).resize(
        (tile.shape[1] * scale, tile.shape[0] * scale), Image.Resampling.NEAREST
    )
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
