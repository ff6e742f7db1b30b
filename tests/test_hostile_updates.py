"""Hostile hospitals through Flower's real simulation engine: four simulated hospitals run
tests/hostile_client.py (fedsynth's ClientApp, then a corrupted reply): NaN weights,
a wrong-shaped tensor, 1000x the weights, and one honest update."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedsynth.engine.launcher import run_simulation_engine
from fedsynth.engine.simulation import prepare_simulation
from fedsynth.core.checkpoint import load_checkpoint
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

from .conftest import REPO, make_slices

pytestmark = pytest.mark.slow


def test_nan_wrong_shape_and_thousandfold_updates_are_rejected_and_the_model_stays_finite(tmp_path, monkeypatch) -> None:
    # The ClientApp processes Flower starts must import tests.hostile_client.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    data = make_slices(n_patients=16, size=32).save(tmp_path / "slices.npz")
    run = RunDir(tmp_path / "run")
    cfg = RunConfig.from_overrides({
        "simulation.hospitals": 4, "federation.rounds": 1, "federation.min-hospitals": 1,
        "train.local-steps": 2, "train.batch-size": 8, "model.width": 8, "output.grid-per-class": 2,
    })
    cfg = prepare_simulation(cfg, data, run)
    outcome = run_simulation_engine(cfg, run, client_app="tests.hostile_client:app")
    assert outcome.ok, outcome.status
    [record] = run.read_rounds()
    assert set(record["hospitals"]) == {"hospital-d"}, "only the honest update is averaged"
    reasons = {r["hospital"]: r["reason"] for r in record["rejected"]}
    assert "NaN" in reasons["hospital-a"]
    assert "has shape" in reasons["hospital-b"]
    assert "update norm is" in reasons["hospital-c"] and "max-update-norm" in reasons["hospital-c"]
    model, _ = load_checkpoint(run.checkpoint(1))
    initial, _ = load_checkpoint(run.checkpoint(0))
    assert all(np.isfinite(v.numpy()).all() for v in model.values())
    # The global model moved by the honest update only: far from 1000x.
    scale = max(float(np.abs(model[k].numpy()).max() / (np.abs(initial[k].numpy()).max() + 1e-12))
                for k in model if initial[k].numpy().any())
    assert scale < 10
    # Rejected replies were still recorded as received.
    assert len(run.read_messages()) == 4
