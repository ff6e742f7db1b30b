"""The Family contract: a new model family is one module and a registry entry. A toy family
(tests/toy_family.py, a one-layer generator) registered from outside the package, the way
FEDSYNTH_FAMILIES lets another package add one, is listed, trained through Flower's real
simulation engine, sampled and audited, with no other module touched."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.core.errors import ConfigError
from fedsynth.data.sliceset import SliceSet
from fedsynth.models import FAMILIES, build_gan, check_dp_discriminator, get_family
from fedsynth.models.registry import PLUGINS_VARIABLE
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

from .conftest import REPO, make_slices

runner = CliRunner()
TOY = "one-layer"


@pytest.fixture
def toy_family(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The toy family registered here and, through the environment, in every process a
    simulation starts; removed again afterwards (other tests iterate over the families)."""
    monkeypatch.setenv(PLUGINS_VARIABLE, "tests.toy_family")
    monkeypatch.setenv("PYTHONPATH", f"{REPO}:{__import__('os').environ.get('PYTHONPATH', '')}")
    sys.modules.pop("tests.toy_family", None)
    importlib.import_module("tests.toy_family")
    yield TOY
    FAMILIES.pop(TOY, None)


def test_an_unknown_family_is_a_one_line_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"model.name: unknown model family \(choose from cdcgan, .*medscangan"):
        RunConfig.from_overrides({"model.name": "stylegan9"})


def test_a_family_registered_from_outside_is_a_valid_model_name(toy_family: str) -> None:
    cfg = RunConfig.from_overrides({"model.name": toy_family})
    assert cfg.model.family is get_family(toy_family)
    assert cfg.train.objective == "hinge", "the default loss comes from the family"
    gen, disc = build_gan(cfg.model, image_size=32, num_classes=2)
    check_dp_discriminator(disc)  # cdcgan's discriminator: DP-ready, so the toy family is too
    listed = runner.invoke(app, ["models", "--size", "32"], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and toy_family in listed.output and "one-layer generator" in listed.output


@pytest.mark.slow
def test_a_toy_family_trains_through_flower_samples_and_is_audited(toy_family: str, tmp_path: Path) -> None:
    data = make_slices(n_patients=48, size=32).save(tmp_path / "slices.npz")
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "2",
                                 "--local-steps", "3", "--out", str(out), "--set", f"model.name={toy_family}",
                                 "--set", "train.batch-size=8", "--set", "output.grid-per-class=4"])
    assert result.exit_code == 0, result.output
    run = RunDir(out)
    assert run.checkpoint_rounds() == [0, 1, 2]
    assert run.grid(2).is_file(), "the server drew the toy family's round grid"
    assert {r["round"] for r in run.read_rounds()} == {1, 2}
    assert all(set(r["hospitals"]) == {"hospital-a", "hospital-b"} for r in run.read_rounds())

    sample = runner.invoke(app, ["sample", "--run", str(out), "--n", "6", "--format", "npz",
                                 "--out", str(tmp_path / "sample")])
    assert sample.exit_code == 0, sample.output
    drawn = SliceSet.load(tmp_path / "sample" / "synthetic.npz")
    assert drawn.images.shape == (6, 32, 32) and np.array_equal(drawn.labels, np.arange(6) % 2)

    audit = runner.invoke(app, ["audit", "--run", str(out), "--no-utility", "--no-pdf",
                                "--encoder-steps", "20", "--classifier-steps", "20", "--out", str(tmp_path / "audit")])
    assert audit.exit_code == 0, audit.output
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["context"]["model"]["name"] == toy_family
    assert (tmp_path / "audit" / "report.html").is_file()
