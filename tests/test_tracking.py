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
    tracker = RunTracker(run, cfg)
    for round_ in (1, 2, 3, 4):
        record = _record(round_, d_loss=1.0 + round_)
        _write_round(run, record)
        if round_ < 4:
            tracker.round(record)
    # The server died after writing round 4 (checkpoint, rounds.jsonl) and before logging it.
    tracker.close("failed")
    tracker = RunTracker(run, cfg, resumed_after=4)
    record = _record(5, d_loss=6.0)
    _write_round(run, record)
    tracker.round(record)
    tracker.close("finished")

    events = read_tensorboard(run.root)
    assert [(e.step, e.value) for e in events.Scalars("d-loss/hospital-a")] == [(r, 1.0 + r) for r in range(1, 6)]
    assert "d-loss/hospital-b" not in events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("epsilon-rdp/hospital-b")] == pytest.approx([1.5 * r for r in range(1, 6)])
    assert [e.value for e in events.Scalars("round/rejected")] == [1.0] * 5
    assert [e.value for e in events.Scalars("validation-fd/all")] == [11.0, 10.0, 9.0, 8.0, 7.0]
    assert [(e.step, e.width, e.height) for e in events.Images("samples")] == [(r, 30, 20) for r in range(1, 6)]
    config = events.Tensors("config/text_summary")
    assert b"latent-dim" in config[-1].tensor_proto.string_val[0]


def test_an_unreachable_tracking_server_is_reported_and_the_run_goes_on(tmp_path: Path, caplog) -> None:
    pytest.importorskip("mlflow")
    run = RunDir(tmp_path / "run")
    # Port 9 on loopback: nothing listens there, so every request is refused at once.
    cfg = RunConfig().with_overrides({"output.mlflow": "http://127.0.0.1:9"})
    tracker = RunTracker(run, cfg)
    record = _record(1, d_loss=0.5)
    _write_round(run, record)
    tracker.round(record)
    tracker.close("finished")
    assert "MLflow logging failed" in caplog.text and "the run goes on" in caplog.text
    assert [e.value for e in read_tensorboard(run.root).Scalars("d-loss/hospital-a")] == [0.5]


def test_a_local_store_is_absolute_and_keeps_its_artifacts_beside_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # the config makes a local store absolute where the command runs, not where the server runs
    def store(value: str) -> str:
        return RunConfig().with_overrides({"output.mlflow": value}).output.mlflow

    assert store("mlruns") == str(tmp_path / "mlruns")
    assert store((tmp_path / "m2").as_uri()) == str(tmp_path / "m2")
    assert store("file:m3") == str(tmp_path / "m3")
    assert store("sqlite:///db/runs.db") == f"sqlite:///{tmp_path / 'db' / 'runs.db'}"
    assert store("http://tracking:5000") == "http://tracking:5000"
    uri, artifacts = mlflow_store(store("mlruns"))
    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert mlflow_store(store("sqlite:///db/runs.db"))[1] == (tmp_path / "db" / "artifacts").as_uri()
    assert mlflow_store("http://tracking:5000") == ("http://tracking:5000", None)


def test_mlflow_asked_for_but_not_installed_is_one_line_before_anything_starts(tmp_path: Path, monkeypatch) -> None:
    for module in ("mlflow", "mlflow.tracking"):  # importing them now raises ImportError
        monkeypatch.setitem(sys.modules, module, None)
    data = make_slices(n_patients=4).save(tmp_path / "slices.npz")
    result = CliRunner().invoke(app, ["simulate", "--data", str(data), "--out", str(tmp_path / "run"),
                                      "--set", "output.mlflow=mlruns"])
    assert result.exit_code != 0
    assert "output.mlflow" in result.output and "fedsynth[mlflow]" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_tracking_json_names_the_mlflow_run_so_resume_continues_it(tmp_path: Path) -> None:
    """Also: a run that stopped in round 1 resumes from round 0 (its initial grid is not
    logged twice), and an interrupted run's MLflow run is marked KILLED."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from fedsynth.runs.tracking import end_interrupted

    run = RunDir(tmp_path / "run")
    cfg = RunConfig().with_overrides({"output.mlflow": str(tmp_path / "mlruns")})
    initial = _record(0, d_loss=0.0)
    _write_round(run, initial)
    tracker = RunTracker(run, cfg)
    tracker.round(initial)
    tracker.close("failed")  # round 1 never finished
    for resumed_after, rounds in ((0, (1, 2)), (2, (3,))):
        tracker = RunTracker(run, cfg, resumed_after=resumed_after)
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
    grids = [a.path for a in client.list_artifacts(saved["run_id"], "samples")]
    assert grids == [f"samples/round-000{r}.png" for r in range(4)]
    assert client.get_run(saved["run_id"]).data.params["model.name"] == "cdcgan"
    assert [e.step for e in read_tensorboard(run.root).Images("samples")] == [0, 1, 2, 3]
    end_interrupted(run)
    assert client.get_run(saved["run_id"]).info.status == "KILLED"


def test_an_audit_report_joins_the_mlflow_run_the_training_logged_to(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from fedsynth.runs.tracking import attach_files

    untracked = RunDir(tmp_path / "untracked")
    untracked.root.mkdir()
    assert attach_files(untracked, [], artifact_path="audit/x") is None
    run = RunDir(tmp_path / "run")
    tracker = RunTracker(run, RunConfig().with_overrides({"output.mlflow": str(tmp_path / "mlruns")}))
    tracker.close("finished")
    report = tmp_path / "audit" / "report.html"
    report.parent.mkdir()
    report.write_text("<html>verdicts</html>")
    where = attach_files(run, [report, report.with_name("report.pdf")], artifact_path="audit/audit")
    saved = json.loads((run.root / "tracking.json").read_text())["mlflow"]
    assert where is not None and saved["run_id"] in where
    listed = [a.path for a in MlflowClient(saved["tracking_uri"]).list_artifacts(saved["run_id"], "audit/audit")]
    assert listed == ["audit/audit/report.html"]  # a file the audit did not write is left out


def test_a_tracking_server_lost_mid_run_is_reported_once_and_the_run_goes_on(tmp_path: Path, caplog) -> None:
    """The server going away mid-run is played by making the client's calls fail (a real
    server cannot be stopped from here mid-call); the MLflow run is still ended."""
    pytest.importorskip("mlflow")
    run = RunDir(tmp_path / "run")
    tracker = RunTracker(run, RunConfig().with_overrides({"output.mlflow": str(tmp_path / "mlruns")}))
    mlflow_run = tracker._mlflow
    assert mlflow_run is not None

    def gone(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    terminated = mlflow_run.client.set_terminated
    mlflow_run.client.log_batch = gone
    for round_ in (1, 2):
        record = _record(round_, d_loss=float(round_))
        _write_round(run, record)
        tracker.round(record)
    assert caplog.text.count("MLflow logging failed") == 1 and "went away" in caplog.text
    assert [e.value for e in read_tensorboard(run.root).Scalars("d-loss/hospital-a")] == [1.0, 2.0]
    # close() on a run whose artifacts fail to upload still ends it
    ended = []
    run.save_config(RunConfig())
    mlflow_run.client.log_artifact = gone
    mlflow_run.client.set_terminated = lambda run_id, status: (ended.append(status), terminated(run_id, status))
    with pytest.raises(ConnectionError):
        mlflow_run.close("finished")
    assert ended == ["FINISHED"]
