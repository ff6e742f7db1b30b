"""Models: the right shapes at every supported size, and a discriminator Opacus can wrap."""

from __future__ import annotations

import json

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedsynth.runs.config import ModelConfig
from fedsynth.models import FAMILIES as MODEL_FAMILIES
from fedsynth.models import build_gan

# Adversarial families drawn from noise (and a class); pix2pix draws from a mask
# (tests/test_pix2pix.py), cyclegan translates slices (tests/test_cyclegan.py), and dp-merf
# has a fixed feature map in the discriminator's place (tests/test_dpmerf.py).
NOISE_FAMILIES = sorted(
    n for n, f in MODEL_FAMILIES.items() if f.condition in ("class", "none") and f.federation == "weights"
)


@pytest.mark.parametrize("name", NOISE_FAMILIES)
@pytest.mark.parametrize("size", [32, 64, 128])
def test_generator_makes_images_the_discriminator_scores(name: str, size: int) -> None:
    gen, disc = build_gan(ModelConfig(name=name), image_size=size, num_classes=4)
    z = torch.randn(3, gen.latent_dim)
    labels = torch.tensor([0, 1, 3])
    images = gen(z, labels)
    assert images.shape == (3, 1, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert disc(images, labels).adv.shape == (3,)


@pytest.mark.parametrize("conditioning", ["projection", "ac", "none"])
def test_discriminator_is_opacus_ready_and_gets_per_sample_gradients(conditioning: str) -> None:
    _, disc = build_gan(ModelConfig(conditioning=conditioning), image_size=32, num_classes=3)
    assert ModuleValidator.validate(disc, strict=False) == []
    wrapped = GradSampleModule(disc)
    x, y = torch.randn(5, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1])
    out = wrapped(x, y)
    loss = out.adv.sum() + (out.class_logits.sum() if out.class_logits is not None else 0)
    loss.backward()
    for name, p in wrapped.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert p.grad_sample.shape[0] == 5, name


def test_conditioning_changes_the_image() -> None:
    gen, _ = build_gan(ModelConfig(), image_size=32, num_classes=2)
    gen.eval()
    z = torch.randn(4, gen.latent_dim)
    a = gen(z, torch.zeros(4, dtype=torch.long))
    b = gen(z, torch.ones(4, dtype=torch.long))
    assert (a - b).abs().mean() > 0.01 * a.abs().mean()


def test_unknown_family_or_size_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        build_gan(ModelConfig.model_construct(name="stylegan9"), image_size=32, num_classes=2)
    with pytest.raises(ValueError, match="48"):
        build_gan(ModelConfig(), image_size=48, num_classes=2)


# The configuration under which each family may train with DP-SGD (what `fedsynth models`
# says); pix2pix and cyclegan are refused (tests/test_pix2pix.py, tests/test_cyclegan.py);
# dp-merf trains no discriminator: its DP is one release (tests/test_dpmerf.py).
DP_READY = {"cdcgan": {}, "vanilla-gan": {}, "wgan-gp": {"spectral_norm": False}, "stylegan2-lite": {"mbstd_group": 0}}


def test_every_family_is_either_dp_ready_or_refused() -> None:
    from fedsynth.models import check_dp_discriminator
    from fedsynth.privacy import PrivacyError

    for name, family in MODEL_FAMILIES.items():
        if name not in DP_READY and family.federation == "weights":
            _, disc = build_gan(ModelConfig(name=name, width=8), image_size=32, num_classes=2)
            with pytest.raises(PrivacyError):
                check_dp_discriminator(disc)


@pytest.mark.parametrize("name", sorted(DP_READY))
def test_each_family_in_its_dp_configuration_gets_clipped_per_slice_gradients(name: str) -> None:
    from fedsynth.models import check_dp_discriminator
    from fedsynth.privacy import PerSampleClipper

    _, disc = build_gan(ModelConfig(name=name, width=8, **DP_READY[name]), image_size=32, num_classes=2)
    check_dp_discriminator(disc)
    clipper = PerSampleClipper(disc, max_grad_norm=1.0)
    x = torch.randn(4, 1, 32, 32, requires_grad=True)
    out = clipper(x, torch.tensor([0, 1, 0, 1]))
    clipper.backward_real(out.adv, x)
    summed = clipper.clipped_sum()
    assert set(summed) == {p for p in disc.parameters() if p.requires_grad}
    total = torch.sqrt(sum(g.pow(2).sum() for g in summed.values()))
    assert total <= 4 * 1.0 + 1e-4, "a sum of 4 slices' gradients, each clipped to 1"


def test_models_command_lists_every_family_and_preset_with_its_dp_support() -> None:
    from typer.testing import CliRunner

    from fedsynth.cli import app

    # 80 columns: a terminal's default, and what rich assumes when the output is piped
    result = CliRunner().invoke(app, ["models", "--size", "32"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(map(len, result.output.splitlines())) <= 80
    table_names = {line.split()[0] for line in result.output.splitlines() if line.startswith("  ") and line.strip()}
    assert set(MODEL_FAMILIES) <= table_names, "every family name whole in the table (a user types it)"
    flat = " ".join(result.output.split())  # the descriptions below the table wrap at the width
    assert "medscangan (preset)" in flat
    assert "without spectral norm" in flat and "no (spectral norm)" in flat
    assert "mask" in result.output, "pix2pix is listed as conditioned on a mask"
    assert "domain" in result.output, "cyclegan is listed as translating between domains"
    listed = CliRunner().invoke(app, ["models", "--size", "32", "--format", "json"], env={"COLUMNS": "40"})
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.output)["models"]}
    assert set(rows) == {*MODEL_FAMILIES, "medscangan"}
    assert rows["medscangan"]["kind"] == "preset" and rows["medscangan"]["dp_sgd"] is False
    assert rows["cdcgan"]["dp_sgd"] is True and rows["pix2pix"]["conditioned_on"] == "mask"
    assert all(r["g_params"] > 0 and r["sizes"] for r in rows.values())
    # dp-merf's discriminator is a fixed feature map: nothing trained, nothing to count
    assert all(r["d_params"] > 0 for name, r in rows.items() if name != "dp-merf") and rows["dp-merf"]["d_params"] == 0


def test_cdcgan_upsample_nearest_builds_a_generator_without_transposed_convolutions() -> None:
    """`model.upsample=nearest` (a user's choice against checkerboard texture) changes the
    generator's doubling layers and nothing else: same image shape and range, and the same
    discriminator; the default keeps DCGAN's transposed convolutions (old checkpoints load)."""
    from fedsynth.runs.config import RunConfig

    default = RunConfig().model
    nearest = RunConfig.from_overrides({"model.upsample": "nearest"}).model
    gen_t, disc_t = build_gan(default, image_size=64, num_classes=3)
    gen_n, disc_n = build_gan(nearest, image_size=64, num_classes=3)
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in gen_t.modules())
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in gen_n.modules())
    assert any(isinstance(m, torch.nn.Upsample) for m in gen_n.modules())
    images = gen_n.eval()(torch.randn(5, gen_n.latent_dim), torch.tensor([0, 1, 2, 0, 1]))
    assert images.shape == (5, 1, 64, 64) and images.abs().max() <= 1
    assert disc_t.state_dict().keys() == disc_n.state_dict().keys()
    with pytest.raises(ValueError, match="upsample"):
        RunConfig.from_overrides({"model.upsample": "bilinear"})


@pytest.mark.parametrize("readout", ["spatial", "mean"])
def test_cdcgan_discriminator_readout_decides_whether_the_layout_counts(readout: str) -> None:
    """The same last-layer features in another layout (positions mirrored: what a generator
    that tiles patches changes) score differently with the default spatial readout, and
    exactly the same when the map is averaged over positions (``mean``). Both are
    Opacus-ready."""
    _, disc = build_gan(ModelConfig(d_readout=readout), image_size=64, num_classes=2)
    assert ModuleValidator.validate(disc, strict=False) == []
    channels = [m for m in disc.features if isinstance(m, torch.nn.GroupNorm)][-1].num_channels
    disc.features = torch.nn.Identity()  # score a feature map directly
    torch.manual_seed(0)
    f, labels = torch.randn(4, channels, 4, 4), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        a, b = disc(f, labels).adv, disc(f.flip(2, 3), labels).adv
    if readout == "spatial":
        assert ((a - b).abs() > 0.05 * a.abs().mean()).all()
    else:
        assert torch.allclose(a, b, atol=1e-5)


def test_a_run_saved_before_the_spatial_readout_keeps_its_mean_discriminator(tmp_path) -> None:
    """A run directory whose config.yaml predates ``model.d-readout`` trained (and saved its
    hospitals' discriminators) with the mean readout: resuming or auditing it must build
    that shape, not today's default."""
    from fedsynth.runs.config import RunConfig
    from fedsynth.runs.rundir import RunDir

    run = RunDir(tmp_path / "run")
    run.save_config(RunConfig())
    assert run.load_config().model.d_readout == "spatial"
    text = run.config_path.read_text()
    run.config_path.write_text("".join(line for line in text.splitlines(True) if "d-readout" not in line))
    assert run.load_config().model.d_readout == "mean"
