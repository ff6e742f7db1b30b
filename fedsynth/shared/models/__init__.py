"""GAN families by name: what each is, and how to build its generator and discriminator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import ModelConfig
from .dcgan import ConditionalGenerator, DiscriminatorOutput, ProjectionDiscriminator
from .vanilla import VanillaDiscriminator, VanillaGenerator

__all__ = [
    "MODEL_FAMILIES",
    "DiscriminatorOutput",
    "ModelFamily",
    "build_gan",
    "count_parameters",
]


@dataclass(frozen=True)
class ModelFamily:
    """A named GAN family."""

    name: str
    description: str
    sizes: tuple[int, ...]
    conditional: bool
    build: Callable[[ModelConfig, int, int], tuple[nn.Module, nn.Module]]


def _cdcgan(cfg: ModelConfig, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    conditional = cfg.conditioning != "none"
    gen = ConditionalGenerator(
        image_size=image_size, num_classes=num_classes, latent_dim=cfg.latent_dim,
        width=cfg.width, conditional=conditional,
    )
    disc = ProjectionDiscriminator(
        image_size=image_size, num_classes=num_classes, width=cfg.width, head=cfg.conditioning,
    )
    return gen, disc


def _vanilla(cfg: ModelConfig, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    return (
        VanillaGenerator(image_size=image_size, num_classes=num_classes, latent_dim=cfg.latent_dim),
        VanillaDiscriminator(image_size=image_size, num_classes=num_classes),
    )


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "cdcgan": ModelFamily(
        "cdcgan",
        "conditional DCGAN; GroupNorm discriminator with projection or auxiliary-classifier head",
        (32, 64, 128), True, _cdcgan,
    ),
    "vanilla-gan": ModelFamily(
        "vanilla-gan",
        "seed 001's fully-connected GAN (unconditional baseline)",
        (32, 64, 128), False, _vanilla,
    ),
}


def build_gan(cfg: ModelConfig, *, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Build (generator, discriminator) for a model config.

    Raises
    ------
    ValueError
        Unknown family or unsupported image size.
    """
    family = MODEL_FAMILIES.get(cfg.name)
    if family is None:
        raise ValueError(f"model.name {cfg.name!r}: unknown (choose from {', '.join(MODEL_FAMILIES)})")
    if image_size not in family.sizes:
        raise ValueError(f"model {cfg.name!r} does not support {image_size} px (use {family.sizes})")
    return family.build(cfg, image_size, num_classes)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
