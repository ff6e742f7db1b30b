"""Shared fixtures: small slice sets built in memory, and the real data in ../shared/data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedsynth.core.device import available_cores
from fedsynth.data.phantoms import DEFAULT_HOSPITALS
from fedsynth.data.sliceset import SliceSet, assign_split_by_patient

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))
BRAIN_MRI = SHARED_DATA / "brain-tumor-mri"
CT_VOLUMES = SHARED_DATA / "ct-volumes"
# The demo's hospitals with fewer patients each, to keep the tests quick.
SMALL_HOSPITALS = tuple(replace(p, patients=5) for p in DEFAULT_HOSPITALS)
# `pytest -n auto --dist loadfile --no-loadscope-reorder` runs one worker per core, at most this many
# (each may run a Flower simulation of about 1.5 GB); plain `pytest` runs in one process.
MAX_WORKERS = 4
ALL_CORES: set[int] = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()  # Linux only


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core this process may use (not ``os.cpu_count()``)."""
    return min(available_cores(), MAX_WORKERS)


def _pin_worker_to_its_cores() -> None:
    """Each pytest-xdist worker, and every process it starts, gets its own share of the cores.
    Two torch processes spinning threads on the same two cores slow each other many times over
    (NOTES.md); pinned, each sizes its threads from its own share (``available_cores``)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(ALL_CORES)
    if worker and 1 < count <= len(cores):
        os.sched_setaffinity(0, cores[int(worker.removeprefix("gw")) :: count])


_pin_worker_to_its_cores()
# The files that take longest go first (pyproject: --no-loadscope-reorder), so that they do not
# end the run on one worker while the other idles.
RUN_FIRST = ("test_deployment.py", "test_benchmarks.py", "test_audit.py", "test_simulation.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return RUN_FIRST.index(name) if name in RUN_FIRST else len(RUN_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


@pytest.fixture(autouse=True)
def _whole_machine(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked ``whole_machine`` (a SuperLink and several SuperNodes in their own processes,
    waiting on each other with timeouts) may use every core, not just their worker's share."""
    if request.node.get_closest_marker("whole_machine") is None or not os.environ.get("PYTEST_XDIST_WORKER") \
            or not ALL_CORES:
        yield
        return
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, ALL_CORES)
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


def require(path: Path) -> Path:
    """Skip (saying why) when a folder of real data is not present on this machine."""
    if not path.exists():
        reason = f"real data not found at {path} (set FEDSYNTH_SHARED_DATA to the shared data folder)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


def make_slices(
    n_patients: int = 12,
    per_patient: int = 4,
    size: int = 32,
    classes: tuple[str, ...] = ("no_lesion", "lesion"),
    sites: tuple[str, ...] | None = None,
    seed: int = 0,
) -> SliceSet:
    """Blobs whose class decides brightness: class 1 has a bright disc, class 0 none."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    patients = np.repeat([f"p{i:03d}" for i in range(n_patients)], per_patient)
    for i in range(n):
        label = int(rng.integers(len(classes)))
        body = ((yy - size / 2) ** 2 / (0.35 * size) ** 2 + (xx - size / 2) ** 2 / (0.42 * size) ** 2) < 1
        img = body * 110.0 + rng.normal(0, 8, (size, size))
        if label:
            cy, cx = rng.uniform(0.35 * size, 0.65 * size, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (0.08 * size) ** 2] = 230
        images[i] = np.clip(img, 0, 255)
        labels[i] = label
    split = assign_split_by_patient(patients, labels, holdout_fraction=0.25, seed=seed)
    site = None
    if sites:
        owner = {p: sites[k % len(sites)] for k, p in enumerate(sorted(set(patients)))}
        site = np.array([owner[p] for p in patients])
    return SliceSet(
        images=images,
        labels=labels,
        class_names=classes,
        patient_ids=patients,
        split=split,
        source=np.array([f"synthetic-test-{i}" for i in range(n)]),
        site=site,
        meta={"patient_ids_known": True},
    )


@pytest.fixture
def slices() -> SliceSet:
    return make_slices()


@pytest.fixture
def slices_path(tmp_path: Path, slices: SliceSet) -> Path:
    return slices.save(tmp_path / "slices.npz")
