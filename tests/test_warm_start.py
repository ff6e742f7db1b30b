"""A warm start from weights trained on public data (``train.init-from``).

A run on a "public" slice set gives the checkpoint; a DP run on other slices starts from
it: its initial generator is that checkpoint's, its privacy ledger names the checkpoint's
hash on every line and charges nothing for it, and the audit report says the guarantee
rests on the declaration. A warm start from a run on the run's own slices, or one that
does not fit the model, stops before anything trains, naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedsynth.audit.report import _warm_start
from fedsynth.cli import app
from fedsynth.core.checkpoint import file_sha256, load_checkpoint
from fedsynth.runs.rundir import RunDir

from .conftest import make_slices

pytestmark = pytest.mark.slow
runner = CliRunner()
SMALL = ["--set", "model.width=8", "--set", "output.grid-per-class=2", "--set", "train.batch-size=16",
         "--local-steps", "2", "--hospitals", "2", "--partition", "iid"]


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("warm")
    data = make_slices(n_patients=16, seed=1).save(root / "public.npz")
    result = runner.invoke(app, ["simulate", "--data", str(data), "--rounds", "1", "--out", str(root / "public-run"),
                                 *SMALL])
    assert result.exit_code == 0, result.output
    return data, root / "public-run"


def test_a_dp_run_starts_from_the_public_checkpoint_and_is_charged_only_for_its_own_steps(
    public: tuple[Path, Path], tmp_path: Path
) -> None:
    _, public_run = public
    data = make_slices(n_patients=16, seed=2).save(tmp_path / "private.npz")
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--rounds", "1", "--out", str(out),
                                 "--set", f"train.init-from={public_run}", "--set", "dp.noise-multiplier=1.0", *SMALL])
    assert result.exit_code == 0, result.output
    source = RunDir(public_run).checkpoint(1)
    start, _ = load_checkpoint(RunDir(out).checkpoint(0))
    warm, _ = load_checkpoint(source)
    assert start.keys() == warm.keys() and all(torch.equal(start[k], warm[k]) for k in warm)
    expected = {"checkpoint": str(source), "sha256": file_sha256(source), "declared_public": True}
    assert json.loads(RunDir(out).manifest_path.read_text())["warm_start"] == expected
    rows = RunDir(out).read_privacy()
    assert rows and all(row["warm_start"] == expected for row in rows)
    assert all(row["steps"] == 2 for row in rows), "one round of 2 DP steps each: nothing for the warm start"
    # what the audit report says of it, from the ledger rows it is given
    said = _warm_start(rows)
    assert file_sha256(source) in said and "declared public" in said and "nothing was charged" in said


def test_a_warm_start_from_the_runs_own_slices_is_refused(public: tuple[Path, Path], tmp_path: Path) -> None:
    data, public_run = public
    result = runner.invoke(app, ["simulate", "--data", str(data), "--rounds", "1", "--out", str(tmp_path / "run"),
                                 "--set", f"train.init-from={public_run}", *SMALL])
    assert result.exit_code != 0
    assert "train.init-from" in result.output and "itself" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_warm_start_that_does_not_fit_the_model_is_refused(public: tuple[Path, Path], tmp_path: Path) -> None:
    _, public_run = public
    data = make_slices(n_patients=16, seed=2).save(tmp_path / "private.npz")
    result = runner.invoke(app, ["simulate", "--data", str(data), "--rounds", "1", "--out", str(tmp_path / "run"),
                                 "--set", f"train.init-from={public_run}", *SMALL, "--set", "model.width=16"])
    assert result.exit_code != 0
    assert "train.init-from" in result.output and "does not fit" in result.output
    missing = runner.invoke(app, ["simulate", "--data", str(data), "--out", str(tmp_path / "run2"),
                                  "--set", f"train.init-from={tmp_path / 'nowhere'}", *SMALL])
    assert missing.exit_code != 0 and "no such run directory or checkpoint" in missing.output
