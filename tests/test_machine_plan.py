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


# --- the cores a process may really use, and whether others use them too ---------------------


def _cgroup(tmp_path, proc: str, files: dict[str, str]):  # noqa: ANN001, ANN202
    (tmp_path / "proc").write_text(proc)
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "fs", tmp_path / "proc"


@pytest.mark.parametrize(
    ("proc", "files", "cores"),
    [
        # cgroup v2: a container given one and a half cores, and one without a quota
        ("0::/job\n", {"job/cpu.max": "150000 100000\n"}, 1.5),
        ("0::/job\n", {"job/cpu.max": "max 100000\n"}, None),
        # cgroup v1: the cpu controller's quota over its period; -1 means none
        ("4:memory:/x\n2:cpu,cpuacct:/job\n",
         {"cpu/job/cpu.cfs_quota_us": "200000", "cpu/job/cpu.cfs_period_us": "100000"}, 2.0),
        ("2:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ],
)
def test_a_containers_cpu_quota_is_read_from_its_control_group(tmp_path, proc, files, cores) -> None:
    from fedsynth.core.device import cgroup_cpu_limit

    assert cgroup_cpu_limit(*_cgroup(tmp_path, proc, files)) == cores


def test_the_cores_used_are_capped_by_the_quota_not_the_machines_count(monkeypatch) -> None:
    from fedsynth.core import device

    monkeypatch.setattr(device.os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: 1.5)
    assert device.available_cores() == 2  # a quota of 1.5 cores runs two threads, not 64
    monkeypatch.setattr(device, "cgroup_cpu_limit", lambda: None)
    assert device.available_cores() == 64


BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def _foreign_busy(seconds: float) -> None:
    """A busy loop that is not this process's descendant (its parent exits at once)."""
    import subprocess
    import sys

    subprocess.run(["bash", "-c", f"{sys.executable} -c '{BUSY.format(seconds=seconds)}' >/dev/null 2>&1 &"],
                   check=True)


@pytest.mark.slow
def test_other_processes_cpu_is_told_apart_from_this_process_trees() -> None:
    import subprocess
    import sys
    import time

    from fedsynth.core.device import CpuWatch

    watch = CpuWatch()
    time.sleep(1.5)
    baseline = watch.foreign_cores()
    child = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=2)])  # ours: not foreign
    time.sleep(1.5)
    with_child = watch.foreign_cores()
    child.wait()
    _foreign_busy(2)
    time.sleep(1.5)
    with_stranger = watch.foreign_cores()
    assert with_child < baseline + 0.4
    assert with_stranger > baseline + 0.6


@pytest.mark.slow
def test_the_progress_line_says_when_the_machine_is_oversubscribed(tmp_path, monkeypatch) -> None:
    import time

    from fedsynth.commands import progress
    from fedsynth.engine.launcher import RunOutcome

    monkeypatch.setattr(progress, "SAMPLE_SECONDS", 0.5)
    cfg = RunConfig.from_overrides({"federation.rounds": 1})
    run = RunDir(tmp_path / "run")

    def engine(on_poll):  # noqa: ANN001, ANN202 - a run in which nothing trains; a stranger takes a core
        _foreign_busy(3)
        for _ in range(10):
            time.sleep(0.25)
            on_poll()
        run.set_status("finished")
        return RunOutcome(run.status(), 0, tmp_path / "flower.log")

    with progress.console.capture() as captured:
        assert progress.run_with_progress(cfg, run, engine)
    assert "machine oversubscribed: other processes use" in captured.get()
