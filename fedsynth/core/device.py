"""Where the work runs: the compute device (CUDA when present and asked for, CPU always
works), the CPU cores this process may really use, and whether others are using them too."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import psutil
import torch

__all__ = ["CpuWatch", "autocast_for", "available_cores", "cgroup_cpu_limit", "pick_device"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's control group in cores (``cpu.max`` of cgroup v2,
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of v1), or None where there is none: a
    container limited to 2 cores on a 64-core host has 2, whatever ``os.cpu_count()`` says."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # v2: one unified hierarchy
            for folder in (root / relative, root):
                try:
                    limit, every = (folder / "cpu.max").read_text().split()[:2]
                except (OSError, ValueError):
                    continue
                return None if limit == "max" else int(limit) / int(every)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            for folder in (root / "cpu" / relative, root / "cpu,cpuacct" / relative, root / "cpu"):
                try:
                    quota = int((folder / "cpu.cfs_quota_us").read_text())
                    period = int((folder / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                return None if quota <= 0 else quota / period
    return None


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask, capped by its control
    group's quota (rounded up), never the machine's count alone."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


class CpuWatch:
    """How much CPU processes *outside* this one and its children use on the cores this process
    may run on: sampled between calls to :meth:`foreign_cores`, from those cores' busy time minus
    this process tree's.
    Two torch processes with default threads on two cores slow each other many times over,
    so a long command says when the machine is oversubscribed."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._last = self._sample()

    def _own_seconds(self) -> float:
        mine = self._me.cpu_times()
        total = mine.user + mine.system + mine.children_user + mine.children_system  # children it reaped
        with contextlib.suppress(psutil.Error):
            for proc in self._me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    total += times.user + times.system
        return total

    def _sample(self) -> tuple[float, float, float]:
        # only the cores this process may run on: a process pinned to other cores slows it not
        per_core = psutil.cpu_times(percpu=True)
        try:
            mine = [per_core[i] for i in os.sched_getaffinity(0) if i < len(per_core)]
        except AttributeError:  # no affinity on this platform: the whole machine
            mine = per_core
        machine = sum(
            busy.user
            + busy.system
            + getattr(busy, "nice", 0.0)
            + getattr(busy, "irq", 0.0)
            + getattr(busy, "softirq", 0.0)
            for busy in mine
        )
        return time.monotonic(), machine, self._own_seconds()

    def foreign_cores(self) -> float:
        """Cores' worth of CPU other processes used since the last call (0 when none did)."""
        now = self._sample()
        wall = now[0] - self._last[0]
        machine, own = now[1] - self._last[1], now[2] - self._last[2]
        self._last = now
        if wall <= 0:
            return 0.0
        return max(0.0, (machine - own) / wall)


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` gives CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Raises
    ------
    RuntimeError
        ``cuda`` was asked for on a machine without one.
    """
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise RuntimeError("train.device is 'cuda' but no CUDA GPU is available (use auto or cpu)")
    return torch.device("cpu")


def autocast_for(device: torch.device, setting: str) -> contextlib.AbstractContextManager:
    """The mixed-precision context of a training step: bfloat16 autocast on CUDA with
    ``auto`` or ``on``, on the CPU only with ``on`` (slower there: for testing the path),
    otherwise none. bfloat16 keeps float32's range, so no loss scaling is needed."""
    if setting == "on" or (setting == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
