"""Per-sample clipping of a discriminator's real term in one backward pass, and the check
that a discriminator can be clipped at all.

``PerSampleClipper`` builds on Opacus's fast-gradient-clipping hooks: one backward pass
of the real term records each layer's activations and output gradients; per-sample
gradient norms come from them (for convolutions, the "ghost norm" <a^T a, g^T g> where
that is cheaper than forming the per-sample gradient); the clipped sum sum_i c_i g_i is
then formed layer by layer from the same records (a convolution's weight gradient with
the output gradients scaled by c_i), with no second backward pass and no per-sample
gradients of the large layers kept in memory ("book-keeping", Bu et al. 2023). The
result is the same sum Opacus's per-sample clipping gives (tested against
``GradSampleModule``).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn
from torch.nn.grad import conv2d_weight

from fedsynth.privacy.accounting import PrivacyError

RECORD = "_fedsynth_record"  # what a layer's backward pass left for the clipped sum

__all__ = ["PerSampleClipper", "PrivacyError", "check_private_layers"]


def check_private_layers(disc: nn.Module) -> None:
    """Refuse, before any training, a discriminator whose layers DP-SGD cannot clip per
    sample (the family refuses what its losses rule out: see ``Family.check_dp``).

    Raises
    ------
    PrivacyError
        Naming each offending layer (BatchNorm, spectral norm, minibatch std, in-place
        activations, ...).
    """
    mixing = sorted(name for name, m in disc.named_modules() if getattr(m, "mixes_samples", False))
    if mixing:
        raise PrivacyError(
            f"the discriminator cannot be trained with DP-SGD: {', '.join(mixing)} (minibatch standard "
            "deviation) makes each image's output depend on the other real images in its batch, so no "
            "per-sample gradient exists to clip; set model.mbstd-group=0"
        )
    reparametrised = sorted(
        {
            name.rsplit(".parametrizations", 1)[0]
            for name, _ in disc.named_modules()
            if name.endswith(".parametrizations")
        }
    )
    if reparametrised:
        raise PrivacyError(
            "the discriminator cannot be trained with DP-SGD: spectral normalisation on "
            f"{', '.join(reparametrised[:3])}{' ...' if len(reparametrised) > 3 else ''} computes each "
            "weight from its parameter by a power iteration that has no per-sample gradient rule; set "
            "model.spectral-norm=false (the gradient penalty still constrains the critic)"
        )
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(disc, strict=False)
    if errors:
        detail = "; ".join(str(e).split("\n")[0] for e in errors[:5])
        raise PrivacyError(
            f"the discriminator cannot be trained with DP-SGD: {detail}. Use GroupNorm instead of BatchNorm "
            "and no in-place activations."
        )


def _conv_norm_sample(layer: nn.Conv2d, activations: torch.Tensor, backprops: torch.Tensor) -> dict:
    """Per-sample gradient norms of a Conv2d from its input and output gradient."""
    n = activations.shape[0]
    padding = cast(tuple[int, ...], layer.padding)  # numeric ("zeros" mode: _book_keeping_sampler checks)
    cols = F.unfold(
        activations, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride
    )
    g = backprops.reshape(n, backprops.shape[1], -1)  # [n, C, T]
    (k, t), c = cols.shape[1:], g.shape[1]
    norms = {}
    if layer.weight.requires_grad:
        if t * (k + c) < k * c:  # ghost norm: ||g a^T||_F^2 = <a^T a, g^T g>, never forming g a^T
            gram = (torch.bmm(cols.transpose(1, 2), cols) * torch.bmm(g.transpose(1, 2), g)).sum((1, 2))
            norms[layer.weight] = gram.clamp(min=0).sqrt()
        else:
            norms[layer.weight] = torch.bmm(g, cols.transpose(1, 2)).flatten(1).norm(dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = g.sum(2).norm(dim=1)
    return norms


def _book_keeping_sampler(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Opacus norm sampler that also keeps what the clipped sum needs on the layer."""
    if type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros":
        layer.__dict__[RECORD] = ("conv", activations[0], backprops)
        return _conv_norm_sample(layer, activations[0], backprops)
    grad_samples = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, activations, backprops)
    layer.__dict__[RECORD] = ("samples", grad_samples)
    return {p: gs.reshape(len(gs), -1).norm(dim=1) for p, gs in grad_samples.items()}


class PerSampleClipper(GradSampleModuleFastGradientClipping):
    """A discriminator wrapper whose real-term backward gives the sum of per-sample
    gradients, each clipped to ``max_grad_norm``, in one backward pass.

    Use: ``out = clipper(real, labels)``; ``clipper.backward_real(per_sample_loss, real)``;
    then ``clipper.clipped_sum()`` maps each trainable parameter to sum_i c_i g_i with
    c_i = min(1, C / ||g_i||). Outside that (fake term, generator step) call
    ``disable_hooks()``.
    """

    NORM_SAMPLERS = {layer: _book_keeping_sampler for layer in GradSampleModule.GRAD_SAMPLERS}

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        super().__init__(module, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        unsupported = sorted(
            {
                type(m).__name__
                for m in module.modules()
                if any(p.requires_grad for p in m.parameters(recurse=False))
                and type(m) not in self.NORM_SAMPLERS
            }
        )
        if unsupported:
            raise PrivacyError(
                f"DP-SGD has no per-sample gradients for layer type(s) {', '.join(unsupported)}"
            )
        self._records_in = [
            p
            for m in module.modules()
            if not isinstance(m, nn.Conv2d)
            for p in m.parameters(recurse=False)
            if p.requires_grad
        ]

    def backward_real(self, per_sample_loss: torch.Tensor, inputs: torch.Tensor) -> None:
        """Run the real term's backward pass for its records only: the gradient is taken
        with respect to the input images and the small layers' parameters, so autograd
        computes every layer's output gradient but skips the convolutions' weight gradients
        (``clipped_sum`` forms those, already clipped)."""
        torch.autograd.grad(per_sample_loss.sum(), [inputs, *self._records_in])

    def clipped_sum(self) -> dict[torch.Tensor, torch.Tensor]:
        coef = self.get_clipping_coef()
        total: dict[torch.Tensor, torch.Tensor] = {}
        for layer in self._module.modules():
            record = layer.__dict__.pop(RECORD, None)
            if record is None:
                continue
            if record[0] == "conv" and isinstance(layer, nn.Conv2d):
                _, a, g = record
                g = g * coef.view(-1, 1, 1, 1)
                if layer.weight.requires_grad:
                    total[layer.weight] = conv2d_weight(
                        a, layer.weight.shape, g, layer.stride, layer.padding, layer.dilation, layer.groups
                    )
                if layer.bias is not None and layer.bias.requires_grad:
                    total[layer.bias] = g.sum((0, 2, 3))
            else:
                for p, gs in record[1].items():
                    total[p] = torch.einsum("n,n...->...", coef, gs)
        missing = [p for p in self.trainable_parameters if p not in total]
        for p in self.trainable_parameters:
            p.__dict__.pop("_norm_sample", None)
        if missing:
            raise RuntimeError(
                f"{len(missing)} discriminator parameters got no per-sample gradient (a layer off the path "
                "from the input image?)"
            )
        return total
