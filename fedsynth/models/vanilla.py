"""The vanilla fully-connected GAN of the "TumorGAN" bachelor thesis (Leiden), kept as a named baseline.

Generator: z (100) -> 256 -> 512 -> 1024 -> H*W, ReLU then tanh. Discriminator: H*W ->
512 -> 256 -> 1 with LeakyReLU(0.2). As in the thesis it is unconditional: it learns
one distribution over all classes. (The thesis' final sigmoid is folded into the loss.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedsynth.models.family import NONE, Family
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet, Networks

if TYPE_CHECKING:
    from fedsynth.runs.config import ModelConfig

__all__ = ["VanillaDiscriminator", "VanillaGAN", "VanillaGenerator"]


class VanillaGenerator(GeneratorNet):
    """Fully-connected generator of the TumorGAN thesis (unconditional)."""

    def __init__(self, *, image_size: int, num_classes: int, latent_dim: int = 100) -> None:
        super().__init__()
        self.image_size, self.num_classes, self.latent_dim = image_size, num_classes, latent_dim
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 256),
            nn.ReLU(),
            nn.Linear(256, 512),
            nn.ReLU(),
            nn.Linear(512, 1024),
            nn.ReLU(),
            nn.Linear(1024, image_size * image_size),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z).view(-1, 1, self.image_size, self.image_size)


class VanillaDiscriminator(nn.Module):
    """Fully-connected discriminator of the TumorGAN thesis; returns logits (sigmoid in the loss)."""

    def __init__(self, *, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.image_size, self.num_classes = image_size, num_classes
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(image_size * image_size, 512),
            nn.LeakyReLU(0.2),
            nn.Linear(512, 256),
            nn.LeakyReLU(0.2),
            nn.Linear(256, 1),
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> DiscriminatorOutput:
        return DiscriminatorOutput(self.net(x).squeeze(1))


class VanillaGAN(Family):
    """Seed 001's unconditional fully-connected GAN, kept as a baseline."""

    name = "vanilla-gan"
    description = "the fully-connected GAN of the TumorGAN thesis (unconditional baseline)"
    condition = NONE

    def conditional(self, model: ModelConfig) -> bool:
        return False

    def build(self, model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
        return (
            VanillaGenerator(image_size=image_size, num_classes=num_classes, latent_dim=model.latent_dim),
            VanillaDiscriminator(image_size=image_size, num_classes=num_classes),
        )
