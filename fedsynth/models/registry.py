"""The model families by name: the one registry, the one builder of a run's networks.

A family inside fedsynth is a module plus an entry in ``_BUILT_IN``. A family in another
package registers itself with :func:`register_family` when its module is imported; name
that module in the ``FEDSYNTH_FAMILIES`` environment variable (comma-separated modules)
and every fedsynth process, the Flower apps of a simulation included, imports it here.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from torch import nn

from fedsynth.models.cdcgan import CDCGAN
from fedsynth.models.cyclegan import CycleGAN
from fedsynth.models.dpmerf import DPMERF
from fedsynth.models.family import Family, Preset
from fedsynth.models.networks import Networks
from fedsynth.models.pix2pix import Pix2Pix
from fedsynth.models.stylegan import StyleGAN2Lite
from fedsynth.models.vanilla import VanillaGAN
from fedsynth.models.wgan import WGANGP

if TYPE_CHECKING:
    from fedsynth.runs.config import ModelConfig, RunConfig, TrainConfig

__all__ = [
    "FAMILIES",
    "PLUGINS_VARIABLE",
    "build_gan",
    "build_networks",
    "check_dp_discriminator",
    "count_parameters",
    "family_of",
    "get_family",
    "presets",
    "register_family",
]

PLUGINS_VARIABLE = "FEDSYNTH_FAMILIES"
FAMILY_TAG = (
    "fedsynth_family"  # set on the networks build_gan returns: the name of the family that built them
)

_BUILT_IN: tuple[Family, ...] = (
    CDCGAN(),
    VanillaGAN(),
    WGANGP(),
    StyleGAN2Lite(),
    Pix2Pix(),
    CycleGAN(),
    DPMERF(),
)
FAMILIES: dict[str, Family] = {family.name: family for family in _BUILT_IN}


def register_family(family: Family) -> Family:
    """Add a family (or replace one of the same name) and return it.

    Raises
    ------
    ValueError
        A family with a preset's name, or a preset with a family's name.
    """
    clash = {p.name for p in family.presets} & set(FAMILIES)
    if family.name in presets() or clash:
        raise ValueError(f"model family {family.name!r}: its name or a preset's clashes with {sorted(clash)}")
    FAMILIES[family.name] = family
    return family


def _load_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(
                f"{PLUGINS_VARIABLE}: cannot import model family module {module!r} ({err})"
            ) from err


def get_family(name: str) -> Family:
    """The family called ``name``.

    Raises
    ------
    ValueError
        No such family (the message lists them).
    """
    family = FAMILIES.get(name)
    if family is None:
        raise ValueError(f"model.name {name!r}: unknown (choose from {', '.join(FAMILIES)})")
    return family


def presets() -> dict[str, Preset]:
    """Every family's presets by name."""
    return {preset.name: preset for family in FAMILIES.values() for preset in family.presets}


def build_gan(model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
    """Build (generator, discriminator) for a model config: the one builder of networks.

    Raises
    ------
    ValueError
        Unknown family or unsupported image size.
    """
    family = get_family(model.name)
    if image_size not in family.sizes:
        raise ValueError(f"model {model.name!r} does not support {image_size} px (use {family.sizes})")
    gen, disc = family.build(model, image_size=image_size, num_classes=num_classes)
    for network in (gen, disc):
        setattr(network, FAMILY_TAG, family.name)
    return gen, disc


def build_networks(cfg: RunConfig) -> Networks:
    """``build_gan`` for a run's config: its model, image size and classes."""
    return build_gan(cfg.model, image_size=cfg.data.image_size, num_classes=cfg.data.num_classes)


def family_of(network: nn.Module) -> Family | None:
    """The family whose ``build_gan`` built this network (None for one built by hand)."""
    name = network.__dict__.get(FAMILY_TAG)
    return FAMILIES.get(name) if isinstance(name, str) else None


def check_dp_discriminator(disc: nn.Module, train: TrainConfig | None = None) -> None:
    """Refuse, before any training, DP-SGD on a discriminator: its family's reasons
    (``Family.check_dp``), or for a network built by hand its layers'.

    Raises
    ------
    PrivacyError
        Naming the family's reason, or each offending layer or setting.
    """
    family = family_of(disc)
    if family is None:
        from fedsynth.privacy.clipping import check_private_layers

        check_private_layers(disc)
    else:
        family.check_dp(disc, train)


def count_parameters(module: nn.Module) -> int:
    """Trainable and frozen parameters of a network."""
    return sum(p.numel() for p in module.parameters())


_load_plugins()
