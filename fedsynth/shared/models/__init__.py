"""GAN families by name: what each is, and how to build its generator and discriminator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..config import ModelConfig
from .cyclegan import CycleDiscriminator, CycleGenerator
from .dcgan import ConditionalGenerator, DiscriminatorOutput, ProjectionDiscriminator
from .vanilla import VanillaDiscriminator, VanillaGenerator
from .pix2pix import PatchDiscriminator, UNetGenerator
from .stylegan import StyleDiscriminator, StyleGenerator
from .wgan import ResidualCritic, ResidualGenerator, gradient_penalty

__all__ = [
    "MODEL_FAMILIES",
    "DiscriminatorOutput",
    "ModelFamily",
    "build_gan",
    "count_parameters",
    "gradient_penalty",
]


@dataclass(frozen=True)
class ModelFamily:
    """A named GAN family."""

    name: str
    description: str
    sizes: tuple[int, ...]
    condition: str  # what the generator reads: "class", "none", "mask" or "domain" (a slice to translate)
    build: Callable[[ModelConfig, int, int], tuple[nn.Module, nn.Module]]
    dp: str  # what DP-SGD on the discriminator supports, in a phrase


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


def _wgan(cfg: ModelConfig, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    conditional = cfg.conditioning != "none"
    gen = ResidualGenerator(
        image_size=image_size, num_classes=num_classes, latent_dim=cfg.latent_dim, width=cfg.width,
        conditional=conditional, residual=cfg.residual,
    )
    critic = ResidualCritic(
        image_size=image_size, num_classes=num_classes, width=cfg.width, head=cfg.conditioning,
        residual=cfg.residual, spectral_norm=cfg.spectral_norm,
    )
    return gen, critic


def _stylegan(cfg: ModelConfig, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    conditional = cfg.conditioning != "none"
    gen = StyleGenerator(image_size=image_size, num_classes=num_classes, latent_dim=cfg.latent_dim,
                         width=cfg.width, conditional=conditional, mapping_layers=cfg.mapping_layers)
    disc = StyleDiscriminator(image_size=image_size, num_classes=num_classes, width=cfg.width,
                              head=cfg.conditioning, mbstd_group=cfg.mbstd_group)
    return gen, disc


def _pix2pix(cfg: ModelConfig, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    del num_classes  # conditioned on a mask, not a class
    return (UNetGenerator(image_size=image_size, width=cfg.width),
            PatchDiscriminator(image_size=image_size, width=cfg.width))


def _cyclegan(cfg: ModelConfig, image_size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    del num_classes  # translates slices; no class input
    return (CycleGenerator(image_size=image_size, width=cfg.width),
            CycleDiscriminator(image_size=image_size, width=cfg.width))


MODEL_FAMILIES: dict[str, ModelFamily] = {
    "cdcgan": ModelFamily(
        "cdcgan",
        "conditional DCGAN; GroupNorm discriminator with projection or auxiliary-classifier head",
        (32, 64, 128, 256), "class", _cdcgan, "yes",
    ),
    "vanilla-gan": ModelFamily(
        "vanilla-gan",
        "seed 001's fully-connected GAN (unconditional baseline)",
        (32, 64, 128, 256), "none", _vanilla, "yes",
    ),
    "wgan-gp": ModelFamily(
        "wgan-gp",
        "seed 003's family: residual generator (upsample+conv) and residual critic with spectral norm, "
        "Wasserstein loss + gradient penalty, n-critic steps; preset medscangan",
        (32, 64, 128, 256), "class", _wgan,
        "without spectral norm (penalty on generated images)",
    ),
    "stylegan2-lite": ModelFamily(
        "stylegan2-lite",
        "StyleGAN2-style: mapping network with class input, modulated/demodulated convs, per-layer noise, "
        "style mixing, EMA of G, truncation; residual D with minibatch std, lazy R1",
        (32, 64, 128, 256), "class", _stylegan,
        "without minibatch std and R1 (model.mbstd-group=0, train.r1-gamma=0)",
    ),
    "pix2pix": ModelFamily(
        "pix2pix",
        "mask -> slice (seed 000): U-Net generator with dropout as noise, PatchGAN discriminator, "
        "adversarial + L1 loss; needs slices prepared with --keep-masks",
        (32, 64, 128, 256), "mask", _pix2pix,
        "no (the L1 loss reads real slices in the generator's update)",
    ),
    "cyclegan": ModelFamily(
        "cyclegan",
        "unpaired translation between two domains (data.domain-a/-b, e.g. CT and MR): two U-Net translators, "
        "two PatchGANs, adversarial + cycle + identity losses; `fedsynth translate` applies it",
        (32, 64, 128, 256), "domain", _cyclegan,
        "no (the cycle and identity losses read real slices in the generator's update)",
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
