"""`python -m benchmarks.run --quick` runs end to end, so the benchmark suite cannot rot.

It trains every quality arm for a few steps on real brain MRI slices (the figures mean
nothing at that size; BENCHMARKS.md holds the full run) and checks that every benchmark
wrote its figures, tables and plots, stating the machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEDSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))

PERF = ("trainer_overhead", "dp_overhead", "federation_overhead", "peak_memory", "audit_scaling")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED / "brain-tumor-mri").exists():
        pytest.skip(f"brain MRI slices not found at {SHARED / 'brain-tumor-mri'} (the shared data folder is absent)")
    out = tmp_path_factory.mktemp("bench") / "quick"
    env = dict(os.environ, FEDSYNTH_SHARED_DATA=str(SHARED), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done:" in proc.stdout
    return out


def test_every_benchmark_writes_figures_and_a_table_with_the_machine(quick: Path) -> None:
    summary = json.loads((quick / "summary.json").read_text())
    assert set(summary["results"]) == {*PERF, "quality"}
    for key, result in summary["results"].items():
        assert result["machine"]["cpus"] >= 1 and result["machine"]["torch"], key
        assert (quick / f"{key}.json").is_file() and (quick / f"{key}.md").read_text().startswith("###"), key
    md = (quick / "summary.md").read_text()
    assert "## Performance" in md and "## Quality" in md and "python -m benchmarks.run --quick" in md
    assert "CPUs" in md


def test_performance_ratios_are_measured_side_by_side(quick: Path) -> None:
    r = json.loads((quick / "summary.json").read_text())["results"]
    trainer = r["trainer_overhead"]
    assert len(trainer["seconds_per_step"]["bare PyTorch loop"]["values"]) == trainer["repeats"]
    assert all(0.2 < v < 20 for v in trainer["ratio_to_bare"].values())
    assert 0.5 < r["dp_overhead"]["ratio_of_medians"] < 20
    fed = r["federation_overhead"]
    # the simulation's rounds cannot take less time than the training inside them
    assert fed["simulation_rounds_seconds"] >= fed["local_training_seconds_sum"] > 0
    mem = r["peak_memory"]
    assert mem["peak_gb"]["dp"] > mem["imports_gb"] > 0.05
    rows = r["audit_scaling"]["rows"]
    assert [row["n"] for row in rows] == [120, 240]
    assert all(row["copy_search_s"] > 0 for row in rows)
    assert rows[0]["full_audit_without_utility_s"] > 0  # the quick run audits the smaller size whole
    assert "full_audit_without_utility_s" not in rows[1] and "not run" in (quick / "audit_scaling.md").read_text()


def test_quality_compares_every_arm_on_the_same_holdout(quick: Path) -> None:
    q = json.loads((quick / "quality.json").read_text())
    arms = q["fidelity"]["arms"]
    expected = {"real train (reference)", "federated", "pooled", "vanilla-gan", "dp-eps-10",
                "local-hospital-a"}  # the quick run trains one hospital alone
    assert set(arms) == expected
    for name, row in arms.items():
        assert math.isfinite(row["fd_encoder"]) and math.isfinite(row["fd_pixels"]), name
    # the real training slices are far closer to the holdout than a 20-step GAN
    assert arms["real train (reference)"]["fd_pixels"] < arms["federated"]["fd_pixels"]
    assert q["training_seconds"]["pooled"] > 0
    audits = q["audits"]
    assert audits["dp-eps-10"]["epsilon"] <= 10.0 + 1e-6 and audits["federated"]["epsilon"] is None
    # a DP run's audit trains the private baseline (a DP-SGD classifier on the real slices)
    assert 0 < audits["dp-eps-10"]["dp_sgd_classifier"]["mean"] <= 1 and audits["federated"]["dp_sgd_classifier"] is None
    assert all(0.0 <= a["mia_auc_max"] <= 1.0 for a in audits.values())
    # a conditional generator's gains are measured; the unconditional vanilla GAN's cannot be
    assert len(audits["federated"]["gain_over_real"]["per_seed"]) == q["config"]["audit_seeds"]
    assert audits["vanilla-gan"]["gain_over_real"] is None
    # the low-data classifiers draw on a federation of the small hospitals only
    lowdata = json.loads((quick / "work" / "quality" / "lowdata-federated" / "hospitals" / "hospitals.json").read_text())
    full = json.loads((quick / "work" / "quality" / "federated" / "hospitals" / "hospitals.json").read_text())
    for h in ("hospital-a", "hospital-b", "hospital-c"):
        assert lowdata["counts"][h]["train"] < full["counts"][h]["train"]
    studies = [s for s in q["lowdata"]["studies"].values() if s.get("over_real")]
    assert studies and all(len(s["over_real"]["per_seed"]) == q["lowdata"]["seeds"] for s in studies)
    for png in ("fidelity_arms.png", "privacy_utility.png", "lowdata_gain.png", "grids/real.png", "grids/federated.png"):
        assert (quick / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
