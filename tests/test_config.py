"""Run configuration: one schema for YAML, --set overrides and Flower's run config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsynth.engine.launcher import flower_app_pyproject
from fedsynth.runs.config import ConfigError, RunConfig, parse_overrides


def test_yaml_with_overrides_round_trips_through_flower_run_config(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  local-steps: 7\nmodel:\n  width: 16\n")
    cfg = RunConfig.from_yaml(path, {"federation.rounds": 3})
    assert (cfg.train.local_steps, cfg.model.width, cfg.federation.rounds) == (7, 16, 3)
    # Flower passes the config as flat dotted keys; the round trip must be lossless.
    assert RunConfig.from_run_config(cfg.to_run_config()) == cfg
    assert RunConfig.from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg


def test_every_bad_key_is_named_in_one_message_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  local-step: 7\n  batch-size: -3\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_yaml(path)
    message = str(err.value)
    assert str(path) in message
    assert "train.local-step: unknown key (did you mean train.local-steps?)" in message
    assert "train.batch-size" in message
    assert "\n" not in message


def test_missing_and_malformed_yaml_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        RunConfig.from_yaml(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        RunConfig.from_yaml(broken)


def test_partition_spec_is_validated() -> None:
    for good in ("dirichlet:0.5", "dirichlet:0.5,min=20", "iid", "by-site"):
        assert RunConfig.from_overrides({"simulation.partition": good}).simulation.partition == good
    for bad in ("dirichlet:0", "dirichlet:x", "random", "dirichlet:0.5,min=0", "dirichlet:0.5,20"):
        with pytest.raises(ConfigError, match="simulation.partition"):
            RunConfig.from_overrides({"simulation.partition": bad})


def test_set_values_are_read_as_yaml_scalars() -> None:
    assert parse_overrides(["train.local-steps=10", "train.device=cpu", "federation.aggregate-discriminator=true"]) == {
        "train.local-steps": 10, "train.device": "cpu", "federation.aggregate-discriminator": True,
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.local-steps"])


def test_flower_app_defaults_in_pyproject_match_the_config_schema() -> None:
    """`flwr run .` from the repository must see exactly fedsynth's config keys."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    committed = pyproject["tool"]["flwr"]["app"]
    generated = flower_app_pyproject(RunConfig())["tool"]["flwr"]["app"]
    assert committed["components"] == generated["components"]
    assert set(committed["config"]) == set(generated["config"])
    assert RunConfig.from_run_config(committed["config"]) == RunConfig.from_run_config(generated["config"])


def test_on_and_off_are_words_not_booleans(tmp_path: Path) -> None:
    """YAML reads `off` as False: `--set train.mixed-precision=off` and a file saying
    `validation-score: off` must still mean the documented values."""
    from fedsynth.runs.config import parse_overrides

    cfg = RunConfig.from_overrides(parse_overrides(["train.mixed-precision=off", "federation.validation-score=on"]))
    assert (cfg.train.mixed_precision, cfg.federation.validation_score) == ("off", "on")
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  validation-score: off\n")
    assert RunConfig.from_yaml(path).federation.validation_score == "off"
    assert RunConfig.from_yaml(path).to_yaml().count("validation-score: 'off'") == 1
