"""The wgan-gp family and its preset medscangan: the objective, the penalty, DP support.

The simulation tests go through Flower's real simulation engine (`fedsynth simulate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.models import training_dp as dp_module
from fedsynth.models import check_dp_discriminator
from fedsynth.models.training_dp import train_round_dp
from fedsynth.privacy import (
    PatientSampler,
    PerSampleClipper,
    PrivacyError,
    plan_privacy,
    secure_generator,
)
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig
from fedsynth.models import DiscriminatorOutput, build_gan, gradient_penalty
from fedsynth.runs.rundir import RunDir

from .conftest import make_slices

runner = CliRunner()


class _LinearCritic(nn.Module):
    """D(x) = scale * <w, x> with ||w|| = 1: exactly scale-Lipschitz, gradient norm scale everywhere."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        w = torch.randn(1, 1, 16, 16)
        self.w = nn.Parameter(scale * w / w.norm())

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> DiscriminatorOutput:
        return DiscriminatorOutput((x * self.w).flatten(1).sum(1))


def test_gradient_penalty_is_zero_for_a_1_lipschitz_critic_and_grows_off_it() -> None:
    a, b = torch.randn(32, 1, 16, 16), torch.randn(32, 1, 16, 16)
    assert gradient_penalty(_LinearCritic(1.0), a, b, None).item() == pytest.approx(0.0, abs=1e-8)
    assert gradient_penalty(_LinearCritic(3.0), a, b, None).item() == pytest.approx(4.0, rel=1e-5)  # (3-1)^2
    # ... and it is differentiable in the critic's weights, pulling the norm back to 1.
    critic = _LinearCritic(3.0)
    gradient_penalty(critic, a, b, None).backward()
    assert (critic.w.grad * critic.w).sum() > 0, "descending the penalty must shrink ||w|| towards 1"


def _toy_two_class(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright disc on black; class 1: a bright square; light noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc = ((yy - 16) ** 2 + (xx - 16) ** 2 < 64).float()
    square = ((yy - 16).abs() < 7).float() * ((xx - 16).abs() < 7).float()
    labels = torch.arange(n) % 2
    images = torch.stack([disc if int(c) == 0 else square for c in labels])[:, None] * 1.6 - 0.8
    return (images + 0.05 * torch.randn(images.shape, generator=g)).clamp(-1, 1), labels


def test_wgan_gp_critic_scores_real_above_fake_after_a_few_steps() -> None:
    cfg = RunConfig.from_overrides({"model.name": "wgan-gp", "model.width": 8, "train.local-steps": 4,
                                    "train.batch-size": 16, "train.lr-g": 1e-4, "train.lr-d": 4e-4,
                                    "train.augment": "none"})
    assert cfg.train.objective == "wgan-gp" and cfg.train.critic_steps_per_step == 5
    torch.manual_seed(0)
    gen, critic = build_gan(cfg.model, image_size=32, num_classes=2)
    images, labels = _toy_two_class(64, seed=0)
    opt_g, opt_d = make_optimizers(gen, critic, cfg.train)
    rng = torch.Generator().manual_seed(0)
    stats = train_round(gen, critic, opt_g, opt_d, BatchSource(images, labels, batch_size=16, generator=rng),
                        cfg.train, generator=rng)
    assert stats.images_seen == 4 * 5 * 16, "local-steps counts generator steps, each after 5 critic steps"
    fresh, fresh_labels = _toy_two_class(32, seed=1)
    with torch.no_grad():
        fake = gen(torch.randn(32, gen.latent_dim), fresh_labels)
        margin = critic(fresh, fresh_labels).adv.mean() - critic(fake, fresh_labels).adv.mean()
    assert margin > 0.5, f"the critic must score unseen real images above generated ones (margin {margin:.3f})"


def test_medscangan_preset_is_seed_003s_recipe_and_explicit_keys_win() -> None:
    cfg = RunConfig.from_overrides({"model.name": "medscangan", "train.lr-g": 3e-4})
    assert cfg.model.name == "wgan-gp" and cfg.model.spectral_norm and cfg.model.residual
    assert cfg.model.latent_dim == 256 and cfg.model.conditioning == "ac"
    assert (cfg.train.loss, cfg.train.critic_steps_per_step, cfg.train.gp_weight) == ("wgan-gp", 5, 10.0)
    assert cfg.train.lr_d == 4e-4 and cfg.train.lr_g == 3e-4
    gen, critic = build_gan(cfg.model, image_size=64, num_classes=2)
    assert any(name.endswith("parametrizations") for name, _ in critic.named_modules()), "spectral norm is on"
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in gen.modules()), "upsample + conv, no checkerboard"
    # The default family keeps its own loss; a Flower run config round-trips the preset.
    assert RunConfig().train.objective == "hinge"
    # Through Flower's flat run config (every key filled with its default) the preset still applies.
    flat = {**RunConfig().to_run_config(), "model.name": "medscangan", "train.lr-g": 3e-4}
    assert RunConfig.from_run_config(flat) == cfg
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize("size", [32, 64, 256])
def test_every_convolutional_family_builds_at_every_size(size: int) -> None:
    for name in ("cdcgan", "wgan-gp"):
        cfg = RunConfig.from_overrides({"model.name": name, "model.width": 4})
        gen, disc = build_gan(cfg.model, image_size=size, num_classes=2)
        with torch.no_grad():
            x = gen(torch.randn(2, gen.latent_dim), torch.tensor([0, 1]))
            assert x.shape == (2, 1, size, size) and x.abs().max() <= 1
            assert disc(x, torch.tensor([0, 1])).adv.shape == (2,)


def test_spectral_norm_under_dp_is_refused_with_the_reason() -> None:
    _, critic = build_gan(RunConfig.from_overrides({"model.name": "medscangan"}).model, image_size=32, num_classes=2)
    with pytest.raises(PrivacyError, match="spectral normalisation .* set model.spectral-norm=false"):
        check_dp_discriminator(critic)


def test_dp_wgan_gp_penalty_reads_only_generated_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DP the penalty is taken between two batches of generated images, never at a
    real slice: every input it receives is far from every real slice (the real slices are
    a constant image no tanh generator output can equal), and the round's DP steps are
    local-steps x n-critic."""
    cfg = RunConfig.from_overrides({"model.name": "wgan-gp", "model.spectral-norm": False, "model.width": 4,
                                    "train.local-steps": 2, "train.n-critic": 2, "train.batch-size": 8,
                                    "dp.noise-multiplier": 1.0, "train.augment": "none"})
    torch.manual_seed(0)
    gen, critic = build_gan(cfg.model, image_size=32, num_classes=2)
    check_dp_discriminator(critic)
    images, labels = torch.full((40, 1, 32, 32), 0.25), torch.arange(40) % 2
    seen: list[torch.Tensor] = []
    original = dp_module.gradient_penalty

    def spy(critic_, a, b, labels_, **kw):  # type: ignore[no-untyped-def]
        seen.extend([a.detach().clone(), b.detach().clone()])
        return original(critic_, a, b, labels_, **kw)

    monkeypatch.setattr(dp_module, "gradient_penalty", spy)
    plan = plan_privacy(cfg.dp, units=40, unit="slice", batch_size=8, planned_steps=cfg.train.critic_steps)
    opt_g, opt_d = make_optimizers(gen, critic, cfg.train)
    sampler = PatientSampler(np.arange(40).astype(str), plan.sample_rate, secure_generator())
    stats = train_round_dp(gen, PerSampleClipper(critic, max_grad_norm=1.0), opt_g, opt_d, images, labels, sampler,
                           plan, cfg.train, num_classes=2, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2 * cfg.train.critic_steps == 8, "one penalty per DP critic step"
    for batch in seen:
        assert (batch - 0.25).abs().flatten(1).amax(1).min() > 0.05, "a real slice reached the penalty"
    assert np.isfinite(stats.g_loss) and np.isnan(stats.d_loss), "the critic's loss on real slices is withheld"


@pytest.mark.slow
def test_wgan_gp_federates_and_samples(tmp_path: Path) -> None:
    """medscangan at 32 px, one hospital (the pooled case: its validation round must not
    wait for a second), two rounds through Flower's simulation engine; then `fedsynth
    sample --round best` draws from it."""
    data = make_slices(n_patients=12).save(tmp_path / "slices.npz")
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "1", "--rounds", "2",
                                 "--local-steps", "2", "--out", str(out), "--set", "model.name=medscangan",
                                 "--set", "model.width=4", "--set", "model.latent-dim=16",
                                 "--set", "train.batch-size=8", "--set", "output.grid-per-class=2"])
    assert result.exit_code == 0, result.output
    run = RunDir(out)
    rounds = run.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2] and all(len(r["hospitals"]) == 1 for r in rounds)
    assert all(m["images-seen"] == 2 * 5 * 8 for r in rounds for m in r["hospitals"].values())
    assert all(set(r["validation"]["hospitals"]) == {"hospital-a"} for r in rounds)
    saved = (out / "config.yaml").read_text()
    assert "wgan-gp" in saved and "medscangan" not in saved
    assert (out / "samples" / "round-0002.png").exists() and (out / "curves.png").exists()
    result = runner.invoke(app, ["sample", "--run", str(out), "--n", "6", "--out", str(tmp_path / "s"),
                                 "--format", "npz", "--round", "best"])
    assert result.exit_code == 0, result.output
    synthetic = np.load(tmp_path / "s" / "synthetic.npz")
    assert synthetic["images"].shape == (6, 32, 32)
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["synthetic"] is True


@pytest.mark.slow
def test_wgan_gp_under_dp_keeps_a_ledger_and_medscangan_is_refused(tmp_path: Path) -> None:
    # 24 patients: after the holdout and the validation patients each hospital keeps
    # several training patients (DP needs at least 2 to sample from).
    data = make_slices(n_patients=24).save(tmp_path / "slices.npz")
    refused = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "1",
                                  "--out", str(tmp_path / "no"), "--set", "model.name=medscangan",
                                  "--set", "dp.target-epsilon=10"])
    assert refused.exit_code != 0 and "spectral normalisation" in refused.output
    assert not (tmp_path / "no" / "rounds.jsonl").exists(), "refused before anything started"

    out = tmp_path / "dp"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "2",
                                 "--local-steps", "2", "--out", str(out), "--set", "model.name=medscangan",
                                 "--set", "model.spectral-norm=false", "--set", "model.width=4",
                                 "--set", "model.latent-dim=16", "--set", "train.batch-size=8",
                                 "--set", "output.grid-per-class=2", "--set", "dp.noise-multiplier=1.0"])
    assert result.exit_code == 0, result.output
    for hospital in ("hospital-a", "hospital-b"):
        ledger = json.loads((out / "hospitals" / hospital / "state" / "privacy.json").read_text())
        assert sum(steps for _, _, steps in ledger["history"]) == 2 * 2 * 5, "every critic step is a DP step"
    assert "ε=" in result.output
    # The validation score would leave without noise: off under DP unless asked for.
    assert all("validation" not in r for r in RunDir(out).read_rounds())
