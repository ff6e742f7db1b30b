"""CycleGAN (Zhu et al., ICCV 2017): unpaired translation between two imaging domains.

Two translators, A -> B and B -> A, and two PatchGAN discriminators, one per domain.
Trained with the adversarial loss of each translation, the cycle-consistency L1
(A -> B -> A returns A, and B -> A -> B returns B; ``train.cycle-weight``, 10 as in the
paper) and the identity L1 (a slice already in the target domain passes unchanged;
``train.identity-weight`` x the cycle weight, 0.5 as in the reference code).

Domains are the two values of a slice-set field (``data.domain-field``: the site, e.g.
the folder a CT or an MR volume sat in, or the class), named by ``data.domain-a`` and
``data.domain-b``.

In fedsynth's terms the *generator* is the pair of translators (``a2b``, ``b2a``), which
is what the server averages, and the *discriminator* is the pair of PatchGANs
(``a``, ``b``), which stays at each hospital (FedMed-GAN, Wang et al. 2022, aggregates
the two generators and keeps the discriminators local the same way). How a hospital
holding only one domain takes part, and how each half is weighted, is in
``client.train.train_round_cycle`` and ``server.strategy``.

Differences from the paper, and why:

- The translators are fedsynth's pix2pix U-Net reading the slice instead of a mask,
  without dropout (translation is deterministic), rather than the paper's 9-block
  ResNet; the paper's code offers the U-Net too. GroupNorm, not InstanceNorm, for the
  same reason as pix2pix.
- The adversarial loss is the logistic (or hinge) loss rather than least squares, and
  there is no history buffer of generated images: each step judges the current fakes.

Not under DP-SGD: the cycle and identity losses read real slices in the *generator's*
update, and the generator leaves the hospital. ``client.dp.check_dp_discriminator``
refuses it.
"""

from __future__ import annotations

import torch
from torch import nn

from .dcgan import DiscriminatorOutput
from .pix2pix import PatchDiscriminator, UNetGenerator

__all__ = ["DIRECTIONS", "CycleDiscriminator", "CycleGenerator"]

DIRECTIONS = ("a2b", "b2a")


class CycleGenerator(nn.Module):
    """The two translators. ``gen(None, x, "a2b")`` (or ``gen.a2b(None, x)``) maps
    (N, 1, H, W) slices of domain A in [-1, 1] to domain B."""

    cycle = True  # translates between domains; draws nothing from noise
    paired = False
    conditional = False
    latent_dim = 0

    def __init__(self, *, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.a2b = UNetGenerator(image_size=image_size, width=width, mask_channels=0, dropout=0.0)
        self.b2a = UNetGenerator(image_size=image_size, width=width, mask_channels=0, dropout=0.0)

    def forward(self, z: torch.Tensor | None, x: torch.Tensor, direction: str = "a2b") -> torch.Tensor:
        del z
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: use a2b or b2a")
        return getattr(self, direction)(None, x)


class CycleDiscriminator(nn.Module):
    """One PatchGAN per domain: ``disc(x, "a")`` judges whether slices look like domain A."""

    cycle = True
    paired = False

    def __init__(self, *, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.a = PatchDiscriminator(image_size=image_size, width=width, mask_channels=0)
        self.b = PatchDiscriminator(image_size=image_size, width=width, mask_channels=0)

    def forward(self, x: torch.Tensor, domain: str) -> DiscriminatorOutput:
        if domain not in ("a", "b"):
            raise ValueError(f"domain {domain!r}: use a or b")
        return getattr(self, domain)(x, None)
