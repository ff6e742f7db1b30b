"""stylegan2-lite: what a user relies on (EMA sampling, truncation, style mixing, R1, the
DP refusals) and a federated run through Flower's real simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.models import check_dp_discriminator
from fedsynth.privacy import PrivacyError
from fedsynth.models.training import BatchSource, make_optimizers, r1_penalty, train_round
from fedsynth.runs.config import ConfigError, RunConfig
from fedsynth.models import build_gan
from fedsynth.runs.rundir import RunDir
from fedsynth.models.sampling import generate
from fedsynth.core.weights import exchanged_state

from .conftest import make_slices

runner = CliRunner()
TINY = {"model.name": "stylegan2-lite", "model.width": 8, "model.latent-dim": 16}


def _build(**overrides):  # type: ignore[no-untyped-def]
    cfg = RunConfig.from_overrides({**TINY, **overrides})
    torch.manual_seed(0)
    gen, disc = build_gan(cfg.model, image_size=32, num_classes=2)
    return cfg, gen, disc


def test_training_moves_the_ema_which_sampling_uses_and_the_ema_travels_with_the_weights() -> None:
    cfg, gen, disc = _build(**{"train.local-steps": 4, "train.batch-size": 8})
    assert cfg.train.objective == "bce", "stylegan2-lite trains with the non-saturating logistic loss"
    state = exchanged_state(gen)
    assert any(k.startswith("ema__") for k in state) and "core.w_avg" in state, "EMA and average styles are exchanged"
    before = generate(gen, np.array([0, 1, 0, 1]), seed=3)
    slices = make_slices(n_patients=8, per_patient=2)
    images, labels = torch.from_numpy(slices.as_float()), torch.from_numpy(slices.labels)
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    rng = torch.Generator().manual_seed(0)
    train_round(gen, disc, opt_g, opt_d, BatchSource(images, labels, batch_size=8, generator=rng), cfg.train,
                generator=rng)
    after = generate(gen, np.array([0, 1, 0, 1]), seed=3)
    assert not np.array_equal(before, after), "sampling reads the EMA, which training moved"
    assert np.array_equal(after, generate(gen, np.array([0, 1, 0, 1]), seed=3)), "evaluation noise is fixed"
    ema = dict(gen.named_buffers())
    moved = [n for n, p in gen.core.named_parameters()
             if not torch.equal(p, ema["ema__" + n.replace(".", "__")])]
    assert moved, "the EMA lags the trained weights"


def test_truncation_pulls_samples_towards_the_class_average_style() -> None:
    _, gen, _ = _build()
    gen.train()
    with torch.no_grad():  # let the average style settle on something other than zero
        for _ in range(50):
            gen(torch.randn(32, 16), torch.randint(2, (32,)))
    labels = np.zeros(64, dtype=np.int64)
    spread = {psi: generate(gen, labels, seed=1, truncation=psi).astype(float).std(axis=0).mean()
              for psi in (1.0, 0.5, 0.01)}
    assert spread[1.0] > spread[0.5] > spread[0.01], f"less truncation, more diversity: {spread}"


def test_r1_is_the_squared_input_gradient_and_feeds_the_discriminator() -> None:
    cfg, _, disc = _build()
    x = torch.randn(6, 1, 32, 32)
    y = torch.randint(2, (6,))
    xi = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(disc(xi, y).adv.sum(), xi)
    assert r1_penalty(disc, x, y).item() == pytest.approx(g.pow(2).flatten(1).sum(1).mean().item(), rel=1e-5)
    r1_penalty(disc, x, y).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_lazy_r1_fires_every_interval_counted_over_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds of 10 discriminator steps with r1-interval 16: R1 fires at steps 16 and 32
    of the run, not never (a per-round counter would never reach 16)."""
    from fedsynth.models import training as train_module

    cfg, gen, disc = _build(**{"train.local-steps": 10, "train.batch-size": 8, "train.r1-interval": 16})
    calls: list[int] = []
    original = train_module.r1_penalty
    monkeypatch.setattr(train_module, "r1_penalty", lambda *a: calls.append(1) or original(*a))
    slices = make_slices(n_patients=8, per_patient=2)
    images, labels = torch.from_numpy(slices.as_float()), torch.from_numpy(slices.labels)
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    rng = torch.Generator().manual_seed(0)
    for expected in (0, 1, 1, 2):  # after 10, 20, 30, 40 steps
        train_round(gen, disc, opt_g, opt_d, BatchSource(images, labels, batch_size=8, generator=rng), cfg.train,
                    generator=rng)
        assert len(calls) == expected


def test_server_reset_releases_no_averaged_buffer() -> None:
    """With client-level DP the server noises the weights; the EMA and the average
    styles (averaged, un-noised) are rebuilt from the noised weights."""
    _, gen, _ = _build()
    with torch.no_grad():
        for p in gen.core.parameters():
            p.add_(0.1)
    gen.reset_buffers_from_weights(seed=0)
    buffers = dict(gen.named_buffers())
    assert all(torch.equal(p, buffers["ema__" + n.replace(".", "__")]) for n, p in gen.core.named_parameters())
    with torch.no_grad():
        z = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
        want = gen.core.mapping(z, torch.zeros(512, dtype=torch.long)).mean(0)
    assert torch.allclose(gen.core.w_avg[0], want, atol=1e-5)


def test_dp_refuses_minibatch_std_and_r1_and_accepts_the_plain_discriminator() -> None:
    cfg, _, disc = _build()
    with pytest.raises(PrivacyError, match="minibatch standard deviation.*model.mbstd-group=0"):
        check_dp_discriminator(disc, cfg.train)
    cfg, _, disc = _build(**{"model.mbstd-group": 0})
    with pytest.raises(PrivacyError, match="R1 .* train.r1-gamma=0"):
        check_dp_discriminator(disc, cfg.train)
    cfg, _, disc = _build(**{"model.mbstd-group": 0, "train.r1-gamma": 0})
    check_dp_discriminator(disc, cfg.train)
    with pytest.raises(ConfigError, match="stylegan2-lite supports projection or none"):
        RunConfig.from_overrides({**TINY, "model.conditioning": "ac"})


@pytest.mark.slow
def test_stylegan2_lite_federates_and_samples_with_truncation(tmp_path: Path) -> None:
    data = make_slices(n_patients=12).save(tmp_path / "slices.npz")
    out = tmp_path / "run"
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={v}")]
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "2",
                                 "--local-steps", "3", "--out", str(out), *sets,
                                 "--set", "train.batch-size=8", "--set", "output.grid-per-class=2"])
    assert result.exit_code == 0, result.output
    rounds = RunDir(out).read_rounds()
    assert [r["round"] for r in rounds] == [1, 2] and all(len(r["hospitals"]) == 2 for r in rounds)
    assert (out / "samples" / "round-0002.png").exists() and (out / "curves.png").exists()
    result = runner.invoke(app, ["sample", "--run", str(out), "--n", "4", "--truncation", "0.7",
                                 "--out", str(tmp_path / "s"), "--format", "npz"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["truncation"] == 0.7
    refused = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "1",
                                  "--out", str(tmp_path / "dp"), *sets, "--set", "dp.noise-multiplier=1.0"])
    assert refused.exit_code != 0 and "model.mbstd-group=0" in refused.output


def test_truncation_is_refused_for_a_model_without_it(tmp_path: Path) -> None:
    from fedsynth.commands.common import CommandError
    from fedsynth.synthesis.sample import sample_images
    from fedsynth.server.bookkeeping import build_global_models, record_round

    cfg = RunConfig.from_overrides({"model.width": 4, "data.image-size": 32, "data.class-names": "a,b",
                                    "output.run-dir": str(tmp_path / "run")})
    run = RunDir(cfg.output.run_dir)
    run.root.mkdir(parents=True)
    run.config_path.write_text(cfg.to_yaml())
    gen, disc = build_global_models(cfg)
    record_round(run, cfg, 0, gen, disc, report={}, seconds=0.0)
    with pytest.raises(CommandError, match="no truncation trick"):
        sample_images(run, n=2, label=None, round_="last", seed=0, truncation=0.7)
