"""TensorBoard and MLflow views of a run: the same figures as the run's own records.

These tests drive the server's tracker directly on a run directory whose records are
written by hand (as the server writes them); tests/test_simulation.py and
tests/test_dp_federation.py check the same through Flower's real simulation engine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir
from fedsynth.runs.tracking import RunTracker, mlflow_store

from .conftest import make_slices


def read_tensorboard(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def _record(round_: int, d_loss: float) -> dict:
    return {
        "round": round_,
        "seconds": 2.5 * round_,
        "grid": f"samples/round-{round_:04d}.png",
        "hospitals": {
            "hospital-a": {"d-loss": d_loss, "g-loss": 0.7, "update-norm": 0.1 * round_, "steps": 3},
            # a DP hospital: no discriminator loss leaves it, so none is logged
            "hospital-b": {"g-loss": 0.9, "update-norm": 0.2},
        },
        "failures": [],
        "rejected": [{"hospital": "hospital-c", "reason": "update norm 1e3"}],
        "declined": [],
        "validation": {"fd": 12.0 - round_, "hospitals": {"hospital-a": {"fd": 11.0, "n": 20}}},
    }


def _write_round(run: RunDir, record: dict) -> None:
    run.grid(record["round"]).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30, 3), 40 * record["round"], np.uint8)).save(run.grid(record["round"]))
    if record["round"] > 0:
        run.append_round(record)
        run.append_privacy({"round": record["round"], "hospital": "hospital-b", "epsilon_rdp": 1.5 * record["round"],
                            "epsilon_prv": None})


def test_a_resumed_run_shows_each_round_once_with_the_values_of_its_records(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    cfg = RunConfig()
    tracker = RunTracker(run, cfg, first_round=1)
    for round_ in (1, 2, 3):
        record = _record(round_, d_loss=1.0 + round_)
        _write_round(run, record)
        tracker.round(record)
    tracker.close("failed")
    # The run crashed after round 3; its last checkpoint was round 1, so rounds 2 and 3 are redone.
    tracker = RunTracker(run, cfg, first_round=2)
    for round_ in (2, 3):
        record = _record(round_, d_loss=10.0 + round_)
        _write_round(run, record)
        tracker.round(record)
    tracker.close("finished")

    events = read_tensorboard(run.root)
    assert [(e.step, e.value) for e in events.Scalars("d-loss/hospital-a")] == [(1, 2.0), (2, 12.0), (3, 13.0)]
    assert "d-loss/hospital-b" not in events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("epsilon-rdp/hospital-b")] == pytest.approx([1.5, 3.0, 4.5])
    assert [e.value for e in events.Scalars("round/rejected")] == [1.0, 1.0, 1.0]
    assert [e.value for e in events.Scalars("validation-fd/all")] == [11.0, 10.0, 9.0]
    assert [(e.step, e.width, e.height) for e in events.Images("samples")] == [(1, 30, 20), (2, 30, 20), (3, 30, 20)]
    config = events.Tensors("config/text_summary")
    assert b"latent-dim" in config[-1].tensor_proto.string_val[0]


def test_an_unreachable_tracking_server_is_reported_and_the_run_goes_on(tmp_path: Path, caplog) -> None:
    pytest.importorskip("mlflow")
    run = RunDir(tmp_path / "run")
    # Port 9 on loopback: nothing listens there, so every request is refused at once.
    cfg = RunConfig().with_overrides({"output.mlflow": "http://127.0.0.1:9"})
    tracker = RunTracker(run, cfg, first_round=1)
    record = _record(1, d_loss=0.5)
    _write_round(run, record)
    tracker.round(record)
    tracker.close("finished")
    assert "MLflow logging failed" in caplog.text and "the run goes on" in caplog.text
    assert [e.value for e in read_tensorboard(run.root).Scalars("d-loss/hospital-a")] == [0.5]


def test_a_local_folder_becomes_a_sqlite_store_with_its_artifacts_beside_it(tmp_path: Path) -> None:
    uri, artifacts = mlflow_store(str(tmp_path / "mlruns"))
    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert mlflow_store((tmp_path / "m2").as_uri())[0] == f"sqlite:///{tmp_path / 'm2' / 'mlflow.db'}"
    assert mlflow_store("http://tracking:5000") == ("http://tracking:5000", None)
    # the config makes a relative folder absolute where the command runs, not where the server does
    cfg = RunConfig().with_overrides({"output.mlflow": "mlruns"})
    assert Path(cfg.output.mlflow).is_absolute()


def test_mlflow_asked_for_but_not_installed_is_one_line_before_anything_starts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    data = make_slices(n_patients=4).save(tmp_path / "slices.npz")
    result = CliRunner().invoke(app, ["simulate", "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--set", "output.mlflow=mlruns"])
    assert result.exit_code != 0
    assert "output.mlflow" in result.output and "fedsynth[mlflow]" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_tracking_json_names_the_mlflow_run_so_resume_continues_it(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = RunDir(tmp_path / "run")
    cfg = RunConfig().with_overrides({"output.mlflow": str(tmp_path / "mlruns")})
    for first, rounds in ((1, (1, 2)), (3, (3,))):
        tracker = RunTracker(run, cfg, first_round=first)
        for round_ in rounds:
            record = _record(round_, d_loss=float(round_))
            _write_round(run, record)
            tracker.round(record)
        tracker.close("finished")
    saved = json.loads((run.root / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(saved["tracking_uri"])
    assert len(client.search_runs([saved["experiment"]])) == 1
    history = client.get_metric_history(saved["run_id"], "d-loss/hospital-a")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert client.get_run(saved["run_id"]).data.params["model.name"] == "cdcgan"


def test_an_audit_report_joins_the_mlflow_run_the_training_logged_to(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from fedsynth.runs.tracking import attach_files

    untracked = RunDir(tmp_path / "untracked")
    untracked.root.mkdir()
    assert attach_files(untracked, [], artifact_path="audit/x") is None
    run = RunDir(tmp_path / "run")
    tracker = RunTracker(run, RunConfig().with_overrides({"output.mlflow": str(tmp_path / "mlruns")}), first_round=1)
    tracker.close("finished")
    report = tmp_path / "audit" / "report.html"
    report.parent.mkdir()
    report.write_text("<html>verdicts</html>")
    where = attach_files(run, [report, report.with_name("report.pdf")], artifact_path="audit/audit")
    saved = json.loads((run.root / "tracking.json").read_text())["mlflow"]
    assert where is not None and saved["run_id"] in where
    listed = [a.path for a in MlflowClient(saved["tracking_uri"]).list_artifacts(saved["run_id"], "audit/audit")]
    assert listed == ["audit/audit/report.html"]  # a file the audit did not write is left out
