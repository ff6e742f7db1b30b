"""What every benchmark shares: the machine it ran on, the data, and writing results."""

from __future__ import annotations

import json
import shutil
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.core.files import write_json_atomic

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("FEDSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))
BRAIN_MRI = SHARED / "brain-tumor-mri"
FEDSYNTH = str(Path(sys.executable).parent / "fedsynth")
# Subprocesses: no telemetry, no update check, wide lines in captured logs.
ENV = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", COLUMNS="200")


def machine() -> dict[str, Any]:
    """The machine and versions a figure was measured on."""
    import flwr
    import opacus

    from fedsynth import __version__

    return {
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "flwr": flwr.__version__,
        "opacus": opacus.__version__, "fedsynth": __version__, "when": time.strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(m: dict[str, Any]) -> str:
    gpu = f"GPU {m['gpu']}" if m["gpu"] else "no GPU"
    return (f"{m['cpus']} CPUs ({m['processor']}), {gpu}; Python {m['python']}, torch {m['torch']}, "
            f"flwr {m['flwr']}, opacus {m['opacus']}, fedsynth {m['fedsynth']}; {m['when']}")


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every value (the machines are noisy: never one number alone)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def prepare_brain(out: Path, size: int, *, limit: int | None = None, seed: int = 0, reuse_from: Path | None = None) -> Path:
    """The brain MRI slices as a de-duplicated slice set (``fedsynth prepare``), optionally
    subsampled to ``limit`` slices (keeping the train/holdout split). Reused if present, in
    ``out`` or as prepared by an earlier benchmark in ``reuse_from``."""
    from fedsynth.data.sliceset import SliceSet

    path = out / f"brain-{size}px{'' if limit is None else f'-{limit}'}.npz"
    if path.exists():
        return path
    if not BRAIN_MRI.exists():
        raise SystemExit(f"the brain MRI slices are not at {BRAIN_MRI} (set FEDSYNTH_SHARED_DATA to the shared data folder)")
    full = out / f"brain-{size}px.npz"
    earlier = reuse_from / full.name if reuse_from is not None else None
    if not full.exists() and earlier is not None and earlier.exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(earlier, full)
    if not full.exists():
        run([FEDSYNTH, "prepare", str(BRAIN_MRI), "--out", str(full), "--size", str(size)])
    if limit is None:
        return full
    slices = SliceSet.load(full)
    pick = np.sort(np.random.default_rng(seed).choice(len(slices), size=min(limit, len(slices)), replace=False))
    return slices.subset(pick).save(path)


def phantom_slices(size: int, *, classes: str = "lesion"):  # type: ignore[no-untyped-def]
    """The phantom CT hospitals (``fedsynth.data.phantoms``) as one slice set with its split.

    ``classes``: ``lesion`` keeps the slices through the liver, classed lesion / no lesion;
    ``site`` keeps every slice, classed by the hospital (scanner) it came from."""
    import tempfile
    from dataclasses import replace

    from fedsynth.data.phantoms import LESION, LIVER, write_phantom_hospitals
    from fedsynth.data.volumes import MaskClasses, ingest_volumes

    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_hospitals(tmp, seed=0)
        if classes == "lesion":
            slices, _ = ingest_volumes(tmp, size=size, classes=MaskClasses("no_lesion", (("lesion", (LESION,)),)),
                                       keep_slices_with=[LIVER])
            return slices
        slices, _ = ingest_volumes(tmp, size=size)
    assert slices.site is not None
    names = tuple(sorted(set(slices.site.tolist())))
    return replace(slices, labels=np.searchsorted(names, slices.site).astype(np.int64), class_names=names)


def run(cmd: list[str], *, cwd: Path | None = None, log: Path | None = None) -> float:
    """Run a fedsynth command; its output goes to ``log``. Returns wall seconds.

    Raises SystemExit naming the command and the log's tail when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise SystemExit(f"benchmark step failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.perf_counter() - start


def forget_other_config(work: Path, config: dict[str, Any], progress, label: str, files: tuple[str, ...] = ()) -> None:  # type: ignore[no-untyped-def]
    """Start ``work`` afresh (every folder, and ``files``) when it holds runs of another
    configuration than ``config``; then record ``config`` as its own."""
    work.mkdir(parents=True, exist_ok=True)
    fingerprint = work / "config.json"
    wanted = json.loads(json.dumps(config))
    if fingerprint.exists() and json.loads(fingerprint.read_text()) != wanted:
        progress(f"{label}: {work} holds arms of another configuration; training them again")
        for stale in [*work.iterdir()]:
            if stale.is_dir():
                shutil.rmtree(stale)
        for name in files:
            (work / name).unlink(missing_ok=True)
    fingerprint.write_text(json.dumps(wanted))


def progress(message: str) -> None:
    """A benchmark's progress line on stderr, with the wall-clock time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def copy_last_grids(runs: dict[str, dict[str, Any]], out: Path) -> None:
    """``OUT/grids/real.png`` and, per arm, the last round's sample grid as ``ARM.png``."""
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    first = next(iter(runs.values()))["run"]
    shutil.copyfile(first / "samples" / "real.png", grids / "real.png")
    for arm, info in runs.items():
        last = sorted((info["run"] / "samples").glob("round-*.png"))[-1]
        shutil.copyfile(last, grids / f"{arm}.png")


def utility_row(study: dict[str, Any]) -> dict[str, Any]:
    """One table row from ``utility_study``: balanced accuracy with real slices only, with
    the re-drawn real control, with synthetic images, and the two gains (with CIs)."""
    gains = study["gains"].get("real+synthetic-balanced", {})
    conditions = study["conditions"]
    return {
        "real": conditions["real"]["balanced_accuracy"]["mean"],
        "control": conditions.get("real+resampled-balanced", {}).get("balanced_accuracy", {}).get("mean"),
        "synthetic": conditions.get("real+synthetic-balanced", {}).get("balanced_accuracy", {}).get("mean"),
        "over_real": gains.get("over_real", {}).get("balanced_accuracy"),
        "over_control": gains.get("over_control", {}).get("balanced_accuracy"),
    }


def write(out: Path, name: str, result: dict[str, Any], lines: list[str]) -> None:
    """``OUT/NAME.json`` (the figures) and ``OUT/NAME.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", result)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
