"""Differentiable augmentation for the discriminator (DiffAugment, Zhao et al. 2020).

With a few hundred slices per hospital the discriminator memorises the real set within
a few hundred steps and its gradient stops telling the generator anything useful.
DiffAugment applies the same family of random, differentiable transformations to every
image the discriminator sees, real and generated alike, in its own update and in the
generator's, so the generator is never pushed to reproduce the augmentations (they are
applied to both sides) while the discriminator cannot memorise.

The transformations suit single-channel slices in [-1, 1]: brightness and contrast
jitter, a translation by up to 1/8 of the side (zero padding, i.e. the background), and
a cutout of a square half the side. Each is drawn per image, so an augmented real slice
depends on that slice alone: under DP-SGD the augmentation is part of one sample's loss
and is clipped with it (the accounting is unchanged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["POLICIES", "diff_augment", "diff_augment_paired"]

POLICIES = ("color", "translation", "cutout")  # the transformations, by name (train.augment)


def diff_augment(x: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (N, 1, H, W) with the policy's transformations drawn per image.

    ``policy``: comma-separated names from :data:`POLICIES`, or "" / "none" for none.
    Random draws come from ``generator`` (a CPU generator; values move to ``x``'s device).
    """
    if policy in ("", "none"):
        return x
    for name in policy.split(","):
        if name == "color":
            x = _color(x, generator)
        elif name == "translation":
            x = _translation(x, generator)
        elif name == "cutout":
            x = _cutout(x, generator)
        else:
            raise ValueError(f"unknown augmentation {name!r} (choose from {', '.join(POLICIES)})")
    return x


def diff_augment_paired(
    x: torch.Tensor, masks: torch.Tensor, policy: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (N, 1, H, W) and its label maps (N, H, W) through the same draws of the
    geometric transformations (translation, cutout), so each slice stays aligned with its
    mask (pix2pix's discriminator judges the pair); colour jitter touches ``x`` only.
    Pixels moved in from outside or cut out become background (label 0) in the mask."""
    if policy in ("", "none"):
        return x, masks
    names = policy.split(",")
    if "color" in names:
        x = _color(x, generator)
    geometric = ",".join(n for n in names if n != "color")
    if not geometric:
        return x, masks
    stacked = diff_augment(torch.cat([x, masks[:, None].to(x.dtype)], dim=1), geometric, generator)
    return stacked[:, :1], stacked[:, 1].round().clamp(min=0).long()


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, 1, 1, 1, generator=generator).to(device)


def _color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = len(x)
    x = x + (_uniform(n, generator, x.device) - 0.5)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(n, generator, x.device) + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(-sx, sx + 1, (n,), generator=generator).to(x.device)
    # Background is -1 in [-1, 1] slices: pad with it, then gather each image's window.
    padded = F.pad(x, (sx, sx, sy, sy), value=-1.0)
    rows = (torch.arange(h, device=x.device)[None, :] + sy - dy[:, None]).clamp(0, h + 2 * sy - 1)
    cols = (torch.arange(w, device=x.device)[None, :] + sx - dx[:, None]).clamp(0, w + 2 * sx - 1)
    index_rows = rows[:, None, :, None].expand(n, x.shape[1], h, w + 2 * sx)
    out = padded.gather(2, index_rows)
    index_cols = cols[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, index_cols)


def _cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n,), generator=generator).to(x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n,), generator=generator).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy[:, None, None]).abs() <= ch // 2) & ((xs - cx[:, None, None]).abs() <= cw // 2)
    # Cut to the background value (-1), not to 0 (mid-grey in [-1, 1]).
    return torch.where(inside[:, None], torch.full_like(x, -1.0), x)
