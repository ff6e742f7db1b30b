"""dp-merf: each hospital releases one noisy mean embedding, the server fits the generator.

The release's sensitivity is checked by adding and removing patients; a DP federation
runs through Flower's real simulation engine and is checked for what crossed the wire
(no network weights either way), what each ledger charged (one release, whose epsilon
an independent computation from the logged noise and sensitivity reproduces), and that
the fitted generator draws the classes it was fitted to.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy.stats import norm
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.core.errors import ConfigError
from fedsynth.data.sliceset import TRAIN, SliceSet
from fedsynth.models import build_networks, get_family
from fedsynth.models.sampling import generate
from fedsynth.models.dpmerf import SENSITIVITY, RandomFeatures
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

from .conftest import make_slices

runner = CliRunner()


def _release(train, features, units):  # noqa: ANN001, ANN202 - the noiseless release as one vector
    out = get_family("dp-merf").release(features, train, units, conditional=True, noise_std=0.0, noise=None)
    return torch.cat([out["sum"].flatten(), out["count"]])


def test_one_patient_moves_the_release_by_at_most_its_sensitivity() -> None:
    train = make_slices(n_patients=10, per_patient=5).only(TRAIN)
    features = RandomFeatures(image_size=32, frequencies=64, bandwidth=0.5, seed=1)
    units = train.patient_ids.astype(str)
    full = _release(train, features, units)
    moves = []
    for patient in np.unique(units):
        keep = units != patient
        without = _release(train.subset(np.flatnonzero(keep)), features, units[keep])
        moves.append(float((full - without).norm()))
    # each patient's slices are averaged first: removing any patient, whatever its number of
    # slices, moves the release by at most sqrt(2), and the bound is nearly reached
    assert max(moves) <= SENSITIVITY + 1e-5 and max(moves) > 1.0
    # phi has norm 1 on every slice
    phi = features(torch.from_numpy(train.as_float()))
    assert torch.allclose(phi.norm(dim=1), torch.ones(len(train)), atol=1e-5)


def test_dp_merf_federates_in_one_round_and_refuses_more() -> None:
    cfg = RunConfig.from_overrides({"model.name": "dp-merf"})
    assert cfg.federation.rounds == 1
    with pytest.raises(ConfigError, match="federation.rounds"):
        RunConfig.from_overrides({"model.name": "dp-merf", "federation.rounds": 3})
    with pytest.raises(ConfigError, match="client-dp"):
        RunConfig.from_overrides({"model.name": "dp-merf", "federation.client-dp-noise-multiplier": 1.0})


@pytest.fixture(scope="module")
def merf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merf")
    data = make_slices(n_patients=36, per_patient=4).save(root / "slices.npz")
    out = root / "run"
    result = runner.invoke(app, [
        "simulate", "--data", str(data), "--hospitals", "3", "--partition", "iid", "--out", str(out),
        "--set", "model.name=dp-merf", "--set", "model.merf-frequencies=200", "--set", "model.merf-fit-steps=20",
        "--set", "train.lr-g=2e-3", "--set", "model.width=16", "--set", "dp.target-epsilon=10",
    ])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_no_network_weights_cross_the_wire_only_each_release(merf_run: Path) -> None:
    run = RunDir(merf_run)
    assert run.status()["state"] == "finished" and run.last_round() == 1
    messages = [json.loads(line) for line in (merf_run / "messages.jsonl").read_text().splitlines()]
    assert len(messages) == 3 and {m["round"] for m in messages} == {1}
    for message in messages:
        # the release only: 2 x 200 features x 2 classes, and the 2 class weights
        assert message["arrays"] == {"arrays/release.sum": [[400, 2], "float32"], "arrays/release.count": [[2], "float32"]}
    # the server asked for the release with an empty weight record and no validation round
    rounds = [json.loads(line) for line in (merf_run / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1 and "validation" not in rounds[0] and rounds[0]["fit"]["fit-steps"] == 20


@pytest.mark.slow
def test_each_hospital_is_charged_once_and_the_epsilon_follows_from_the_logged_noise(merf_run: Path) -> None:
    rows = [json.loads(line) for line in (merf_run / "privacy.jsonl").read_text().splitlines()]
    assert sorted(r["hospital"] for r in rows) == ["hospital-a", "hospital-b", "hospital-c"]
    for row in rows:
        assert row["steps"] == 1 and row["sample_rate"] == 1.0 and row["trained"]
        # the noise std the hospital added, over the release's sensitivity, is the Gaussian
        # mechanism's noise multiplier; Opacus's RDP accountant gives the ledger's epsilon back
        sigma = row["noise_std"] / row["sensitivity"]
        assert math.isclose(row["sensitivity"], math.sqrt(2))
        accountant = RDPAccountant()
        accountant.step(noise_multiplier=sigma, sample_rate=1.0)
        assert math.isclose(accountant.get_epsilon(delta=row["delta"]), row["epsilon_rdp"], rel_tol=1e-6)
        assert row["epsilon_rdp"] <= 10.0
        # the analytic Gaussian mechanism (Balle and Wang, 2018): at the claimed epsilon the
        # exact delta of this noise is no larger than the claimed delta (RDP is the looser bound)
        eps = row["epsilon_rdp"]
        exact_delta = norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * norm.cdf(-1 / (2 * sigma) - eps * sigma)
        assert exact_delta <= row["delta"]
    for name in ("hospital-a", "hospital-b", "hospital-c"):
        ledger = json.loads(RunDir(merf_run).hospitals.state(name).ledger_path.read_text())
        assert [h[1:] for h in ledger["history"]] == [[1.0, 1]]


@pytest.mark.slow
def test_a_dp_merf_run_samples_like_any_other(merf_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", "--run", str(merf_run), "--n", "8", "--label", "lesion", "--format", "npz",
                                 "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    drawn = SliceSet.load(tmp_path / "s" / "synthetic.npz")
    assert drawn.images.shape == (8, 32, 32) and set(drawn.labels) == {1}


def test_the_fitted_generator_draws_the_body_and_each_class() -> None:
    # fitted in process to a noiseless release (the federation above checks the wire and the
    # ledger); the test slices' classes differ by a small bright disc inside an ellipse
    train = make_slices(n_patients=36, per_patient=4).only(TRAIN)
    cfg = RunConfig.from_overrides({
        "model.name": "dp-merf", "model.merf-frequencies": 200, "model.merf-fit-steps": 400, "train.lr-g": 2e-3, "model.width": 16, "data.image-size": 32,
        "data.class-names": "no_lesion,lesion",
    })
    family = cfg.model.family
    torch.manual_seed(0)
    gen, features = build_networks(cfg)
    before = generate(gen, np.arange(64) % 2, seed=1).astype(float)
    released = family.release(features, train, train.patient_ids.astype(str), conditional=True, noise_std=0.0,
                              noise=None)
    fit = family.fit(gen, features, {k: v.numpy() for k, v in released.items()}, cfg)
    assert fit["fit-steps"] == 400
    labels = np.arange(64) % 2
    images = generate(gen, labels, seed=1).astype(float)

    def peak(x: np.ndarray) -> float:  # the brightest 1% inside the body
        return float(np.percentile(x[:, 8:24, 8:24].reshape(len(x), -1), 99, axis=1).mean())

    # the body is drawn where the real slices have it, on a dark background (not so before the fit)
    assert images[:, 12:20, 12:20].mean() > images[:, :4, :4].mean() + 80
    assert not before[:, 12:20, 12:20].mean() > before[:, :4, :4].mean() + 80
    # and the lesion class carries the bright disc (blurred by the kernel: about 15 grey levels
    # brighter at its peak where the real slices are 100; the unfitted generator draws no difference)
    assert peak(images[labels == 1]) > peak(images[labels == 0]) + 6
    assert abs(peak(before[labels == 1]) - peak(before[labels == 0])) < 3
