"""How `fedsynth simulate` lays hospitals on the cores: every core trains all round.

Three hospitals on two cores used to train in two waves (two, then one alone while a core
idled for a third of every round); the plan trains them all at once instead. The plan is
written into the run's config, and a user's own setting wins.
"""

from __future__ import annotations

import pytest

from fedsynth.engine import simulation
from fedsynth.engine.simulation import plan_cores, prepare_simulation
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir

from .conftest import make_slices


@pytest.mark.parametrize(
    ("hospitals", "cores", "plan"),
    [
        (1, 2, (1, 2)),  # one hospital gets both cores' threads
        (2, 2, (2, 1)),
        (3, 2, (3, 1)),  # not a multiple: all at once, sharing the cores
        (8, 2, (2, 1)),  # a multiple: four full waves of one per core
        (5, 2, (5, 1)),
        (9, 2, (2, 1)),  # more than four per core: waves (memory), the last one short
        (3, 16, (3, 5)),
    ],
)
def test_no_core_idles_for_a_whole_wave(hospitals: int, cores: int, plan: tuple[int, int]) -> None:
    assert plan_cores(hospitals, cores) == plan


def _prepared(tmp_path, monkeypatch, cores: int, **settings) -> RunConfig:
    monkeypatch.setattr(simulation, "available_cores", lambda: cores)
    data = make_slices(n_patients=18).save(tmp_path / "slices.npz")
    cfg = RunConfig.from_overrides({"simulation.hospitals": 3, **settings})
    return prepare_simulation(cfg, data, RunDir(tmp_path / "run"))


def test_the_plan_is_written_into_the_runs_config(tmp_path, monkeypatch) -> None:
    cfg = _prepared(tmp_path, monkeypatch, cores=2)
    assert (cfg.simulation.parallel_hospitals, cfg.simulation.client_cpus, cfg.train.threads) == (3, 1, 1)
    saved = RunConfig.from_yaml(RunDir(tmp_path / "run").config_path)
    assert saved.simulation.parallel_hospitals == 3 and saved.train.threads == 1


def test_a_users_own_setting_wins(tmp_path, monkeypatch) -> None:
    cfg = _prepared(tmp_path, monkeypatch, cores=2, **{"simulation.parallel-hospitals": 2})
    assert (cfg.simulation.parallel_hospitals, cfg.simulation.client_cpus) == (2, 1)
    cfg = _prepared(tmp_path / "b", monkeypatch, cores=8, **{"simulation.client-cpus": 1})
    assert (cfg.simulation.parallel_hospitals, cfg.simulation.client_cpus, cfg.train.threads) == (3, 1, 1)
