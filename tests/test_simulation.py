"""End to end through Flower's real simulation engine (SuperLink + `flwr run`), as a user runs it.

Each test federates tiny models for a few steps: these check the plumbing (run directory,
checkpoints, grids, resume, failures, sampling), not image quality.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.engine.launcher import run_simulation_engine
from fedsynth.engine.simulation import prepare_simulation
from fedsynth.core.checkpoint import load_checkpoint
from fedsynth.core.weights import AVERAGE, GENERATOR, split_model
from fedsynth.core.errors import ConfigError
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir
from fedsynth.data.sliceset import SliceSet
from fedsynth.synthesis.generator import load_generator

from .conftest import make_slices

pytestmark = pytest.mark.slow
runner = CliRunner()
TINY = ["--set", "train.batch-size=8", "--set", "model.width=8", "--set", "output.grid-per-class=4"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fedsynth simulate` for 2 rounds, then `--resume --rounds 3` to extend it."""
    root = tmp_path_factory.mktemp("sim")
    data = make_slices(n_patients=16, sites=("north", "south")).save(root / "slices.npz")
    out = root / "run"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--partition", "dirichlet:0.5",
                                 "--rounds", "2", "--local-steps", "3", "--out", str(out), *TINY,
                                 "--set", f"output.mlflow={root / 'mlruns'}"])
    assert result.exit_code == 0, result.output
    assert "round 2/2" in result.output and "finished" in result.output
    first_two = RunDir(out).read_rounds()
    result = runner.invoke(app, ["simulate", "--out", str(out), "--resume", "--rounds", "3"])
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "round 3/3" in result.output
    assert RunDir(out).read_rounds()[:2] == first_two, "resuming must not rewrite finished rounds"
    return out


def test_run_directory_holds_what_the_readme_promises(finished_run: Path) -> None:
    run = RunDir(finished_run)
    assert run.status()["state"] == "finished"
    assert run.checkpoint_rounds() == [0, 1, 2, 3]
    for round_ in range(4):
        grid = Image.open(run.grid(round_))
        assert grid.size[0] > 64 and grid.size[1] > 64
    assert (finished_run / "samples" / "real.png").is_file()
    assert run.curves_path.is_file()
    records = run.read_rounds()
    assert [r["round"] for r in records] == [1, 2, 3]
    for record in records:
        assert set(record["hospitals"]) == {"hospital-a", "hospital-b"}
        for metrics in record["hospitals"].values():
            assert metrics["steps"] == 3 and np.isfinite(metrics["d-loss"])
    cfg = run.load_config()
    assert cfg.federation.rounds == 3 and cfg.data.image_size == 32
    manifest = json.loads(run.manifest_path.read_text())
    assert manifest["data"]["privacy_unit"] == "patient"


def test_tensorboard_and_mlflow_show_what_rounds_jsonl_records_across_the_resume(finished_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    from .test_tracking import read_tensorboard

    run = RunDir(finished_run)
    records = run.read_rounds()
    events = read_tensorboard(finished_run)
    saved = json.loads((finished_run / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(saved["tracking_uri"])
    assert len(client.search_runs([saved["experiment"]])) == 1, "the resumed run continues the same MLflow run"
    mlflow_run = client.get_run(saved["run_id"])
    assert mlflow_run.info.status == "FINISHED"
    compared = 0
    for name in ("hospital-a", "hospital-b"):
        for key in ("d-loss", "g-loss", "images-per-second", "update-norm"):
            expected = [(r["round"], r["hospitals"][name][key]) for r in records]
            shown = [(e.step, e.value) for e in events.Scalars(f"{key}/{name}")]
            logged = [(m.step, m.value) for m in client.get_metric_history(saved["run_id"], f"{key}/{name}")]
            assert [s for s, _ in shown] == [s for s, _ in logged] == [1, 2, 3]
            assert [v for _, v in shown] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 events
            assert [v for _, v in logged] == [v for _, v in expected]
            compared += 1
    validation = [(r["round"], r["validation"]["fd"]) for r in records]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("validation-fd/all")] == validation
    assert [e.step for e in events.Images("samples")] == [0, 1, 2, 3]
    assert compared == 8
    assert mlflow_run.data.params["federation.rounds"] == "2"  # as started; config.yaml is the resumed one
    artifacts = {a.path for a in client.list_artifacts(saved["run_id"])}
    assert {"config.yaml", "curves.png", "checkpoints", "samples"} <= artifacts
    # the last checkpoint of each session: round 2 before the resume, round 3 after it
    assert [a.path for a in client.list_artifacts(saved["run_id"], "checkpoints")] == [
        "checkpoints/round-0002.safetensors", "checkpoints/round-0003.safetensors"
    ]


def test_every_round_is_scored_on_validation_patients_and_best_picks_the_lowest(
    finished_run: Path, tmp_path: Path,
) -> None:
    run = RunDir(finished_run)
    held = {}
    for hospital in ("hospital-a", "hospital-b"):
        slices = SliceSet.load(finished_run / "hospitals" / hospital / "slices.npz")
        validation = set(slices.patient_ids[slices.split == "validation"])
        assert not validation & set(slices.patient_ids[slices.split == "train"]), "validation patients never train"
        held[hospital] = int((slices.split == "validation").sum())
    assert sum(held.values()) > 0, "simulate keeps validation patients (simulation.validation, default 10%)"
    records = run.read_rounds()
    for record in records:
        scores = record["validation"]["hospitals"]
        assert {h for h, n in held.items() if n >= 2} == set(scores), "every hospital with validation slices scores"
        assert all(scores[h]["n"] == held[h] and np.isfinite(scores[h]["fd"]) for h in scores)
        assert np.isfinite(record["validation"]["fd"])
    best = min(records, key=lambda r: r["validation"]["fd"])["round"]
    assert run.best_round() == best
    result = runner.invoke(app, ["sample", "--run", str(finished_run), "--n", "4", "--round", "best",
                                 "--out", str(tmp_path / "best"), "--format", "npz"])
    assert result.exit_code == 0, result.output
    assert SliceSet.load(tmp_path / "best" / "synthetic.npz").meta["round"] == best


def test_global_generator_changes_every_round_and_sampling_draws_its_average(finished_run: Path) -> None:
    run = RunDir(finished_run)
    weights = [load_checkpoint(run.checkpoint(r))[0] for r in range(4)]
    gens = [split_model(w)[0] for w in weights]
    for before, after in zip(gens, gens[1:]):
        assert set(before) == set(after)
        assert any(not np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)
    # Only generator weights are federated by default: the hospitals' discriminators stay home.
    # The checkpoint also keeps the server's running average of the generator.
    assert {k.partition(".")[0] for k in weights[-1]} == {GENERATOR, AVERAGE}
    # Sampling draws from the average, which over the first rounds weighs each round's
    # generator by its number; the run was resumed after round 2 and the average went on.
    sampled = load_generator(run, 3).gen.state_dict()
    floats = [k for k, v in gens[3].items() if v.is_floating_point()]
    for k in floats:
        expected = (gens[1][k] + 2 * gens[2][k] + 3 * gens[3][k]) / 6
        torch.testing.assert_close(sampled[k], expected, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(sampled[k], gens[3][k]) for k in floats), "not the last round's generator"


def test_sample_png_and_npz(finished_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "png"
    result = runner.invoke(app, ["sample", "--run", str(finished_run), "--n", "6", "--label", "lesion",
                                 "--out", str(out), "--format", "png"])
    assert result.exit_code == 0, result.output
    files = sorted(out.glob("synthetic-*.png"))
    assert len(files) == 6 and all("lesion" in f.name for f in files)
    assert Image.open(files[0]).size == (32, 32) and (out / "grid.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["synthetic"] is True and manifest["round"] == 3
    # A second sample into the same folder would mix two samples under one manifest: refused.
    again = runner.invoke(app, ["sample", "--run", str(finished_run), "--n", "2", "--out", str(out)])
    assert again.exit_code != 0 and "already holds a sample" in again.output
    assert len(list(out.glob("synthetic-*.png"))) == 6

    result = runner.invoke(app, ["sample", "--run", str(finished_run), "--n", "10", "--round", "1",
                                 "--out", str(tmp_path / "npz"), "--format", "npz"])
    assert result.exit_code == 0, result.output
    synthetic = SliceSet.load(tmp_path / "npz" / "synthetic.npz")
    assert len(synthetic) == 10 and set(synthetic.split) == {"synthetic"}
    assert synthetic.class_counts() == {"no_lesion": 5, "lesion": 5}
    assert synthetic.meta["round"] == 1

    # The same seed and round give the same images; another round gives others.
    again = runner.invoke(app, ["sample", "--run", str(finished_run), "--n", "10", "--round", "1",
                                "--out", str(tmp_path / "again"), "--format", "npz"])
    assert again.exit_code == 0
    assert np.array_equal(SliceSet.load(tmp_path / "again" / "synthetic.npz").images, synthetic.images)


def test_sample_nifti_and_dicom_hold_the_same_images_marked_synthetic(finished_run: Path, tmp_path: Path) -> None:
    import nibabel as nib
    import pydicom

    from fedsynth.data.ingest import axial_display

    args = ["sample", "--run", str(finished_run), "--n", "5", "--round", "2", "--seed", "3"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "npz"), "--format", "npz"]).exit_code == 0
    want = SliceSet.load(tmp_path / "npz" / "synthetic.npz").images
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "nii"), "--format", "nifti"])
    assert result.exit_code == 0, result.output
    volume = nib.as_closest_canonical(nib.load(tmp_path / "nii" / "synthetic.nii.gz"))
    assert "SYNTHETIC" in volume.header["descrip"].tobytes().decode()
    data = np.asarray(volume.dataobj)
    assert np.array_equal(np.stack([axial_display(data[:, :, k]) for k in range(5)]), want)
    manifest = json.loads((tmp_path / "nii" / "manifest.json").read_text())
    assert manifest["slice_labels"] == ["no_lesion", "lesion", "no_lesion", "lesion", "no_lesion"]

    result = runner.invoke(app, [*args, "--out", str(tmp_path / "dcm"), "--format", "dicom"])
    assert result.exit_code == 0, result.output
    files = [pydicom.dcmread(f) for f in sorted((tmp_path / "dcm" / "dicom").iterdir())]
    assert len(files) == 5 and len({ds.StudyInstanceUID for ds in files}) == 1
    files.sort(key=lambda ds: int(ds.InstanceNumber))
    assert all(ds.SeriesDescription.startswith("SYNTHETIC") and "SYNTHETIC" in ds.ImageType for ds in files)
    assert all(ds.PatientID == "SYNTHETIC" for ds in files)
    assert np.array_equal(np.stack([ds.pixel_array for ds in files]), want)
    again = runner.invoke(app, [*args, "--out", str(tmp_path / "dcm"), "--format", "dicom"])
    assert again.exit_code != 0 and "already holds a sample" in again.output


def test_sample_errors_name_the_problem(finished_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", "--run", str(finished_run), "--label", "glioma", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "glioma" in result.output and "lesion" in result.output
    result = runner.invoke(app, ["sample", "--run", str(finished_run), "--round", "9", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "9" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["sample", "--run", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_a_hospital_that_fails_is_recorded_and_the_round_goes_on(tmp_path: Path) -> None:
    """Also: a spent ``federation.time-budget`` ends the run after the round in which it ran
    out (here the first of 3), as a finished run that says why it stopped early."""
    data = make_slices(n_patients=18).save(tmp_path / "slices.npz")
    run = RunDir(tmp_path / "run")
    cfg = RunConfig.from_overrides({"simulation.hospitals": 3, "federation.rounds": 3, "train.local-steps": 2,
                                    "train.batch-size": 8, "model.width": 8, "federation.min-hospitals": 2,
                                    "federation.time-budget": 0.001})
    cfg = prepare_simulation(cfg, data, run)
    (run.hospitals_dir / "hospital-c" / "slices.npz").write_bytes(b"damaged")
    outcome = run_simulation_engine(cfg, run)
    assert outcome.ok, outcome.status
    assert run.checkpoint_rounds() == [0, 1]
    assert "time-budget" in outcome.status["stopped_early"]
    record = run.read_rounds()[-1]
    assert set(record["hospitals"]) == {"hospital-a", "hospital-b"}
    assert len(record["failures"]) == 1
    assert "hospital-c" in record["failures"][0]["reason"] and "damaged" not in record["failures"][0]["reason"]


def test_a_slow_hospital_misses_rounds_and_a_late_one_joins(tmp_path: Path) -> None:
    """The rehearsals of ``simulation.slow`` and ``simulation.join``: a site slower than
    ``federation.round-timeout`` is left out of each round, named, and the run goes on; a
    site that joins at round 2 declines round 1, saying so, then trains."""
    data = make_slices(n_patients=18).save(tmp_path / "slices.npz")
    run = RunDir(tmp_path / "run")
    cfg = RunConfig.from_overrides({"simulation.hospitals": 3, "federation.rounds": 2, "train.local-steps": 2,
                                    "train.batch-size": 8, "model.width": 8, "federation.min-hospitals": 1,
                                    "federation.round-timeout": 20, "simulation.slow": "hospital-c=45",
                                    "simulation.join": "hospital-b=2"})
    cfg = prepare_simulation(cfg, data, run)
    outcome = run_simulation_engine(cfg, run)
    assert outcome.ok, outcome.status
    first, second = run.read_rounds()
    assert set(first["hospitals"]) == {"hospital-a"} and set(second["hospitals"]) == {"hospital-a", "hospital-b"}
    assert [d["hospital"] for d in first["declined"]] == ["hospital-b"] and not second["declined"]
    assert "not joined until round 2" in first["declined"][0]["reason"]
    for record in (first, second):
        [late] = record["failures"]
        assert "round-timeout" in late["reason"]
    bad = RunConfig.from_overrides({"simulation.hospitals": 3, "simulation.slow": "hospital-x=5"})
    with pytest.raises(ConfigError, match="simulation.slow: no such hospital 'hospital-x'"):
        prepare_simulation(bad, data, RunDir(tmp_path / "bad"))


def test_too_few_hospitals_stops_the_run_with_a_reason_and_keeps_round_zero(tmp_path: Path) -> None:
    data = make_slices(n_patients=12).save(tmp_path / "slices.npz")
    run = RunDir(tmp_path / "run")
    cfg = RunConfig.from_overrides({"simulation.hospitals": 2, "federation.rounds": 2, "train.local-steps": 2,
                                    "train.batch-size": 8, "model.width": 8, "federation.min-hospitals": 2})
    cfg = prepare_simulation(cfg, data, run)
    (run.hospitals_dir / "hospital-b" / "slices.npz").unlink()
    outcome = run_simulation_engine(cfg, run)
    assert not outcome.ok
    assert "min-hospitals is 2" in outcome.status["error"]
    assert run.checkpoint_rounds() == [0]


def test_bad_config_key_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    data = make_slices().save(tmp_path / "slices.npz")
    result = runner.invoke(app, ["simulate", "--data", str(data), "--out", str(tmp_path / "run"),
                                 "--set", "train.lr=0.1"])
    assert result.exit_code != 0
    assert "train.lr: unknown key" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_simulation_leaves_no_process_and_resumes(tmp_path: Path, stop: signal.Signals) -> None:
    """Ctrl-C (SIGINT) or a service manager's SIGTERM to `fedsynth simulate` ends every
    process of the run, Flower's and Ray's included, within 10 s; the run is marked
    interrupted with the command that resumes it, and resuming continues."""
    import psutil

    data = make_slices(n_patients=12).save(tmp_path / "slices.npz")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedsynth", "simulate", "--data", str(data), "--hospitals", "2",
               "--rounds", "50", "--local-steps", "2", "--out", str(out), *TINY]
    # as from a terminal: SIGINT at its default (a shell's background job, CI's for one, ignores it)
    cli = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = RunDir(out)
    deadline = time.monotonic() + 240
    while len(run.read_rounds()) < 2:
        assert cli.poll() is None and time.monotonic() < deadline, cli.stdout.read().decode() if cli.stdout else ""
        time.sleep(0.5)
    family = psutil.Process(cli.pid).children(recursive=True)
    names = " ".join(p.name() for p in family)
    assert "flower-superlink" in names or "flower-superl" in names, names
    assert any("ray" in p.name().lower() or "raylet" in " ".join(p.cmdline()) for p in family), names
    signalled = time.monotonic()
    cli.send_signal(stop)
    try:
        returncode = cli.wait(timeout=10)
    except subprocess.TimeoutExpired:  # say what was still there, for the next one to read
        states = []
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                states.append((p.pid, p.name(), p.status()))
        cli.kill()
        output = cli.stdout.read().decode() if cli.stdout else ""
        pytest.fail(f"fedsynth simulate still running 10 s after the signal; its processes then: {states}\n"
                    f"{output[-2000:]}")
    _, alive = psutil.wait_procs(family, timeout=max(0.1, 10 - (time.monotonic() - signalled)))
    assert not alive, f"still running 10 s after the signal: {[(p.pid, p.name()) for p in alive]}"
    output = cli.stdout.read().decode() if cli.stdout else ""
    assert returncode == 130, output
    status = run.status()
    assert status["state"] == "interrupted" and "--resume" in status["resume"], status
    assert "Continue with" in output and "Traceback" not in output
    last = run.last_round()
    assert last is not None and last >= 2
    load_checkpoint(run.checkpoint(last))  # the last completed round's checkpoint is whole
    result = runner.invoke(app, ["simulate", "--out", str(out), "--resume", "--rounds", str(last + 1)])
    assert result.exit_code == 0, result.output
    assert run.status()["state"] == "finished" and run.last_round() == last + 1
