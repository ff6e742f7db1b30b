"""Local training: a round of GAN steps moves the generator toward the hospital's data,
reproducibly, and keeps the hospital's private state between rounds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsynth.client.hospital import HospitalSite, run_local_round
from fedsynth.models.training import BatchSource, make_optimizers, train_round
from fedsynth.runs.config import RunConfig
from fedsynth.models import build_gan
from fedsynth.models.sampling import generate
from fedsynth.core.weights import exchanged_state

from .conftest import make_slices


def _cfg(**overrides: object) -> RunConfig:
    base = {"data.image-size": 32, "train.local-steps": 60, "train.batch-size": 16, "train.device": "cpu",
            "train.lr-g": 1e-3, "train.lr-d": 1e-3}
    return RunConfig.from_overrides({**base, **overrides})


import pytest


@pytest.mark.parametrize("precision", ["off", "on"])
def test_training_moves_generated_class_brightness_toward_the_data(precision: str) -> None:
    """Class 1 slices carry a bright disc; after a short round, class-1 fakes must be
    brighter at the top of their histogram than class-0 fakes, as in the real data.
    With ``train.mixed-precision=on`` (bfloat16 autocast; on the CPU here, on a GPU by
    default) the same must hold and the weights stay float32."""
    slices = make_slices(n_patients=24).only("train")
    cfg = _cfg(**{"train.local-steps": 150, "train.mixed-precision": precision})
    torch.manual_seed(0)
    gen, disc = build_gan(cfg.model, image_size=32, num_classes=2)
    opt_g, opt_d = make_optimizers(gen, disc, cfg.train)
    rng = torch.Generator().manual_seed(0)
    batches = BatchSource(torch.from_numpy(slices.as_float()), torch.from_numpy(slices.labels),
                          batch_size=16, generator=rng)
    before = generate(gen, np.zeros(64, int), seed=1).astype(float)
    stats = train_round(gen, disc, opt_g, opt_d, batches, cfg.train, generator=rng)
    assert np.isfinite([stats.d_loss, stats.g_loss]).all()
    assert stats.images_seen == 150 * 16 and stats.images_per_second > 0
    real_body = slices.images[slices.labels == 0].astype(float).mean()
    fake0 = generate(gen, np.zeros(64, int), seed=1).astype(float)
    fake1 = generate(gen, np.ones(64, int), seed=1).astype(float)
    assert abs(fake0.mean() - real_body) < abs(before.mean() - real_body)
    assert np.percentile(fake1, 99.5) > np.percentile(fake0, 99.5)
    assert all(p.dtype == torch.float32 for p in [*gen.parameters(), *disc.parameters()])


def test_local_round_is_reproducible_and_keeps_private_state(tmp_path: Path) -> None:
    data = make_slices().save(tmp_path / "h.npz")
    cfg = _cfg(**{"train.local-steps": 5})
    torch.manual_seed(0)
    gen, _ = build_gan(cfg.model, image_size=32, num_classes=2)
    start = exchanged_state(gen)

    def round_at(state_dir: str, server_round: int) -> dict[str, torch.Tensor]:
        site = HospitalSite("hospital-a", data, tmp_path / state_dir)
        return run_local_round(site, cfg, server_round=server_round, global_generator=start).generator

    first = round_at("s1", 1)
    assert all(torch.equal(first[k], v) for k, v in round_at("s2", 1).items()), "same seed, same update"
    state = tmp_path / "s1"
    assert {p.name for p in state.iterdir()} >= {"discriminator.safetensors", "optimizers.pt", "local.json"}
    # A second round starts from the stored discriminator, not a fresh one, so it differs
    # from a round run from scratch with the same round seed.
    second = round_at("s1", 2)
    fresh = round_at("s3", 2)
    assert any(not torch.equal(second[k], fresh[k]) for k in second)
    # Only the generator leaves the hospital unless discriminators are aggregated.
    site = HospitalSite("hospital-a", data, tmp_path / "s4")
    assert run_local_round(site, cfg, server_round=1, global_generator=start).discriminator is None


def test_a_round_that_averages_more_hospitals_takes_larger_steps(tmp_path: Path) -> None:
    """federation.lr-scaling=sqrt-hospitals: asked alongside three other hospitals, a
    hospital's Adam steps are sqrt(4) = 2x as large, so its generator moves about twice as
    far in a short round; with the scaling off (the default), or alone, it moves as the
    config says. A later round restores the optimizers' moments but takes that round's
    rate, not the stored one."""
    data = make_slices().save(tmp_path / "h.npz")
    cfg = _cfg(**{"train.local-steps": 2, "train.lr-g": 1e-4, "train.lr-d": 1e-4,
                  "federation.lr-scaling": "sqrt-hospitals"})
    torch.manual_seed(0)
    gen, _ = build_gan(cfg.model, image_size=32, num_classes=2)
    start = exchanged_state(gen)
    trained = [k for k, _ in gen.named_parameters()]  # not BatchNorm's running statistics

    def moved(state_dir: str, asked: int, config: RunConfig = cfg, server_round: int = 1) -> float:
        site = HospitalSite("hospital-a", data, tmp_path / state_dir)
        out = run_local_round(site, config, server_round=server_round, global_generator=start, hospitals_asked=asked)
        return float(sum(((out.generator[k] - start[k]) ** 2).sum() for k in trained) ** 0.5)

    alone, four = moved("alone", 1), moved("four", 4)
    assert 1.6 < four / alone < 2.4
    assert moved("off", 4, _cfg(**{"train.local-steps": 2, "train.lr-g": 1e-4, "train.lr-d": 1e-4})) == pytest.approx(
        alone, rel=1e-6)
    moved("four", 1, server_round=2)
    stored = torch.load(tmp_path / "four" / "optimizers.pt", weights_only=True)
    assert [g["lr"] for g in stored["generator"]["param_groups"]] == [pytest.approx(1e-4)]
