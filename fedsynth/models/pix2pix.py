"""pix2pix (Isola et al., CVPR 2017): a label map (mask) to a slice.

A U-Net generator with skip connections and dropout as its only noise, and a PatchGAN
discriminator that judges overlapping patches of (mask, slice) pairs. Trained with the
adversarial loss plus lambda * L1 between the generated slice and the real slice of the
same mask (``train.l1-weight``, 100 as in the paper).

Both networks take the mask as a label map (N, H, W) of integer values (the volume's own
label numbers, e.g. TotalSegmentator's 5 = liver), embedded per pixel by a learned
table of 256 rows, so any uint8 label map works without a class list and hospitals
whose masks use different subsets of labels share one generator.

They keep fedsynth's ``gen(z, condition)`` / ``disc(x, condition)`` interface with the
mask as the condition: ``latent_dim`` is 0 (pix2pix's noise is dropout, which stays on
when sampling, as in the paper), and the discriminator's ``adv`` is one logit per patch.

Differences from the paper, and why:

- Upsampling by nearest neighbour + 3x3 convolution instead of transposed convolutions
  (no checkerboard artefacts; the other fedsynth generators do the same).
- GroupNorm instead of BatchNorm/InstanceNorm: batch statistics would mix hospitals'
  slices at aggregation time and single-slice sampling would change the output.
- The bottleneck is 4x4 (the paper goes to 1x1 at 256 px); the PatchGAN's receptive
  field is scaled with the image: 70 px at 256, 34 at 128, 16 at 64, about a quarter of
  the side as in the paper.

Not under DP-SGD: the L1 term reads the real slice in the *generator's* update, so the
generator (which leaves the hospital) carries gradients of patient images that the
discriminator's clipping never bounds. The family's ``dp`` refuses it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsynth.core.errors import ConfigError, UserError
from fedsynth.core.grids import paired_grid
from fedsynth.data.sliceset import SliceSet, SliceSetError
from fedsynth.models.augment import diff_augment_paired
from fedsynth.models.family import (
    GRID_SEED_OFFSET,
    MASK,
    VALIDATION_SAMPLES,
    DPSupport,
    Drawn,
    Family,
)
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet, Networks, dcgan_init
from fedsynth.models.sampling import generate, shape_masks
from fedsynth.models.training import paired_generator_step

if TYPE_CHECKING:
    from fedsynth.runs.config import ModelConfig, RunConfig, TrainConfig

__all__ = ["MASK_VALUES", "MaskEmbedding", "PatchDiscriminator", "Pix2Pix", "UNetGenerator"]

MASK_VALUES = 256  # uint8 label maps


class MaskEmbedding(nn.Module):
    """A label map (N, H, W) of ints to (N, C, H, W) learned per-label features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.table = nn.Embedding(MASK_VALUES, channels)
        self.channels = channels

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        return self.table(masks.long().clamp(0, MASK_VALUES - 1)).permute(0, 3, 1, 2)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class UNetGenerator(GeneratorNet):
    """Mask (N, H, W) to a 1-channel slice in [-1, 1] through a U-Net.

    Encoder: 4x4 stride-2 convolutions down to 4x4 (channels doubling up to 8 x width).
    Decoder: nearest upsampling + 3x3 convolution, each level concatenated with the
    encoder's feature map of the same size (the skip connections); dropout 0.5 on the
    three innermost decoder levels, applied at sampling time too.
    """

    latent_dim = 0  # no noise vector: the noise is dropout

    def __init__(
        self, *, image_size: int, width: int = 32, mask_channels: int = 8, dropout: float = 0.5
    ) -> None:
        """``mask_channels=0``: the input is a 1-channel image, not a mask (CycleGAN's
        translators reuse this U-Net that way, without dropout)."""
        super().__init__()
        if image_size not in (32, 64, 128, 256):
            raise ValueError(f"image size {image_size} not supported (use 32, 64, 128, 256)")
        self.image_size, self.dropout = image_size, dropout
        self.embed = MaskEmbedding(mask_channels) if mask_channels else None
        mask_channels = mask_channels or 1
        depth = int(math.log2(image_size)) - 2  # downsamplings to 4x4
        chans = [min(width * 2**i, width * 8) for i in range(depth)]
        self.down = nn.ModuleList()
        previous = mask_channels
        for i, c in enumerate(chans):
            layers: list[nn.Module] = [nn.Conv2d(previous, c, 4, 2, 1)]
            if i > 0:
                layers.append(_norm(c))
            layers.append(nn.LeakyReLU(0.2))
            self.down.append(nn.Sequential(*layers))
            previous = c
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            out = chans[i - 1] if i > 0 else width
            incoming = previous if i == depth - 1 else previous * 2  # innermost has no skip yet
            self.up.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(incoming, out, 3, 1, 1),
                    _norm(out),
                    nn.ReLU(),
                )
            )
            previous = out
        self.out = nn.Conv2d(width + mask_channels, 1, 3, 1, 1)
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor | None, masks: torch.Tensor) -> torch.Tensor:
        del z  # pix2pix's noise is dropout
        m = self.embed(masks) if self.embed is not None else masks
        skips = [m]
        x = m
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck itself
        for i, block in enumerate(self.up):
            if i > 0:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x)
            if i < 3 and self.dropout > 0:
                x = F.dropout(x, self.dropout, training=True)  # noise, at sampling too
        return torch.tanh(self.out(torch.cat([x, skips.pop()], dim=1)))


class PatchDiscriminator(nn.Module):
    """(slice, mask) to a map of real/fake logits, one per overlapping patch.

    The paper's 70x70 PatchGAN at 256 px (C64-C128-C256-C512, 4x4 kernels, three at
    stride 2), with one stride-2 layer fewer per halving of the side, so the patch stays
    about a quarter of the image. ``adv`` is (N, P): the losses average over patches.
    """

    def __init__(self, *, image_size: int, width: int = 32, mask_channels: int = 8) -> None:
        """``mask_channels=0``: judges slices alone (CycleGAN's discriminators)."""
        super().__init__()
        self.embed = MaskEmbedding(mask_channels) if mask_channels else None
        n_down = max(1, int(math.log2(image_size)) - 5)
        layers: list[nn.Module] = [nn.Conv2d(1 + mask_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for _ in range(n_down - 1):
            layers += [
                nn.Conv2d(c, min(c * 2, width * 8), 4, 2, 1),
                _norm(min(c * 2, width * 8)),
                nn.LeakyReLU(0.2),
            ]
            c = min(c * 2, width * 8)
        layers += [
            nn.Conv2d(c, min(c * 2, width * 8), 4, 1, 1),
            _norm(min(c * 2, width * 8)),
            nn.LeakyReLU(0.2),
            nn.Conv2d(min(c * 2, width * 8), 1, 4, 1, 1),
        ]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None) -> DiscriminatorOutput:
        if self.embed is not None:
            x = torch.cat([x, self.embed(masks)], dim=1)
        return DiscriminatorOutput(self.net(x).flatten(1))


class Pix2Pix(Family):
    """Mask -> slice: the U-Net draws the slice of a label map; trained with the
    adversarial loss of (mask, slice) pairs plus L1 to the real slice of the same mask."""

    name = "pix2pix"
    description = (
        "mask -> slice: U-Net generator with dropout as noise, PatchGAN discriminator, "
        "adversarial + L1 loss; needs slices prepared with --keep-masks"
    )
    condition = MASK
    default_loss = "bce"
    losses = ("bce", "hinge")
    dp = DPSupport(
        False,
        "no (the L1 loss reads real slices in the generator's update)",
        "pix2pix cannot train under DP-SGD: its L1 loss compares each generated slice with the real slice "
        "of the same mask in the generator's update, so the generator that leaves the hospital carries "
        "gradients of patient images that the discriminator's clipping never bounds (epsilon would be "
        "under-reported)",
    )

    def check_config(self, cfg: RunConfig) -> None:
        if cfg.train.loss == "wgan-gp":
            raise ValueError(
                "train.loss: pix2pix trains with bce or hinge, not wgan-gp (its gradient penalty has no "
                "mask-aware form here)"
            )

    def conditional(self, model: ModelConfig) -> bool:
        return False

    def build(self, model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
        del num_classes  # conditioned on a mask, not a class
        return (
            UNetGenerator(image_size=image_size, width=model.width),
            PatchDiscriminator(image_size=image_size, width=model.width),
        )

    # --- data
    def check_slices(self, slices: SliceSet, cfg: RunConfig, *, path: object, hospital: str) -> None:
        if slices.masks is None:
            raise SliceSetError(
                f"{path}: model.name=pix2pix needs each slice's mask; prepare the volumes with `fedsynth "
                "prepare ... --keep-masks`"
            )

    def conditions(self, slices: SliceSet) -> np.ndarray:
        """Each slice's mask (N, H, W, uint8: the embedding reads them as ints)."""
        assert slices.masks is not None  # check_slices
        return slices.masks

    def simulation_settings(
        self, cfg: RunConfig, slices: SliceSet, *, data_path: Path, samples_dir: Path
    ) -> dict[str, object]:
        if slices.masks is None:
            raise ConfigError(
                f"model.name=pix2pix needs each slice's mask, and {data_path} has none: prepare the volumes "
                "with `fedsynth prepare VOLUMES --keep-masks`"
            )
        if cfg.data.mask_labels:
            return {}
        return {"data.mask-labels": ",".join(str(v) for v in np.unique(slices.masks) if v != 0)}

    def check_deployment(self, cfg: RunConfig) -> None:
        if not cfg.data.mask_labels:
            raise ConfigError(
                "data.mask-labels is empty: a pix2pix run's round grids draw masks from a shape model with "
                "the hospitals' label values, e.g. --set data.mask-labels=5,1,2,3"
            )

    # --- training
    def augment(
        self, x: torch.Tensor, condition: torch.Tensor, policy: str, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slice and its mask together (the same translation and cutout)."""
        return diff_augment_paired(x, condition, policy, generator)

    def generator_update(
        self,
        gen: GeneratorNet,
        disc: nn.Module,
        opt_g: torch.optim.Optimizer,
        real: torch.Tensor,
        condition: torch.Tensor,
        cfg: TrainConfig,
        *,
        generator: torch.Generator,
        autocast: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return paired_generator_step(
            gen, disc, opt_g, real, condition, cfg, generator=generator, autocast=autocast
        )

    # --- pictures
    def round_grid(self, gen: GeneratorNet, cfg: RunConfig, path: Path, *, title: str) -> Path | None:
        """The server holds no masks: the grid's come from the shape model, the same every round."""
        masks = shape_masks(
            4 * cfg.output.grid_per_class,
            cfg.data.image_size,
            cfg.data.mask_values,
            seed=cfg.train.seed + GRID_SEED_OFFSET,
        )
        images = generate(gen, masks, seed=cfg.train.seed + GRID_SEED_OFFSET)
        return paired_grid(
            masks,
            images,
            path,
            columns=cfg.output.grid_per_class,
            title=f"{title} (masks from the shape model)",
            scale=max(1, 128 // cfg.data.image_size),
        )

    def real_grid(self, slices: SliceSet, path: Path, *, per_class: int, seed: int) -> Path:
        """Rows of randomly drawn real masks alternating with their slices."""
        if slices.masks is None:
            return super().real_grid(slices, path, per_class=per_class, seed=seed)
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(len(slices), size=min(4 * per_class, len(slices)), replace=False))
        return paired_grid(
            slices.masks[pick],
            slices.images[pick],
            path,
            columns=per_class,
            title="real training slices and masks (random)",
            scale=max(1, 128 // slices.image_size),
        )

    def validation_conditions(
        self, validation: SliceSet, cfg: RunConfig, rng: np.random.Generator
    ) -> np.ndarray:
        """The validation slices' own masks."""
        return self.conditions(validation)[rng.choice(len(validation), size=VALIDATION_SAMPLES)]

    # --- synthesis
    def sample(
        self,
        gen: GeneratorNet,
        cfg: RunConfig,
        *,
        n: int,
        label: str | None,
        seed: int,
        truncation: float = 1.0,
        masks: np.ndarray | None = None,
        where: object = "this run",
    ) -> Drawn:
        """One slice per mask in ``masks``."""
        name = cfg.model.name
        if masks is None:
            raise UserError(
                f"model {name!r} draws a slice for each mask: `fedsynth sample --run {where} --masks "
                "FILE.npz` (or --random-masks) draws them; other commands take the result with --synthetic"
            )
        if label is not None or truncation != 1.0:
            raise UserError(f"--label/--truncation: model {name!r} is conditioned on masks, not classes")
        return Drawn(generate(gen, masks, seed=seed), np.zeros(len(masks), dtype=np.int64), False)
