"""Conditional DCGAN: a class-conditioned generator and an Opacus-ready discriminator.

The discriminator is the only network that sees real images, so it is built to be
wrapped by Opacus unchanged: GroupNorm instead of BatchNorm, no in-place activations,
and only layers with per-sample gradient support (Conv2d, GroupNorm, Linear, Embedding).
Its class conditioning is a projection head (Miyato & Koyama, 2018) or an auxiliary
classifier (Odena et al., 2017). The generator never sees real data and keeps BatchNorm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fedsynth.models.family import Family
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet, Networks, dcgan_init, n_up

if TYPE_CHECKING:
    from fedsynth.runs.config import ModelConfig

__all__ = ["CDCGAN", "ConditionalGenerator", "ProjectionDiscriminator"]


class ConditionalGenerator(GeneratorNet):
    """Noise (and a class label) to a 1-channel image in [-1, 1].

    A linear projection to 4x4 feature maps, then blocks that double the side until
    ``image_size``; the label enters as a learned embedding concatenated with the noise.
    ``upsample`` chooses the doubling: ``nearest`` (nearest-neighbour upsampling, then a
    3x3 convolution: no checkerboard, since every output pixel sees the same number of
    inputs) or ``transpose`` (DCGAN's 4x4 stride-2 transposed convolution, whose uneven
    overlap draws the checkerboard texture seen in its samples).
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        latent_dim: int = 64,
        width: int = 32,
        conditional: bool = True,
        upsample: str = "transpose",
    ) -> None:
        super().__init__()
        if upsample not in ("nearest", "transpose"):
            raise ValueError(f"unknown upsampling {upsample!r} (nearest or transpose)")
        self.image_size, self.num_classes = image_size, num_classes
        self.latent_dim, self.conditional = latent_dim, conditional
        ups = n_up(image_size)
        channels = [width * 2**i for i in reversed(range(ups))]  # e.g. 256,128,64,32
        self.embed = nn.Embedding(num_classes, latent_dim) if conditional else None
        in_dim = latent_dim * (2 if conditional else 1)
        self.project = nn.Sequential(
            nn.Linear(in_dim, channels[0] * 16, bias=False),
            nn.Unflatten(1, (channels[0], 4, 4)),
            nn.BatchNorm2d(channels[0]),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []

        def double(c_in: int, c_out: int, *, bias: bool) -> list[nn.Module]:
            if upsample == "transpose":
                return [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=bias)]
            return [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias)]

        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks += [*double(c_in, c_out, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        blocks += [*double(channels[-1], 1, bias=True), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is conditional: pass class labels")
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.blocks(self.project(z))


class ProjectionDiscriminator(nn.Module):
    """Image (and label) to a real/fake logit; Opacus-compatible.

    Strided convolutions halve the side down to 4x4 (GroupNorm after all but the first).
    ``readout`` ``spatial`` keeps every position (DCGAN's final 4x4 convolution, as a
    linear layer), so the layout of the image counts; ``mean`` averages the map over space
    (blind to where features are: a generator fools it by tiling one motif). Then ``head``
    decides how the label enters:
    ``projection`` adds <embed(label), features>; ``ac`` adds a class-logit head;
    ``none`` ignores the label.
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        width: int = 32,
        head: str = "projection",
        readout: str = "spatial",
    ) -> None:
        super().__init__()
        if head not in ("projection", "ac", "none"):
            raise ValueError(f"unknown discriminator head {head!r}")
        if readout not in ("mean", "spatial"):
            raise ValueError(f"unknown discriminator readout {readout!r} (mean or spatial)")
        self.image_size, self.num_classes, self.head, self.readout = image_size, num_classes, head, readout
        n_down = n_up(image_size)
        channels = [width * 2**i for i in range(n_down)]  # e.g. 32,64,128,256
        layers: list[nn.Module] = [nn.Conv2d(1, channels[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.LeakyReLU(0.2),
            ]
        self.features = nn.Sequential(*layers)
        feat = channels[-1] * (16 if readout == "spatial" else 1)
        self.adv = nn.Linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat) if head == "projection" else None
        self.classify = nn.Linear(feat, num_classes) if head == "ac" else None
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> DiscriminatorOutput:
        f = self.features(x)
        h = f.flatten(1) if self.readout == "spatial" else f.mean(dim=(2, 3))
        adv = self.adv(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is conditional: pass class labels")
            adv = adv + (self.embed(labels) * h).sum(dim=1)
        logits = self.classify(h) if self.classify is not None else None
        return DiscriminatorOutput(adv, logits)


class CDCGAN(Family):
    """The default family: conditional DCGAN with a GroupNorm discriminator."""

    name = "cdcgan"
    description = "conditional DCGAN; GroupNorm discriminator with projection or auxiliary-classifier head"

    def build(self, model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
        gen = ConditionalGenerator(
            image_size=image_size,
            num_classes=num_classes,
            latent_dim=model.latent_dim,
            width=model.width,
            conditional=model.conditioning != "none",
            upsample=model.upsample,
        )
        disc = ProjectionDiscriminator(
            image_size=image_size,
            num_classes=num_classes,
            width=model.width,
            head=model.conditioning,
            readout=model.d_readout,
        )
        return gen, disc
