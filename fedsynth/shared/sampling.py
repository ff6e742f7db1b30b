"""Draw images from a generator, reproducibly, and lay them out as labelled grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

__all__ = [
    "generate", "grid_labels", "mask_to_uint8", "paired_grid", "save_grid", "shape_masks", "to_uint8", "translate",
    "translate_grid",
]


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


@torch.no_grad()
def translate(gen: nn.Module, images: np.ndarray, direction: str, *, device: torch.device | str = "cpu",
              batch_size: int = 128) -> np.ndarray:
    """CycleGAN: uint8 slices (N, H, W) of one domain to the other (``a2b`` or ``b2a``),
    as uint8 (N, H, W). Deterministic: the translators have no noise."""
    was_training = gen.training
    gen.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].astype(np.float32) / 127.5 - 1.0)[:, None]
        out.append(gen(None, x.to(device), direction).float().cpu())
    gen.train(was_training)
    if not out:
        return np.zeros((0, *images.shape[1:]), dtype=np.uint8)
    return to_uint8(torch.cat(out))


def translate_grid(gen: nn.Module, cfg: object, path: str | Path, *, title: str) -> Path | None:
    """CycleGAN's round grid: up to ``output.grid-per-class`` slices of each domain from
    the preview set (``output.preview``), each row followed by its translation. None
    when the preview set holds no slice of either domain."""
    from .domains import domains_of
    from .sliceset import SliceSet

    preview = SliceSet.load(cfg.output.preview)  # type: ignore[attr-defined]
    data, columns = cfg.data, cfg.output.grid_per_class  # type: ignore[attr-defined]
    domains = domains_of(preview, data, path=cfg.output.preview)  # type: ignore[attr-defined]
    rows, names = [], []
    for source, target, name in (("a", "b", data.domain_a), ("b", "a", data.domain_b)):
        index = np.flatnonzero(domains == source)
        if not len(index):
            continue
        pick = index[np.linspace(0, len(index) - 1, min(columns, len(index))).round().astype(int)]
        images = preview.images[pick]
        moved = translate(gen, images, f"{source}2{target}")
        pad = np.zeros((columns - len(pick), *images.shape[1:]), dtype=np.uint8)
        rows += [np.concatenate([images, pad]), np.concatenate([moved, pad])]
        names += [f"{source.upper()}: {name}", f"{source.upper()} -> {target.upper()}"]
    if not rows:
        return None
    return save_grid(np.concatenate(rows), path, columns=columns, row_names=names, title=title,
                     scale=max(1, 128 // preview.image_size))


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


def mask_to_uint8(masks: np.ndarray) -> np.ndarray:
    """Label maps to grey levels for viewing: background black, each label value present
    its own evenly spaced level (brightest for the largest value)."""
    values = [v for v in np.unique(masks) if v != 0]
    lut = np.zeros(256, dtype=np.uint8)
    for rank, value in enumerate(values, start=1):
        lut[value] = int(round(80 + 175 * rank / len(values)))
    return lut[masks]


def paired_grid(masks: np.ndarray, images: np.ndarray, path: str | Path, *, columns: int, title: str | None = None,
                scale: int = 2) -> Path:
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
