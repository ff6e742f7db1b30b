"""DiffAugment and the mode-seeking term: the two ingredients of the default recipe
that change what the discriminator and the generator see."""

from __future__ import annotations

import pytest
import torch

from fedsynth.models.augment import diff_augment, diff_augment_paired
from fedsynth.models.training import mode_seeking_loss
from fedsynth.runs.config import ConfigError, RunConfig


def _disc_images(n: int = 6, size: int = 32) -> torch.Tensor:
    """Background -1 with a bright square whose place differs per image."""
    x = torch.full((n, 1, size, size), -1.0)
    for i in range(n):
        x[i, :, 8 + i : 16 + i, 10:18] = 1.0
    return x


def test_each_augmented_image_depends_on_its_own_input_only() -> None:
    """The property DP-SGD relies on: the augmentation of slice i reads slice i alone, so
    it is part of that slice's per-sample loss and is clipped with it."""
    x = _disc_images().requires_grad_(True)
    out = diff_augment(x, "color,translation,cutout", torch.Generator().manual_seed(0))
    out[2].sum().backward()
    assert x.grad is not None
    others = torch.cat([x.grad[:2], x.grad[3:]])
    assert torch.count_nonzero(others) == 0
    assert torch.count_nonzero(x.grad[2]) > 0, "gradients flow back to the image (differentiable)"


def test_augmentations_change_images_but_keep_shape_range_and_background() -> None:
    x = _disc_images()
    gen = torch.Generator().manual_seed(1)
    moved = diff_augment(x, "translation", gen)
    assert moved.shape == x.shape
    assert not torch.equal(moved, x)
    # a translation moves the square, it does not create or destroy it (edges aside)
    assert torch.allclose((moved > 0).float().sum(dim=(1, 2, 3)), (x > 0).float().sum(dim=(1, 2, 3)))
    cut = diff_augment(x, "cutout", gen)
    assert (cut <= x).all() and (cut == -1.0).float().mean() > (x == -1.0).float().mean(), "cut to background"
    assert torch.equal(diff_augment(x, "none", gen), x)


def test_unknown_augmentation_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="train.augment.*rotate"):
        RunConfig.from_overrides({"train.augment": "color,rotate"})
    assert RunConfig.from_overrides({"train.augment": ""}).train.augment == "none"


def test_cutout_with_a_probability_leaves_the_other_images_untouched() -> None:
    """``cutout:0.5`` (ADA's remedy for an augmentation that leaks into the generator):
    about half the images get a square cut out, the rest reach the discriminator as they
    were; a name alone still cuts every image."""
    x = torch.ones(400, 1, 16, 16)
    gen = torch.Generator().manual_seed(3)
    cut = (diff_augment(x, "cutout:0.5", gen) == -1.0).flatten(1).any(dim=1)
    assert 160 <= int(cut.sum()) <= 240  # binomial(400, 0.5): mean 200, sd 10
    untouched = diff_augment(x, "cutout:0.5", gen)
    kept = ~(untouched == -1.0).flatten(1).any(dim=1)
    assert torch.equal(untouched[kept], x[kept])
    assert (diff_augment(x, "cutout", gen) == -1.0).flatten(1).any(dim=1).all()
    # still one image's own draw: the gradient of image 2 reaches image 2 alone
    y = _disc_images().requires_grad_(True)
    diff_augment(y, "translation:0.5,cutout:0.5", gen)[2].sum().backward()
    assert y.grad is not None and torch.count_nonzero(torch.cat([y.grad[:2], y.grad[3:]])) == 0
    assert torch.count_nonzero(y.grad[2]) > 0


def test_a_slice_and_its_mask_stay_aligned_when_a_transformation_has_a_probability() -> None:
    """pix2pix's discriminator judges a slice with its label map: one draw per image decides
    for both whether a transformation applies, so a cut slice has a cut mask and an uncut
    slice an uncut mask."""
    x = _disc_images(n=64)
    masks = (x[:, 0] > 0).long() * 2  # label 2 where the square is
    gen = torch.Generator().manual_seed(4)
    out, out_masks = diff_augment_paired(x, masks, "translation:0.5,cutout:0.5", gen)
    assert torch.equal((out[:, 0] > 0).long() * 2, out_masks)
    assert 0 < int((out != x).flatten(1).any(dim=1).sum()) < 64  # some images changed, not all
    with pytest.raises(ValueError, match="unknown augmentation"):  # as diff_augment: no item left empty
        diff_augment_paired(x, masks, "translation,,cutout", gen)


@pytest.mark.parametrize("policy", ["cutout:1.5", "cutout:0", "cutout:half", "cutout:"])
def test_a_bad_augmentation_probability_is_a_config_error_naming_the_key(policy: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.augment.*\(0, 1\]"):
        RunConfig.from_overrides({"train.augment": policy})


def test_mode_seeking_term_is_large_when_noise_is_ignored() -> None:
    """A generator that maps different noise to the same image (the collapse this term
    fights) scores far higher than one whose images differ with the noise."""
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    same = torch.zeros(16, 1, 4, 4)
    varied = z[:, :1, None, None].expand(16, 1, 4, 4)
    assert mode_seeking_loss(same, z) > 1000 * mode_seeking_loss(varied, z)
