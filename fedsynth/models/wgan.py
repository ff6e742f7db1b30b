"""WGAN-GP family (seeds 000 and 003): a residual generator and a residual critic with
optional spectral normalisation, trained with the Wasserstein loss and a gradient penalty.

Seed 003 (MedScanGAN) combines residual blocks, spectral normalisation, two-time-scale
learning rates (G 1e-4, D 4e-4) and the gradient penalty (lambda = 10) at 256 px with a
256-d latent; the preset ``model.name: medscangan`` sets exactly that (see config.py).

The critic has no normalisation layer (a gradient penalty is defined per input, which
batch statistics would break; Gulrajani et al. 2017, section 4) and no in-place
activation, so without spectral normalisation it is Opacus-compatible. With spectral
normalisation it is not: the weight seen by the forward pass is a function of the
parameter through a power iteration, for which there is no per-sample gradient rule,
so DP runs refuse ``model.spectral-norm`` (fedsynth/client/dp.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from fedsynth.models.family import DPSupport, Family, Preset
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet, Networks, n_up

if TYPE_CHECKING:
    from fedsynth.runs.config import ModelConfig

__all__ = ["MEDSCANGAN", "WGANGP", "ResidualCritic", "ResidualGenerator"]


def _maybe_sn(layer: nn.Module, on: bool) -> nn.Module:
    return spectral_norm(layer) if on else layer


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight, gain=1.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, 0.02)


class _UpBlock(nn.Module):
    """BN-ReLU-upsample-conv-BN-ReLU-conv with a 1x1 shortcut (the SNGAN/WGAN-GP ResNet block).
    Nearest upsampling followed by a convolution, not a transposed convolution: no
    checkerboard artefacts."""

    def __init__(self, c_in: int, c_out: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest"))
        h = self.conv2(F.relu(self.bn2(h)))
        return h + self.shortcut(up) if self.shortcut is not None else h


class _DownBlock(nn.Module):
    """LeakyReLU-conv-LeakyReLU-conv-avgpool with a conv-avgpool shortcut; no normalisation."""

    def __init__(self, c_in: int, c_out: int, *, residual: bool, sn: bool, first: bool) -> None:
        super().__init__()
        self.residual, self.first = residual, first
        self.conv1 = _maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), sn)
        self.conv2 = _maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), sn)
        self.shortcut = _maybe_sn(nn.Conv2d(c_in, c_out, 1), sn) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.leaky_relu(x, 0.2)
        h = self.conv2(F.leaky_relu(self.conv1(h), 0.2))
        h = F.avg_pool2d(h, 2)
        if self.shortcut is None:
            return h
        return h + self.shortcut(F.avg_pool2d(x, 2))


class ResidualGenerator(GeneratorNet):
    """Noise (and a label) to a 1-channel image in [-1, 1]: a linear projection to 4x4,
    then up-blocks (residual unless ``residual=False``) that double the side to
    ``image_size``. The label enters as a learned embedding concatenated with the noise,
    as in the default model."""

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        latent_dim: int = 128,
        width: int = 32,
        conditional: bool = True,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.image_size, self.num_classes = image_size, num_classes
        self.latent_dim, self.conditional = latent_dim, conditional
        ups = n_up(image_size)  # up-blocks from 4x4, e.g. 4 at 64 px
        channels = [width * min(2**i, 8) for i in reversed(range(ups + 1))]  # 8w,8w,4w,2w,w
        self.embed = nn.Embedding(num_classes, latent_dim) if conditional else None
        in_dim = latent_dim * (2 if conditional else 1)
        self.project = nn.Linear(in_dim, channels[0] * 16)
        self.c0 = channels[0]
        self.blocks = nn.Sequential(
            *[_UpBlock(a, b, residual) for a, b in zip(channels[:-1], channels[1:], strict=True)]
        )
        self.out_bn = nn.BatchNorm2d(channels[-1])
        self.out = nn.Conv2d(channels[-1], 1, 3, 1, 1)
        self.apply(_init)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is conditional: pass class labels")
            z = torch.cat([z, self.embed(labels)], dim=1)
        h = self.project(z).view(len(z), self.c0, 4, 4)
        h = self.blocks(h)
        return torch.tanh(self.out(F.relu(self.out_bn(h))))


class ResidualCritic(nn.Module):
    """Image (and label) to a real-valued score (a critic, not a classifier): down-blocks
    halve the side to 4x4, a sum over space, then the same heads as the default model
    (``projection``, ``ac`` or ``none``). Spectral normalisation on every weight layer
    when ``spectral_norm`` (not on the label embedding, whose rows are looked up, not
    multiplied)."""

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        width: int = 32,
        head: str = "projection",
        residual: bool = True,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        if head not in ("projection", "ac", "none"):
            raise ValueError(f"unknown critic head {head!r}")
        self.image_size, self.num_classes, self.head = image_size, num_classes, head
        n_down = n_up(image_size)
        channels = [1] + [width * min(2**i, 8) for i in range(n_down)]
        self.blocks = nn.Sequential(
            *[
                _DownBlock(a, b, residual=residual, sn=spectral_norm, first=(i == 0))
                for i, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True))
            ]
        )
        feat = channels[-1]
        self.adv = _maybe_sn(nn.Linear(feat, 1), spectral_norm)
        self.embed = nn.Embedding(num_classes, feat) if head == "projection" else None
        self.classify = _maybe_sn(nn.Linear(feat, num_classes), spectral_norm) if head == "ac" else None
        self.apply(_init)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> DiscriminatorOutput:
        h = F.leaky_relu(self.blocks(x), 0.2).sum(dim=(2, 3))
        adv = self.adv(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this critic is conditional: pass class labels")
            adv = adv + (self.embed(labels) * h).sum(dim=1)
        logits = self.classify(h) if self.classify is not None else None
        return DiscriminatorOutput(adv, logits)


# Seed 003 (MedScanGAN): residual blocks, spectral normalisation, WGAN-GP (lambda 10),
# two-time-scale learning rates G 1e-4 / D 4e-4, a 256-d latent, an auxiliary-classifier
# critic, 5 critic steps per generator step. The paper gives no Adam betas; (0, 0.9) are
# Gulrajani et al.'s for WGAN-GP. It used no differentiable augmentation.
MEDSCANGAN = Preset(
    "medscangan",
    {
        "model.name": "wgan-gp",
        "model.spectral-norm": True,
        "model.residual": True,
        "model.latent-dim": 256,
        "model.conditioning": "ac",
        "train.loss": "wgan-gp",
        "train.n-critic": 5,
        "train.gp-weight": 10.0,
        "train.lr-g": 1e-4,
        "train.lr-d": 4e-4,
        "train.beta1": 0.0,
        "train.beta2": 0.9,
        "train.augment": "none",
        "train.diversity-weight": 0.0,
    },
    dp_summary="no (spectral norm)",
)


class WGANGP(Family):
    """Residual generator and critic, trained with the Wasserstein loss and gradient penalty."""

    name = "wgan-gp"
    description = (
        "the MedScanGAN paper's family: residual generator (upsample+conv) and residual critic with "
        "spectral norm, Wasserstein loss + gradient penalty, n-critic steps; preset medscangan"
    )
    default_loss = "wgan-gp"
    dp = DPSupport(True, "without spectral norm (penalty on generated images)")
    presets = (MEDSCANGAN,)

    def build(self, model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
        conditional = model.conditioning != "none"
        gen = ResidualGenerator(
            image_size=image_size,
            num_classes=num_classes,
            latent_dim=model.latent_dim,
            width=model.width,
            conditional=conditional,
            residual=model.residual,
        )
        critic = ResidualCritic(
            image_size=image_size,
            num_classes=num_classes,
            width=model.width,
            head=model.conditioning,
            residual=model.residual,
            spectral_norm=model.spectral_norm,
        )
        return gen, critic
