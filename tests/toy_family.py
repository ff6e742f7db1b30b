"""A toy model family for tests/test_family_contract.py: a one-layer generator against
cdcgan's discriminator, registered the way a family from another package would be (this
module is named in FEDSYNTH_FAMILIES, so Flower's ClientApps and ServerApp import it too)."""

from __future__ import annotations

import torch
from torch import nn

from fedsynth.models.cdcgan import ProjectionDiscriminator
from fedsynth.models.family import Family
from fedsynth.models.networks import GeneratorNet, Networks
from fedsynth.models.registry import register_family


class OneLayerGenerator(GeneratorNet):
    def __init__(self, *, image_size: int, num_classes: int, latent_dim: int) -> None:
        super().__init__()
        self.image_size, self.latent_dim = image_size, latent_dim
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.out = nn.Linear(2 * latent_dim, image_size * image_size)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.out(torch.cat([z, self.embed(labels)], dim=1)).tanh()
        return x.view(-1, 1, self.image_size, self.image_size)


class OneLayer(Family):
    name = "one-layer"
    description = "a one-layer generator against cdcgan's discriminator (a test's toy)"

    def build(self, model, *, image_size, num_classes) -> Networks:  # type: ignore[no-untyped-def]
        return (OneLayerGenerator(image_size=image_size, num_classes=num_classes, latent_dim=model.latent_dim),
                ProjectionDiscriminator(image_size=image_size, num_classes=num_classes, width=model.width))


FAMILY = register_family(OneLayer())
