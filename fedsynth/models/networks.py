"""Building blocks the families share: the discriminator's output, sizes, initialisation."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["SUPPORTED_SIZES", "DiscriminatorOutput", "GeneratorNet", "Networks", "dcgan_init", "n_up"]


class GeneratorNet(nn.Module):
    """What every family's generator is: ``gen(z, condition)`` maps ``latent_dim`` noise
    entries per image (0: no noise vector) and the family's condition (class labels, masks,
    or a slice to translate) to 1-channel slices in [-1, 1] of side ``image_size``."""

    latent_dim: int
    image_size: int


# What a family builds: (generator, discriminator).
Networks = tuple[GeneratorNet, nn.Module]


class DiscriminatorOutput(NamedTuple):
    """Real/fake logits, shape (N,), and class logits (N, K) for auxiliary-classifier heads."""

    adv: torch.Tensor
    class_logits: torch.Tensor | None = None


SUPPORTED_SIZES = (32, 64, 128, 256)


def n_up(image_size: int) -> int:
    """Doublings from 4x4 to ``image_size``."""
    if image_size not in SUPPORTED_SIZES:
        raise ValueError(f"image size {image_size} not supported (use {SUPPORTED_SIZES})")
    return int(math.log2(image_size)) - 2


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: weights N(0, 0.02), norms' scales N(1, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            nn.init.zeros_(bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
