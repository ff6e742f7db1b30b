"""pix2pix (mask -> slice): the networks, the paired training step, the federated run on
the real CT and MR volumes with their label maps, sampling for masks, the paired audit
and the DP refusal.

The simulation goes through Flower's real simulation engine (`fedsynth simulate`); the
volumes are ../shared/data/ct-volumes (skipped, with the reason, where it is absent).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedsynth.audit.paired import paired_fidelity
from fedsynth.cli import app
from fedsynth.models.augment import diff_augment_paired
from fedsynth.models import check_dp_discriminator
from fedsynth.privacy import PrivacyError
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig
from fedsynth.models import build_gan
from fedsynth.runs.rundir import RunDir
from fedsynth.models.sampling import generate, shape_masks
from fedsynth.data.sliceset import SliceSet

from .conftest import CT_VOLUMES, make_slices, require

runner = CliRunner()


def _pix2pix(size: int = 32, width: int = 8):  # type: ignore[no-untyped-def]
    cfg = RunConfig.from_overrides({"model.name": "pix2pix", "model.width": width})
    return cfg, *build_gan(cfg.model, image_size=size, num_classes=1)


@pytest.mark.parametrize("size", [32, 64, 256])
def test_unet_draws_a_slice_per_mask_and_the_patchgan_judges_patches(size: int) -> None:
    _, gen, disc = _pix2pix(size, width=4)
    masks = torch.from_numpy(shape_masks(2, size, [5, 1], seed=0).astype(np.int64))
    with torch.no_grad():
        x = gen(None, masks)
        assert x.shape == (2, 1, size, size) and x.abs().max() <= 1
        patches = disc(x, masks).adv
    # The paper's 30 x 30 patch map at 256 px (70 x 70 receptive field); smaller images keep
    # about a quarter of the side per patch.
    assert patches.shape[0] == 2 and patches.shape[1] == {32: 14 * 14, 64: 30 * 30, 256: 30 * 30}[size]


def test_dropout_is_the_noise_and_the_seed_fixes_it() -> None:
    _, gen, _ = _pix2pix()
    masks = shape_masks(3, 32, [5], seed=1)
    a, b = generate(gen, masks, seed=1), generate(gen, masks, seed=1)
    c = generate(gen, masks, seed=2)
    assert np.array_equal(a, b), "same seed, same images"
    assert not np.array_equal(a, c), "dropout stays on when sampling: another seed, other images"


def test_paired_augmentation_moves_mask_and_slice_together() -> None:
    """Translation and cutout are drawn once for a slice and its mask: after augmenting,
    every pixel of the slice still shows its mask's label (here slice = label / 10 - 1)."""
    masks = torch.from_numpy(shape_masks(16, 32, [5, 9], seed=3).astype(np.int64))
    x = (masks.float() / 10 - 1)[:, None]
    gen = torch.Generator().manual_seed(0)
    x_aug, m_aug = diff_augment_paired(x, masks, "translation,cutout", gen)
    assert torch.allclose(x_aug[:, 0], m_aug.float() / 10 - 1)
    assert not torch.equal(m_aug, masks), "the augmentation did move things"
    assert set(m_aug.unique().tolist()) <= {0, 5, 9}, "moved-in and cut-out pixels are background"


def test_pix2pix_learns_a_mask_to_slice_mapping() -> None:
    """On a toy set where each label has its own grey level, 150 local steps bring the
    L1 between the generated and the real slice of each mask below half its starting
    value, and the generated slice is brighter inside the bright label than outside it."""
    torch.manual_seed(0)
    cfg, gen, disc = _pix2pix(width=8)
    cfg = cfg.with_overrides({"train.local-steps": 150, "train.batch-size": 16, "train.augment": "none"})
    masks = shape_masks(64, 32, [3, 7], seed=0)
    images = np.select([masks == 7, masks == 3], [0.8, 0.0], default=-1.0).astype(np.float32)[:, None]
    batches = BatchSource(torch.from_numpy(images), torch.from_numpy(masks.astype(np.int64)), batch_size=16,
                          generator=torch.Generator().manual_seed(0))
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    target = ((images[:, 0] + 1) * 127.5).round()

    def l1() -> float:  # mean |generated - real| of the same mask, in grey levels
        return float(np.abs(generate(gen, masks, seed=0).astype(float) - target).mean())

    before = l1()
    stats = train_round(gen, disc, opt_g, opt_d, batches, cfg.train, generator=torch.Generator().manual_seed(2))
    assert np.isfinite(stats.l1), "the round reports its L1"
    assert l1() < 0.5 * before, (before, l1())
    fake = generate(gen, masks[:8], seed=0).astype(float)
    assert fake[masks[:8] == 7].mean() > fake[masks[:8] == 0].mean() + 60


def test_paired_fidelity_scores_the_same_mask_pairing() -> None:
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (30, 32, 32), dtype=np.uint8)
    noisy = np.clip(real.astype(int) + rng.integers(-40, 41, real.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 256, (30, 32, 32), dtype=np.uint8)
    result = paired_fidelity(other, real, noisy, real)
    assert result["train"]["ssim"]["mean"] > 0.5 > result["holdout"]["ssim"]["mean"]
    assert result["train"]["psnr"]["mean"] > result["holdout"]["psnr"]["mean"] + 5
    assert result["ssim_gap"]["ci_low"] > 0, "reproducing training slices shows up as a gap"
    same = paired_fidelity(real, real)
    assert same["holdout"]["ssim"]["mean"] == pytest.approx(1.0) and "train" not in same


def test_dp_is_refused_for_pix2pix_with_the_reason(tmp_path: Path) -> None:
    _, _, disc = _pix2pix()
    with pytest.raises(PrivacyError, match="L1 loss .* generator's update"):
        check_dp_discriminator(disc)
    data = make_slices(n_patients=6, per_patient=2, size=32).save(tmp_path / "s.npz")
    refused = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "1",
                                  "--out", str(tmp_path / "dp"), "--set", "model.name=pix2pix",
                                  "--set", "dp.target-epsilon=5"])
    assert refused.exit_code != 0 and "pix2pix cannot train under DP-SGD" in refused.output
    assert not (tmp_path / "dp" / "checkpoints").exists(), "nothing trained"


def test_pix2pix_needs_masks_and_says_how_to_get_them(tmp_path: Path) -> None:
    data = make_slices(n_patients=6, per_patient=2, size=32).save(tmp_path / "s.npz")
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "1",
                                 "--out", str(tmp_path / "run"), "--set", "model.name=pix2pix"])
    assert result.exit_code != 0 and "--keep-masks" in result.output and "s.npz" in result.output


def _ct_and_mr(tmp_path: Path, holdout: float) -> Path:
    """The real CT and MR volumes with their TotalSegmentator label maps, as a slice set
    with masks (two patients)."""
    ct = require(CT_VOLUMES)
    folder = tmp_path / f"volumes-{holdout}"
    folder.mkdir()
    for name, volume, seg in (("ct", "example_ct_sm", "example_seg"), ("mr", "example_mr_sm", "example_seg_mr")):
        (folder / f"{name}.nii.gz").symlink_to(ct / f"{volume}.nii.gz")
        (folder / f"{name}_seg.nii.gz").symlink_to(ct / f"{seg}.nii.gz")
    out = tmp_path / f"ct-mr-{holdout}.npz"
    result = runner.invoke(app, ["prepare", str(folder), "--out", str(out), "--size", "32", "--keep-masks",
                                 "--holdout", str(holdout), "--validation", "0"])
    assert result.exit_code == 0, result.output
    return out


def test_two_hospitals_train_pix2pix_on_ct_and_mr_and_sample_for_masks(tmp_path: Path) -> None:
    data = _ct_and_mr(tmp_path, holdout=0)
    slices = SliceSet.load(data)
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "2",
                                 "--local-steps", "3", "--out", str(out), "--set", "simulation.validation=0",
                                 "--set", "model.name=pix2pix", "--set", "model.width=8",
                                 "--set", "train.batch-size=8", "--set", "output.grid-per-class=4"])
    assert result.exit_code == 0, result.output
    run = RunDir(out)
    rounds = run.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2] and all(len(r["hospitals"]) == 2 for r in rounds)
    assert all("l1" in m for r in rounds for m in r["hospitals"].values()), "each hospital reports its L1"
    cfg = run.load_config()
    assert set(cfg.data.mask_values) == set(np.unique(slices.masks)) - {0}, "the masks' labels, for the grids"
    assert (out / "samples" / "round-0002.png").exists() and (out / "samples" / "real.png").exists()

    # One slice per given mask, written with that mask.
    result = runner.invoke(app, ["sample", "--run", str(out), "--masks", str(data), "--out", str(tmp_path / "s"),
                                 "--format", "npz"])
    assert result.exit_code == 0, result.output
    synthetic = SliceSet.load(tmp_path / "s" / "synthetic.npz")
    assert synthetic.images.shape == slices.masks.shape == synthetic.masks.shape
    assert np.array_equal(synthetic.masks, slices.masks)
    assert synthetic.meta["masks"] == str(data)
    # Masks from the shape model; PNGs with their masks.
    result = runner.invoke(app, ["sample", "--run", str(out), "--random-masks", "--n", "5",
                                 "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "r").glob("synthetic-*-mask.png"))) == 5 and (tmp_path / "r" / "grid.png").exists()
    # A pix2pix run cannot draw from noise: the user is told what to give.
    result = runner.invoke(app, ["sample", "--run", str(out), "--out", str(tmp_path / "n")])
    assert result.exit_code != 0 and "--masks" in result.output


def test_audit_of_a_pix2pix_run_reports_paired_fidelity_and_segmentation_utility(tmp_path: Path) -> None:
    """The audit of a pix2pix run draws a slice for each holdout mask and reports SSIM/PSNR
    against the real slice of the same mask (holdout and training masks) and the
    segmentation utility, in audit.json and the report. On phantom CT volumes with liver
    masks (fedsynth's built-in data: the audit needs at least two patients on each side,
    which the three real volumes with masks cannot give)."""
    from fedsynth.data.phantoms import write_phantom_hospitals

    from .conftest import SMALL_HOSPITALS

    write_phantom_hospitals(tmp_path / "ph", hospitals=SMALL_HOSPITALS[:2], seed=0, size=64, slices=6)
    data = tmp_path / "ph.npz"
    result = runner.invoke(app, ["prepare", str(tmp_path / "ph"), "--out", str(data), "--size", "32",
                                 "--keep-masks", "--holdout", "0.4", "--validation", "0"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "1", "--rounds", "2",
                                 "--local-steps", "5", "--out", str(out), "--set", "model.name=pix2pix",
                                 "--set", "model.width=8", "--set", "train.batch-size=8",
                                 "--set", "simulation.validation=0"])
    assert result.exit_code == 0, result.output
    audit_dir = tmp_path / "audit"
    result = runner.invoke(app, ["audit", "--run", str(out), "--data", str(data), "--out", str(audit_dir),
                                 "--seeds", "2", "--utility-steps", "20", "--encoder-steps", "60", "--classifier-steps", "60",
                                 "--n-synthetic", "60", "--no-pdf"])
    assert result.exit_code == 0, result.output
    audit = json.loads((audit_dir / "audit.json").read_text())
    slices = SliceSet.load(data)
    held, train = slices.only("holdout"), slices.only("train")
    paired = audit["paired"]
    assert paired["holdout"]["ssim"]["n"] == len(held) and paired["train"]["ssim"]["n"] == len(train)
    assert -1 <= paired["holdout"]["ssim"]["mean"] <= 1 and paired["holdout"]["psnr"]["mean"] > 0
    assert audit["inputs"]["synthetic_images"] == 60 and not audit["inputs"]["conditional"]
    seg = paired["segmentation"]
    assert seg["seeds"] == 2 and set(seg["dice"]) == {"real", "real+synthetic", "real+moved-real"}
    assert all(0 <= v <= 1 for d in seg["dice"].values() for v in d["values"])
    html = (audit_dir / "report.html").read_text()
    assert "Mask-conditioned fidelity (pix2pix)" in html and "Segmentation utility" in html


def test_segmentation_utility_tells_a_faithful_generator_from_a_misleading_one() -> None:
    """Toy rule: the liver (5) is bright, the rest dark. A generator that follows the rule
    adds training pairs that keep the U-Net's holdout Dice high; one that paints the liver
    dark teaches the wrong thing and its gain over the real pairs is lower. The control
    (the same moves of the real pairs) is measured beside them."""
    from fedsynth.audit.segmentation import segmentation_utility

    rng = np.random.default_rng(0)

    def render(masks: np.ndarray, liver: int, rest: int) -> np.ndarray:
        noise = rng.integers(0, 20, masks.shape)
        return (np.where(masks == 5, liver, rest) + noise).clip(0, 255).astype(np.uint8)

    masks = shape_masks(48, 32, [2, 5], seed=0)
    train_m, hold_m = masks[:32], masks[32:]
    train_x, hold_x = render(train_m, 200, 40), render(hold_m, 200, 40)
    faithful = segmentation_utility(train_x[:8], train_m[:8], hold_x, hold_m, lambda m, s: render(m, 200, 40),
                                    label=5, seeds=2, steps=80)
    misleading = segmentation_utility(train_x[:8], train_m[:8], hold_x, hold_m, lambda m, s: render(m, 40, 200),
                                      label=5, seeds=2, steps=80)
    assert faithful["label"] == 5 and set(faithful["dice"]) == {"real", "real+synthetic", "real+moved-real"}
    assert faithful["dice"]["real+synthetic"]["mean"] > 0.7
    assert faithful["gains"]["synthetic over real"]["mean"] > misleading["gains"]["synthetic over real"]["mean"] + 0.2


def test_any_width_builds_and_the_wgan_gp_loss_is_refused() -> None:
    from fedsynth.runs.config import ConfigError

    cfg = RunConfig.from_overrides({"model.name": "pix2pix", "model.width": 36})
    gen, disc = build_gan(cfg.model, image_size=32, num_classes=1)
    masks = torch.zeros(1, 32, 32, dtype=torch.uint8)
    assert disc(gen(None, masks), masks).adv.shape[0] == 1
    with pytest.raises(ConfigError, match="pix2pix trains with bce or hinge"):
        RunConfig.from_overrides({"model.name": "pix2pix", "train.loss": "wgan-gp"})
