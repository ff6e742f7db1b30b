"""DP-SGD on the discriminator: per-patient sampling, only real images charged, and
epsilon accounted over every step of every round (Opacus accountants)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from torch import nn

from fedsynth.models import check_dp_discriminator
from fedsynth.models.training_dp import train_round_dp
from fedsynth.privacy import (
    PatientSampler,
    PerSampleClipper,
    PrivacyError,
    PrivacyState,
    epsilon_for,
    plan_privacy,
)
from fedsynth.client.hospital import HospitalSite, run_local_round
from fedsynth.runs.config import DPConfig, RunConfig
from fedsynth.models import build_gan
from fedsynth.core.weights import exchanged_state

from .conftest import make_slices


def test_sampler_takes_at_most_one_slice_per_patient_at_rate_q() -> None:
    ids = np.repeat([f"p{i}" for i in range(200)], 5)
    sampler = PatientSampler(ids, 0.1, torch.Generator().manual_seed(0))
    sizes = []
    for _ in range(200):
        idx = sampler.sample().numpy()
        assert len(set(ids[idx])) == len(idx), "two slices of one patient in a step"
        sizes.append(len(idx))
    assert abs(np.mean(sizes) - 20) < 1.5
    assert PatientSampler(ids, 0.0, torch.Generator()).sample().numel() == 0


def test_plan_meets_the_target_without_exceeding_it() -> None:
    plan = plan_privacy(DPConfig(target_epsilon=3.0), units=500, unit="patient", batch_size=32, planned_steps=600)
    spent = epsilon_for([(plan.noise_multiplier, plan.sample_rate, 600)], plan.delta)
    assert 0.9 * 3.0 < spent <= 3.0
    assert plan.delta == pytest.approx(min(1e-5, 1 / 5000))
    with pytest.raises(PrivacyError, match="at least 2"):
        plan_privacy(DPConfig(target_epsilon=3.0), units=1, unit="patient", batch_size=8, planned_steps=10)


@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.6, 5.0), q=st.floats(0.001, 0.5), steps=st.integers(1, 2000), more=st.integers(1, 2000))
def test_epsilon_grows_with_steps_and_falls_with_noise(sigma: float, q: float, steps: int, more: int) -> None:
    eps = epsilon_for([(sigma, q, steps)], 1e-5)
    assert epsilon_for([(sigma, q, steps), (sigma, q, more)], 1e-5) > eps
    assert epsilon_for([(sigma * 1.5, q, steps)], 1e-5) < eps


def test_batchnorm_discriminator_is_refused_before_training() -> None:
    bad = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    with pytest.raises(PrivacyError, match="BatchNorm"):
        check_dp_discriminator(bad)
    _, good = build_gan(RunConfig().model, image_size=32, num_classes=2)
    check_dp_discriminator(good)


def _one_dp_step(sample_rate: float, clip: float, sigma: float = 1e-12) -> dict[str, torch.Tensor]:
    """The discriminator's weight change after one DP step, with SGD(lr=1) and (by
    default) no noise. The public noise is seeded the same way every call."""
    slices = make_slices(n_patients=16).only("train")
    cfg = RunConfig.from_overrides({"data.image-size": 32, "train.local-steps": 1, "train.batch-size": 8})
    torch.manual_seed(0)
    gen, disc = build_gan(cfg.model, image_size=32, num_classes=2)
    before = copy.deepcopy(disc.state_dict())
    plan = plan_privacy(DPConfig(noise_multiplier=sigma, max_grad_norm=clip), units=12, unit="patient",
                        batch_size=8, planned_steps=1)
    plan = plan.__class__(**{**plan.__dict__, "sample_rate": sample_rate})
    rng = torch.Generator().manual_seed(1)
    sampler = PatientSampler(slices.patient_ids, sample_rate, rng)
    train_round_dp(gen, PerSampleClipper(disc, clip), torch.optim.SGD(gen.parameters(), lr=0.0),
                   torch.optim.SGD(disc.parameters(), lr=1.0), torch.from_numpy(slices.as_float()),
                   torch.from_numpy(slices.labels), sampler, plan, cfg.train, num_classes=2, generator=rng)
    return {k: disc.state_dict()[k] - before[k] for k in before}


def test_the_public_random_stream_does_not_depend_on_how_many_patients_were_sampled() -> None:
    """The latent codes, fake labels and the fake term's augmentation come from the public
    stream, outside the DP analysis: had the real slices' augmentation drawn from it too,
    every later public draw would depend on the private Poisson batch size."""
    slices = make_slices(n_patients=16).only("train")
    cfg = RunConfig.from_overrides({"data.image-size": 32, "train.local-steps": 3, "train.batch-size": 8})
    plan = plan_privacy(DPConfig(noise_multiplier=1.0, max_grad_norm=1.0), units=12, unit="patient",
                        batch_size=8, planned_steps=3)
    after = []
    for rate in (0.0, 0.5, 1.0):  # no slices, some, every patient's
        torch.manual_seed(0)
        gen, disc = build_gan(cfg.model, image_size=32, num_classes=2)
        public = torch.Generator().manual_seed(7)
        sampler = PatientSampler(slices.patient_ids, rate, torch.Generator().manual_seed(1))
        train_round_dp(gen, PerSampleClipper(disc, 1.0), torch.optim.SGD(gen.parameters(), lr=0.0),
                       torch.optim.SGD(disc.parameters(), lr=0.1), torch.from_numpy(slices.as_float()),
                       torch.from_numpy(slices.labels), sampler, plan, cfg.train, num_classes=2, generator=public)
        after.append(torch.rand(4, generator=public))
    assert cfg.train.augment != "none", "the default augments real slices: the case this guards"
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], after[2])


def test_only_real_images_are_clipped_the_fake_term_passes_unclipped() -> None:
    fake_only = _one_dp_step(sample_rate=0.0, clip=1e-6)  # no real slices: the update is the fake gradient
    fake_norm = torch.cat([v.flatten() for v in fake_only.values()]).norm()
    assert fake_norm > 1e-3, "the fake term's gradient is far larger than C and must not be clipped"
    with_real_tiny_clip = _one_dp_step(sample_rate=1.0, clip=1e-6)
    diff = torch.cat([(with_real_tiny_clip[k] - fake_only[k]).flatten() for k in fake_only]).norm()
    # 12 real slices, each clipped to 1e-6, divided by the expected batch: a tiny change.
    assert diff <= 12 * 1e-6 / 8 * 1.01
    with_real = _one_dp_step(sample_rate=1.0, clip=10.0)
    assert torch.cat([(with_real[k] - fake_only[k]).flatten() for k in fake_only]).norm() > 100 * diff


def test_privacy_history_survives_rounds_and_restarts(tmp_path: Path) -> None:
    data = make_slices(n_patients=20).save(tmp_path / "h.npz")
    cfg = RunConfig.from_overrides({"data.image-size": 32, "train.local-steps": 3, "train.batch-size": 4,
                                    "model.width": 8, "federation.rounds": 4, "dp.noise-multiplier": 1.2})
    gen, _ = build_gan(cfg.model, image_size=32, num_classes=2)
    site = HospitalSite("hospital-a", data, tmp_path / "state")
    reports = [run_local_round(site, cfg, server_round=r, global_generator=exchanged_state(gen)).privacy
               for r in (1, 2)]
    # A fresh process only has the state folder: the history is read back from it.
    state = PrivacyState.load(tmp_path / "state" / "privacy.json")
    assert state.steps == 6 and reports[1]["dp-steps"] == 6
    q = reports[0]["dp-sample-rate"]
    assert q == pytest.approx(4 / 15)  # 15 training patients, batch 4
    assert reports[1]["dp-epsilon"] == pytest.approx(epsilon_for([(1.2, q, 6)], reports[1]["dp-delta"]))
    assert reports[1]["dp-epsilon"] > reports[0]["dp-epsilon"]
    assert reports[1]["dp-unit"] == "patient"


def test_a_hospital_over_budget_declines_and_says_why(tmp_path: Path) -> None:
    data = make_slices(n_patients=20).save(tmp_path / "h.npz")
    one_round = epsilon_for([(1.0, 1.0, 2)], 1e-5)
    two_rounds = epsilon_for([(1.0, 1.0, 4)], 1e-5)
    cfg = RunConfig.from_overrides({"data.image-size": 32, "train.local-steps": 2, "train.batch-size": 64,
                                    "model.width": 8, "dp.noise-multiplier": 1.0,
                                    "dp.target-epsilon": (one_round + two_rounds) / 2})
    gen, _ = build_gan(cfg.model, image_size=32, num_classes=2)
    site = HospitalSite("hospital-a", data, tmp_path / "state")
    first = run_local_round(site, cfg, server_round=1, global_generator=exchanged_state(gen))
    assert first.declined is None and first.generator is not None
    second = run_local_round(site, cfg, server_round=2, global_generator=exchanged_state(gen))
    assert second.generator is None and "privacy budget" in (second.declined or "")
    assert second.privacy["dp-epsilon"] == pytest.approx(one_round)


@pytest.mark.parametrize("conditioning", ["projection", "ac"])
def test_clipped_sum_equals_opacus_per_sample_clipping(conditioning: str) -> None:
    """PerSampleClipper's one-pass sum matches clipping Opacus's per-sample gradients."""
    cfg = RunConfig.from_overrides({"model.conditioning": conditioning, "model.width": 8})
    torch.manual_seed(0)
    _, disc = build_gan(cfg.model, image_size=32, num_classes=3)
    twin = copy.deepcopy(disc)
    x, y = torch.randn(10, 1, 32, 32), torch.randint(3, (10,))

    reference = GradSampleModule(disc, loss_reduction="sum")
    out = reference(x, y)
    (out.adv.squeeze(-1) ** 2 + (out.class_logits.logsumexp(1) if out.class_logits is not None else 0)).sum().backward()
    flat = torch.cat([p.grad_sample.reshape(10, -1) for p in disc.parameters()], dim=1)
    clip = flat.norm(dim=1).median().item()  # about half the samples are clipped
    scale = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    assert (scale < 1).any() and (scale == 1).any(), "the test needs clipped and unclipped samples"
    expected = [torch.einsum("i,i...->...", scale, p.grad_sample) for p in disc.parameters()]

    clipper = PerSampleClipper(twin, max_grad_norm=clip)
    xi = x.clone().requires_grad_(True)
    out = clipper(xi, y)
    per_sample = out.adv.squeeze(-1) ** 2 + (out.class_logits.logsumexp(1) if out.class_logits is not None else 0)
    clipper.backward_real(per_sample, xi)
    got = clipper.clipped_sum()
    for want, p in zip(expected, twin.parameters(), strict=True):
        assert torch.allclose(got[p], want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_noise_has_std_sigma_c_over_the_expected_batch_and_is_not_reproducible() -> None:
    """Two runs of the same step with the same seeds: the public part is identical, the DP
    noise differs (it comes from the OS, not the run seed) with std sigma*C/B each."""
    first = _one_dp_step(sample_rate=0.0, clip=0.5, sigma=2.0)
    second = _one_dp_step(sample_rate=0.0, clip=0.5, sigma=2.0)
    diff = torch.cat([(first[k] - second[k]).flatten() for k in first])
    assert diff.abs().max() > 0, "the DP noise must not repeat when a round is re-run"
    expected_std = 2**0.5 * 2.0 * 0.5 / 8  # two independent draws; expected batch 8
    assert float(diff.std()) == pytest.approx(expected_std, rel=0.05)


def test_a_new_run_on_the_same_data_spends_from_the_same_budget(tmp_path: Path) -> None:
    """Deployment keeps one ledger per data set: run 2 plans sigma for what run 1 left."""
    data = make_slices(n_patients=40).save(tmp_path / "h.npz")
    cfg = RunConfig.from_overrides({"data.image-size": 32, "train.local-steps": 3, "train.batch-size": 4,
                                    "model.width": 8, "federation.rounds": 2, "dp.target-epsilon": 4.0})
    gen, _ = build_gan(cfg.model, image_size=32, num_classes=2)
    ledger = tmp_path / "privacy" / "data.json"
    run1 = HospitalSite("hospital-a", data, tmp_path / "run1", privacy_path=ledger)
    first = run_local_round(run1, cfg, server_round=1, global_generator=exchanged_state(gen)).privacy
    run2 = HospitalSite("hospital-a", data, tmp_path / "run2", privacy_path=ledger)
    reports = [run_local_round(run2, cfg, server_round=r, global_generator=exchanged_state(gen)) for r in (1, 2)]
    assert all(r.declined is None for r in reports)
    last = reports[-1].privacy
    assert last["dp-noise-multiplier"] > first["dp-noise-multiplier"], "less budget left: more noise"
    assert last["dp-steps"] == 9 and first["dp-epsilon"] < last["dp-epsilon"] <= 4.0
    state = PrivacyState.load(ledger)
    assert set(state.plans) == {"run1", "run2"}
    assert last["dp-epsilon"] == pytest.approx(state.epsilon())


def test_a_budget_no_noise_can_meet_is_declined_with_the_reason(tmp_path: Path) -> None:
    data = make_slices(n_patients=8).save(tmp_path / "h.npz")
    cfg = RunConfig.from_overrides({"data.image-size": 32, "train.local-steps": 50, "train.batch-size": 64,
                                    "model.width": 8, "dp.target-epsilon": 0.01})
    gen, _ = build_gan(cfg.model, image_size=32, num_classes=2)
    result = run_local_round(HospitalSite("hospital-b", data, tmp_path / "state"), cfg, server_round=1,
                             global_generator=exchanged_state(gen))
    assert result.generator is None and "cannot be met" in (result.declined or "")
    assert not (tmp_path / "state" / "privacy.json").exists(), "nothing was spent"


def test_the_private_classifiers_step_is_noise_of_std_sigma_c_plus_clipped_sums_over_the_expected_batch() -> None:
    """The audit's DP-SGD classifier (the private baseline): with no patient sampled, a
    step's gradient is Gaussian noise of std sigma*C / expected batch; with every patient
    sampled and no noise, the gradient is the sum of per-sample gradients each clipped to
    C, over the expected batch, so its norm is at most n*C / expected batch."""
    from fedsynth.privacy.accounting import PrivacyPlan
    from fedsynth.privacy.classifier import train_private_classifier

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (12, 1, 16, 16), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 2, 12))

    def last_gradient(sigma: float, rate: float) -> torch.Tensor:
        plan = PrivacyPlan(noise_multiplier=sigma, sample_rate=rate, delta=1e-5, max_grad_norm=0.5,
                           expected_batch=8, units=12, unit="slice", planned_steps=1, target_epsilon=0.0)
        net, _, steps, _ = train_private_classifier(images, labels, np.arange(12), plan, n_classes=2, init_seed=0,
                                                    device=torch.device("cpu"),
                                                    generator=torch.Generator().manual_seed(1))
        assert steps == 1
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    noise = last_gradient(3.0, 0.0)  # nobody sampled: noise alone
    assert len(noise) > 10_000 and noise.mean().abs() < 0.005
    assert float(noise.std()) == pytest.approx(3.0 * 0.5 / 8, rel=0.03)
    clipped = last_gradient(0.0, 1.0)  # everyone sampled, no noise
    assert 0 < float(clipped.norm()) <= 12 * 0.5 / 8 + 1e-6
