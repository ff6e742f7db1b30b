"""StyleGAN2-lite: a StyleGAN2-style generator and residual discriminator sized for a CPU at
64 px (and a GPU at 128-256 px), with class conditioning.

What it keeps from StyleGAN2 (Karras et al., 2020): a mapping network (lr multiplier
0.01) from noise and class to a style vector w; a learned 4x4 constant; modulated and
demodulated 3x3 convolutions; per-layer noise with learned strength; skip-connected
to-image layers at every resolution; style mixing during training; equalised learning
rates; an exponential moving average (EMA) of the generator's weights for sampling; the
truncation trick at sampling; a residual discriminator with a minibatch-standard-deviation
layer; the non-saturating logistic loss with lazy R1 regularisation.

What it drops or changes, and why:
- Path-length regularisation: it doubles the cost of a generator step and buys
  smoother latent interpolation, which fedsynth's users do not need.
- Upsampling is bilinear followed by a modulated convolution, not a transposed
  convolution with a FIR filter: simpler, and without checkerboard artefacts.
- Widths are small (``model.width`` x 4 channels at most) and the mapping network has
  ``model.mapping-layers`` (default 4, not 8) layers of ``model.latent-dim`` units.
- Class conditioning: the mapping network reads the noise concatenated with a class
  embedding (as in StyleGAN2-ADA's conditional models); the discriminator uses a
  projection head, as fedsynth's other families do.
- The EMA copy lives in the generator as buffers, so it travels with the generator's
  weights: each hospital updates it after every generator step, starting from the
  global EMA it received, and the server averages it like any other tensor. In
  evaluation mode (sampling, grids, audits) the generator runs on the EMA weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedsynth.models.family import DPSupport, Family, recompute_batchnorm
from fedsynth.models.networks import DiscriminatorOutput, GeneratorNet, Networks, n_up

if TYPE_CHECKING:
    from fedsynth.runs.config import ModelConfig, RunConfig

__all__ = ["MinibatchStd", "StyleDiscriminator", "StyleGAN2Lite", "StyleGenerator"]

_GAIN = math.sqrt(2.0)  # leaky-ReLU gain, as in StyleGAN2


class _EqualLinear(nn.Module):
    """Linear layer with the weight scaled at run time (equalised learning rate)."""

    def __init__(
        self, d_in: int, d_out: int, *, lr_mul: float = 1.0, bias_init: float = 0.0, activate: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((d_out,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(d_in), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * _GAIN if self.activate else out


class _ModulatedConv(nn.Module):
    """3x3 (or 1x1) convolution whose input channels are scaled by a per-sample style,
    then (``demodulate``) renormalised to unit output variance; a grouped convolution
    applies each sample's own weights."""

    def __init__(self, c_in: int, c_out: int, w_dim: int, kernel: int, *, demodulate: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel))
        self.affine = _EqualLinear(w_dim, c_in, bias_init=1.0)
        self.scale = 1 / math.sqrt(c_in * kernel * kernel)
        self.c_out, self.padding, self.demodulate = c_out, kernel // 2, demodulate

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        n, c_in, h, wd = x.shape
        style = self.affine(w)  # (N, c_in)
        weight = self.weight[None] * self.scale * style[:, None, :, None, None]  # (N, out, in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        out = F.conv2d(
            x.reshape(1, n * c_in, h, wd),
            weight.reshape(n * self.c_out, c_in, *weight.shape[3:]),
            padding=self.padding,
            groups=n,
        )
        return out.reshape(n, self.c_out, h, wd)


class _StyleLayer(nn.Module):
    noise_const: torch.Tensor  # the fixed per-layer noise of evaluation mode (a buffer)

    """Modulated conv, then noise (learned strength), bias and leaky ReLU."""

    def __init__(
        self, c_in: int, c_out: int, w_dim: int, resolution: int, *, up: bool, noise_seed: int
    ) -> None:
        super().__init__()
        self.up = up
        self.conv = _ModulatedConv(c_in, c_out, w_dim, 3)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(c_out))
        # Fixed noise for evaluation mode (deterministic samples); not exchanged.
        const = torch.randn(1, 1, resolution, resolution, generator=torch.Generator().manual_seed(noise_seed))
        self.register_buffer("noise_const", const, persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = self.conv(x, w)
        noise = torch.randn(len(x), 1, *x.shape[2:], device=x.device) if self.training else self.noise_const
        x = x + self.noise_strength * noise + self.bias[None, :, None, None]
        return F.leaky_relu(x, 0.2) * _GAIN


class _ToImage(nn.Module):
    def __init__(self, c_in: int, w_dim: int) -> None:
        super().__init__()
        self.conv = _ModulatedConv(c_in, 1, w_dim, 1, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv(x, w) + self.bias[None, :, None, None]


class _Synthesis(nn.Module):
    def __init__(self, image_size: int, w_dim: int, width: int) -> None:
        super().__init__()
        self.resolutions = [4 * 2**i for i in range(n_up(image_size) + 1)]
        channels = {r: min(width * 4, max(width // 2, width * 64 // r)) for r in self.resolutions}
        self.const = nn.Parameter(torch.randn(1, channels[4], 4, 4))
        self.layers = nn.ModuleList()
        self.to_image = nn.ModuleList()
        c_prev = channels[4]
        for i, r in enumerate(self.resolutions):
            block = nn.ModuleList()
            if r > 4:
                block.append(_StyleLayer(c_prev, channels[r], w_dim, r, up=True, noise_seed=2 * i))
            block.append(
                _StyleLayer(
                    channels[r] if r > 4 else c_prev, channels[r], w_dim, r, up=False, noise_seed=2 * i + 1
                )
            )
            self.layers.append(block)
            self.to_image.append(_ToImage(channels[r], w_dim))
            c_prev = channels[r]
        self.num_ws = (
            sum(len(cast(nn.ModuleList, b)) for b in self.layers) + 1
        )  # each style layer, plus the last to-image

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        """``ws``: (N, num_ws, w_dim), one style per layer (equal unless mixed)."""
        x = self.const.expand(len(ws), -1, -1, -1)
        image = None
        k = 0
        for block, to_image in zip(self.layers, self.to_image, strict=True):
            for layer in cast(nn.ModuleList, block):
                x = layer(x, ws[:, k])
                k += 1
            y = to_image(x, ws[:, k])
            image = (
                y
                if image is None
                else F.interpolate(image, scale_factor=2, mode="bilinear", align_corners=False) + y
            )
        assert image is not None  # at least one resolution
        return image


class _Mapping(nn.Module):
    def __init__(self, latent_dim: int, w_dim: int, num_classes: int, layers: int, conditional: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, latent_dim) if conditional else None
        d_in = latent_dim * (2 if conditional else 1)
        self.net = nn.Sequential(
            *[
                _EqualLinear(d_in if i == 0 else w_dim, w_dim, lr_mul=0.01, activate=True)
                for i in range(layers)
            ]
        )

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        z = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is conditional: pass class labels")
            e = self.embed(labels)
            z = torch.cat([z, e * torch.rsqrt(e.pow(2).mean(dim=1, keepdim=True) + 1e-8)], dim=1)
        return self.net(z)


class _StyleCore(nn.Module):
    w_avg: torch.Tensor  # each class's average style (a buffer)

    """Mapping and synthesis networks, and the average style per class."""

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        latent_dim: int,
        width: int,
        conditional: bool,
        mapping_layers: int,
    ) -> None:
        super().__init__()
        self.conditional = conditional
        self.mapping = _Mapping(latent_dim, latent_dim, num_classes, mapping_layers, conditional)
        self.synthesis = _Synthesis(image_size, latent_dim, width)
        self.register_buffer("w_avg", torch.zeros(num_classes if conditional else 1, latent_dim))

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor | None, mixing: float = 0.0, truncation: float = 1.0
    ) -> torch.Tensor:
        w = self.mapping(z, labels)
        row = (
            labels
            if (self.conditional and labels is not None)
            else torch.zeros(len(z), dtype=torch.long, device=z.device)
        )
        if self.training:
            with torch.no_grad():  # the average style of each class, tracked as StyleGAN2 does
                for c in row.unique():
                    self.w_avg[c].lerp_(w[row == c].mean(0).detach(), 0.005)
        elif truncation != 1.0:
            w = self.w_avg[row] + truncation * (w - self.w_avg[row])
        n_ws = self.synthesis.num_ws
        ws = w[:, None].expand(-1, n_ws, -1)
        if (
            mixing > 0 and float(torch.rand(())) < mixing
        ):  # style mixing: a second style from a crossover layer on
            w2 = self.mapping(torch.randn_like(z), labels)
            cut = int(torch.randint(1, n_ws, ()))
            ws = torch.cat([ws[:, :cut], w2[:, None].expand(-1, n_ws - cut, -1)], dim=1)
        return torch.tanh(self.synthesis(ws))


class StyleGenerator(GeneratorNet):
    """Noise (and a label) to a 1-channel image in [-1, 1], StyleGAN2-style.

    ``forward(z, labels, truncation=1.0)``: in training mode it runs on the trained
    weights and mixes two styles with probability ``mixing``; in evaluation mode it runs
    on the EMA weights, with fixed per-layer noise, and ``truncation`` < 1 pulls each
    style towards the class's average style (the truncation trick).
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        latent_dim: int = 64,
        width: int = 32,
        conditional: bool = True,
        mapping_layers: int = 4,
        mixing: float = 0.9,
        ema_beta: float = 0.99,
    ) -> None:
        super().__init__()
        self.image_size, self.num_classes = image_size, num_classes
        self.latent_dim, self.conditional = latent_dim, conditional
        self.mixing, self.ema_beta = mixing, ema_beta
        self.core = _StyleCore(image_size, num_classes, latent_dim, width, conditional, mapping_layers)
        # The EMA weights are buffers, so they travel with the generator and the server
        # averages them like the weights.
        self._names = [name for name, _ in self.core.named_parameters()]
        for name, p in self.core.named_parameters():
            self.register_buffer(_ema_key(name), p.detach().clone())

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step towards the current weights (after each generator update)."""
        for name, p in self.core.named_parameters():
            getattr(self, _ema_key(name)).lerp_(p.detach(), 1 - self.ema_beta)

    @torch.no_grad()
    def reset_buffers_from_weights(self, *, seed: int = 0, per_class: int = 512) -> None:
        """EMA := the weights, and each class's average style recomputed from them. For a
        server that noised the weights (client-level DP): the averaged buffers would
        otherwise release the hospitals' un-noised updates."""
        for name, p in self.core.named_parameters():
            getattr(self, _ema_key(name)).copy_(p.detach())
        g = torch.Generator().manual_seed(seed)
        device = self.core.w_avg.device
        for c in range(len(self.core.w_avg)):
            z = torch.randn(per_class, self.latent_dim, generator=g).to(device)
            labels = (
                torch.full((per_class,), c, dtype=torch.long, device=device) if self.conditional else None
            )
            self.core.w_avg[c] = self.core.mapping(z, labels).mean(0)

    def forward(
        self, z: torch.Tensor, labels: torch.Tensor | None = None, *, truncation: float = 1.0
    ) -> torch.Tensor:
        if self.training:
            return self.core(z, labels, self.mixing)
        ema = {name: getattr(self, _ema_key(name)) for name in self._names}
        return functional_call(self.core, ema, (z, labels), {"truncation": truncation}, strict=False)


def _ema_key(name: str) -> str:
    return "ema__" + name.replace(".", "__")


class MinibatchStd(nn.Module):
    """Appends the standard deviation across a group of samples as an extra channel
    (StyleGAN's minibatch-std layer). It makes each sample's output depend on the other
    samples in its group, so per-sample gradients, and DP-SGD, are undefined with it."""

    mixes_samples = True

    def __init__(self, group: int = 4) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group, n)
        while n % g:
            g -= 1
        y = x.reshape(g, n // g, c, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // g,)
        y = y.repeat(g)[:, None, None, None].expand(n, 1, h, w)
        return torch.cat([x, y], dim=1)


class _ResDown(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        return (h + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2)


class StyleDiscriminator(nn.Module):
    """Residual discriminator (StyleGAN2's 'resnet' D) with a minibatch-std layer before
    the last block (``mbstd_group`` 0: none) and a projection head for the class. The
    family trains it with lazy R1 (``train.r1-gamma``)."""

    def __init__(
        self,
        *,
        image_size: int,
        num_classes: int,
        width: int = 32,
        head: str = "projection",
        mbstd_group: int = 4,
    ) -> None:
        super().__init__()
        if head not in ("projection", "none"):
            raise ValueError(f"stylegan2-lite supports projection or none conditioning, not {head!r}")
        self.image_size, self.num_classes, self.head = image_size, num_classes, head
        resolutions = [4 * 2**i for i in range(n_up(image_size) + 1)][::-1]  # 64, 32, 16, 8, 4
        channels = {r: min(width * 4, max(width // 2, width * 64 // r)) for r in resolutions}
        self.from_image = nn.Conv2d(1, channels[image_size], 1)
        self.blocks = nn.Sequential(*[_ResDown(channels[r], channels[r // 2]) for r in resolutions[:-1]])
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group > 0 else None
        c4 = channels[4] + (1 if self.mbstd is not None else 0)
        self.conv = nn.Conv2d(c4, channels[4], 3, 1, 1)
        self.fc = nn.Linear(channels[4] * 16, channels[4])
        self.adv = nn.Linear(channels[4], 1)
        self.embed = nn.Embedding(num_classes, channels[4]) if head == "projection" else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> DiscriminatorOutput:
        h = self.blocks(F.leaky_relu(self.from_image(x), 0.2))
        if self.mbstd is not None:
            h = self.mbstd(h)
        h = F.leaky_relu(self.conv(h), 0.2)
        h = F.leaky_relu(self.fc(h.flatten(1)), 0.2)
        adv = self.adv(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ValueError("this discriminator is conditional: pass class labels")
            adv = adv + (self.embed(labels) * h).sum(dim=1) / math.sqrt(h.shape[1])
        return DiscriminatorOutput(adv)


class StyleGAN2Lite(Family):
    """StyleGAN2-style generator (mapping network, modulated convolutions, EMA) and
    residual discriminator with minibatch std, trained with the logistic loss and lazy R1."""

    name = "stylegan2-lite"
    description = (
        "StyleGAN2-style: mapping network with class input, modulated/demodulated convs, per-layer noise, "
        "style mixing, EMA of G, truncation; residual D with minibatch std, lazy R1"
    )
    default_loss = "bce"
    dp = DPSupport(True, "without minibatch std and R1 (model.mbstd-group=0, train.r1-gamma=0)")
    uses_r1 = True
    truncation = True

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.model.conditioning == "ac":
            raise ValueError("model.conditioning: stylegan2-lite supports projection or none, not ac")

    def build(self, model: ModelConfig, *, image_size: int, num_classes: int) -> Networks:
        conditional = model.conditioning != "none"
        gen = StyleGenerator(
            image_size=image_size,
            num_classes=num_classes,
            latent_dim=model.latent_dim,
            width=model.width,
            conditional=conditional,
            mapping_layers=model.mapping_layers,
        )
        disc = StyleDiscriminator(
            image_size=image_size,
            num_classes=num_classes,
            width=model.width,
            head=model.conditioning,
            mbstd_group=model.mbstd_group,
        )
        return gen, disc

    def after_generator_step(self, gen: GeneratorNet) -> None:
        cast(StyleGenerator, gen).update_ema()  # sampling runs on the EMA of the weights

    def after_noised_update(self, gen: GeneratorNet, *, num_classes: int, seed: int) -> None:
        """EMA and each class's average style, from the noised weights (the averaged
        buffers would otherwise release the hospitals' un-noised updates)."""
        recompute_batchnorm(gen, num_classes, seed=seed)
        cast(StyleGenerator, gen).reset_buffers_from_weights(seed=seed)
