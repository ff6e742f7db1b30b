"""The GAN families: one module each (networks and its ``Family``), the contract they keep
(``family.py``), the registry (``registry.py``) and the training loop they share."""

from fedsynth.models.family import (
    CLASS,
    DOMAIN,
    EMBEDDING,
    MASK,
    NONE,
    WEIGHTS,
    DPSupport,
    Drawn,
    Family,
    Preset,
    PrivateRound,
)
from fedsynth.models.networks import DiscriminatorOutput
from fedsynth.models.registry import (
    FAMILIES,
    build_gan,
    build_networks,
    check_dp_discriminator,
    count_parameters,
    family_of,
    get_family,
    presets,
    register_family,
)
from fedsynth.models.training import gradient_penalty

__all__ = [
    "CLASS",
    "DOMAIN",
    "EMBEDDING",
    "FAMILIES",
    "MASK",
    "NONE",
    "WEIGHTS",
    "DPSupport",
    "DiscriminatorOutput",
    "Drawn",
    "Family",
    "Preset",
    "PrivateRound",
    "build_gan",
    "build_networks",
    "check_dp_discriminator",
    "count_parameters",
    "family_of",
    "get_family",
    "gradient_penalty",
    "presets",
    "register_family",
]
