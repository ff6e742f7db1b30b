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

A transformation applied to every image can leak into the generator when it cannot be
undone: a discriminator that only ever sees slices with a black square cut out cannot
tell a generated slice with a black hole of its own from a real one (Karras et al.,
ADA, NeurIPS 2020, find that applying it to each image with a probability well below 1,
about 0.8 or less for most transformations, keeps it from leaking: the discriminator then
also sees real slices without it). ``cutout:0.5`` in a policy applies cutout to each
image with probability 0.5; a name alone means probability 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["POLICIES", "diff_augment", "diff_augment_paired", "parse_policy"]

POLICIES = ("color", "translation", "cutout")  # the transformations, by name (train.augment)


def parse_policy(policy: str) -> list[tuple[str, float]]:
    """(name, probability) for each transformation of a policy such as
    ``translation,cutout:0.5``; [] for "" or "none".

    Raises
    ------
    ValueError
        An unknown name, or a probability that is not a number in (0, 1].
    """
    if policy in ("", "none"):
        return []
    parsed = []
    for item in policy.split(","):
        name, colon, p = item.partition(":")
        if name not in POLICIES:
            raise ValueError(f"unknown augmentation {name!r} (choose from {', '.join(POLICIES)}, or none)")
        try:
            probability = float(p) if colon else 1.0
        except ValueError:
            probability = float("nan")
        if not 0 < probability <= 1:
            raise ValueError(f"augmentation {item!r}: the probability after ':' must be a number in (0, 1]")
        parsed.append((name, probability))
    return parsed


def diff_augment(x: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """``x`` (N, 1, H, W) with the policy's transformations drawn per image.

    ``policy``: comma-separated names from :data:`POLICIES`, each optionally with the
    probability of applying it to an image (``cutout:0.5``), or "" / "none" for none.
    Random draws come from ``generator`` (a CPU generator; values move to ``x``'s device).
    """
    for name, probability in parse_policy(policy):
        moved = _TRANSFORMS[name](x, generator)
        if probability < 1:
            moved = torch.where(_uniform(len(x), generator, x.device) < probability, moved, x)
        x = moved
    return x


def diff_augment_paired(
    x: torch.Tensor, masks: torch.Tensor, policy: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (N, 1, H, W) and its label maps (N, H, W) through the same draws of the
    geometric transformations (translation, cutout), so each slice stays aligned with its
    mask (pix2pix's discriminator judges the pair); colour jitter touches ``x`` only.
    Pixels moved in from outside or cut out become background (label 0) in the mask."""
    m = masks[:, None].to(x.dtype)
    for name, probability in parse_policy(policy):  # in the policy's order, as diff_augment
        item = name if probability == 1 else f"{name}:{probability}"
        if name == "color":
            x = diff_augment(x, item, generator)
        else:
            stacked = diff_augment(torch.cat([x, m], dim=1), item, generator)
            x, m = stacked[:, :1], stacked[:, 1:]
    return x, m[:, 0].round().clamp(min=0).long()


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


_TRANSFORMS = {"color": _color, "translation": _translation, "cutout": _cutout}
