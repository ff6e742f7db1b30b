"""A classifier trained with DP-SGD directly on real slices: the baseline that releasing DP
synthetic images has to approach.

Dockhorn et al. ("Differentially Private Diffusion Models", TMLR 2023) compare a
classifier trained on DP synthetic images with one trained by DP-SGD on the real images
at the same epsilon: both are private releases, and synthetic images are worth their
cost only if the first comes near the second. This is the second, with the audit's own
small CNN and training recipe, and the same privacy unit and accounting as the
discriminator's DP-SGD (Poisson sampling of patients, one slice each; per-sample
clipping; Gaussian noise; Opacus's RDP accountant).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsynth.metrics.classifier import LEARNING_RATE, WEIGHT_DECAY, augment, build_classifier, to_float
from fedsynth.privacy.accounting import PrivacyPlan, epsilon_for
from fedsynth.privacy.sampling import PatientSampler, secure_generator

__all__ = ["private_classifier_net", "train_private_classifier"]


def private_classifier_net(n_classes: int, init_seed: int) -> nn.Module:
    """The audit's small CNN made fit for per-sample gradients: each BatchNorm (which mixes
    the samples of a batch) replaced by a GroupNorm, as Opacus's ``ModuleValidator.fix``
    does, and no in-place activations (the per-sample hooks read each layer's output)."""
    from opacus.validators import ModuleValidator

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        net = ModuleValidator.fix(build_classifier("cnn", n_classes))
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return net


def train_private_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    unit_ids: np.ndarray,
    plan: PrivacyPlan,
    *,
    n_classes: int,
    init_seed: int,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, float, int, float]:
    """Train the audit's CNN with DP-SGD for ``plan.planned_steps`` steps.

    Parameters
    ----------
    images, labels : the real training slices, uint8 (N, 1, H, W), and their classes.
    unit_ids : the privacy unit of each slice (its patient); slices sharing an id are one
        unit.
    plan : sample rate, noise multiplier, clipping norm, delta and steps, from
        :func:`~fedsynth.privacy.accounting.plan_privacy`.
    n_classes : number of classes.
    init_seed : seeds the initial weights and the (public) augmentation.
    device : where to train.
    generator : the randomness of the Poisson sampling and the DP noise. By default one
        seeded from the operating system, which nobody can reproduce: what a classifier
        that is released needs. A seeded one makes a measurement repeatable (the audit's
        baseline, which is never released).

    Returns
    -------
    The trained network (eval-ready, hooks removed), its mean training loss over the last
    tenth of the steps, the steps taken, and the epsilon spent (RDP, at ``plan.delta``).
    """
    from fedsynth.privacy.clipping import PerSampleClipper

    net = private_classifier_net(n_classes, init_seed).to(device)
    clipper = PerSampleClipper(net, plan.max_grad_norm)
    params = [p for p in net.parameters() if p.requires_grad]
    steps = plan.planned_steps
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LEARNING_RATE, total_steps=steps, pct_start=0.15
    )
    noise = generator or secure_generator()
    sampler = PatientSampler(np.asarray(unit_ids).astype(str), plan.sample_rate, noise)
    aug_gen = torch.Generator().manual_seed(init_seed)
    C, sigma = plan.max_grad_norm, plan.noise_multiplier
    tail, tail_loss = max(1, steps // 10), 0.0
    net.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for step in range(steps):
            grads = [torch.normal(0.0, sigma * C, size=p.shape, generator=noise).to(device) for p in params]
            idx = sampler.sample()
            loss = 0.0
            if len(idx):
                # augmented per slice from public randomness, before the clip: each augmented
                # slice depends on that slice alone, so the accounting holds
                x = augment(to_float(images[idx].to(device)), aug_gen).requires_grad_(True)
                per_sample = F.cross_entropy(clipper(x), labels[idx].to(device), reduction="none")
                clipper.backward_real(per_sample, x)
                clipped = clipper.clipped_sum()
                for g, p in zip(grads, params, strict=True):
                    g += clipped[p]
                loss = float(per_sample.detach().mean())
            for g, p in zip(grads, params, strict=True):
                p.grad = g / plan.expected_batch
            opt.step()
            schedule.step()
            if step >= steps - tail:
                tail_loss += loss
    clipper.remove_hooks()
    net.eval()
    epsilon = epsilon_for([(sigma, plan.sample_rate, steps)], plan.delta)
    return net, tail_loss / tail, steps, epsilon
