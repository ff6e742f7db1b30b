"""DP across a whole federation, through Flower's real simulation engine.

One hospital has a budget that allows exactly one round; the run must finish with the
others, the ledger must say why that hospital stopped, and every epsilon in the ledger
must be reproducible from the ledger's own sigma, q and step counts by Opacus's RDP
accountant, including after the run is resumed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from fedsynth.cli import app
from fedsynth.privacy import epsilon_for
from fedsynth.runs.rundir import RunDir

from .conftest import make_slices

pytestmark = pytest.mark.slow
runner = CliRunner()
STEPS = 2
# batch 64 > patients per hospital: q = 1, so one round's epsilon is known in advance.
ONE_ROUND = epsilon_for([(1.0, 1.0, STEPS)], 1e-5)
TWO_ROUNDS = epsilon_for([(1.0, 1.0, 2 * STEPS)], 1e-5)


def _independent_epsilon(rows: list[dict]) -> float:
    """Step Opacus's RDP accountant once per DP step the ledger records, with its sigma and q."""
    accountant = RDPAccountant()
    done = 0
    for row in rows:
        for _ in range(row["steps"] - done):
            accountant.step(noise_multiplier=row["noise_multiplier"], sample_rate=row["sample_rate"])
        done = row["steps"]
    return accountant.get_epsilon(delta=rows[-1]["delta"])


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("dp")
    data = make_slices(n_patients=24).save(root / "slices.npz")
    out = root / "run"
    result = runner.invoke(app, [
        "simulate", "--data", str(data), "--hospitals", "3", "--partition", "iid", "--rounds", "3",
        "--local-steps", str(STEPS), "--out", str(out),
        "--set", "train.batch-size=64", "--set", "model.width=8", "--set", "output.grid-per-class=2",
        "--set", "dp.noise-multiplier=1.0",
        "--hospital-set", f"hospital-b:dp.target-epsilon={(ONE_ROUND + TWO_ROUNDS) / 2}",
    ])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_a_hospital_out_of_budget_stops_and_the_run_completes_with_the_others(dp_run: tuple[Path, str]) -> None:
    out, output = dp_run
    run = RunDir(out)
    assert run.status()["state"] == "finished"
    rounds = run.read_rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert set(rounds[0]["hospitals"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for metrics in rounds[0]["hospitals"].values():
        # Nothing computed from real slices leaves a DP hospital un-noised.
        assert "d-loss" not in metrics and "d-real" not in metrics and "g-loss" in metrics
        assert metrics["images-seen"] == STEPS * 64  # nominal: configured batch x steps, not the sampled count
    for record in rounds[1:]:
        assert set(record["hospitals"]) == {"hospital-a", "hospital-c"}
        assert [d["hospital"] for d in record["declined"]] == ["hospital-b"]
        assert "privacy budget" in record["declined"][0]["reason"]
    # The user sees it as it happens, and which unit epsilon is counted in.
    assert f"hospital-b ε={ONE_ROUND:.2f}/" in output and "declined" in output and "ε per patient" in output

    ledger = [row for row in run.read_privacy() if row["hospital"] == "hospital-b"]
    assert [(row["round"], row["trained"]) for row in ledger] == [(1, True), (2, False), (3, False)]
    assert all(row["epsilon_rdp"] == pytest.approx(ONE_ROUND) for row in ledger)
    assert all(row["epsilon_rdp"] <= row["target_epsilon"] for row in ledger)
    assert "privacy budget" in ledger[-1]["declined"]


def test_tensorboard_shows_the_ledgers_epsilon_and_nothing_a_dp_hospital_withholds(
    dp_run: tuple[Path, str],
) -> None:
    from .test_tracking import read_tensorboard

    out, _ = dp_run
    events = read_tensorboard(out)
    for hospital in ("hospital-a", "hospital-b", "hospital-c"):
        ledger = [(r["round"], r["epsilon_rdp"]) for r in RunDir(out).read_privacy() if r["hospital"] == hospital]
        shown = [(e.step, e.value) for e in events.Scalars(f"epsilon-rdp/{hospital}")]
        assert [s for s, _ in shown] == [s for s, _ in ledger] == [1, 2, 3]
        assert [v for _, v in shown] == pytest.approx([v for _, v in ledger], rel=1e-6)
        assert f"g-loss/{hospital}" in events.Tags()["scalars"]
    withheld = [t for t in events.Tags()["scalars"] if t.startswith(("d-loss/", "d-real/", "validation-fd/"))]
    assert withheld == []
    assert [e.value for e in events.Scalars("round/declined")] == [0.0, 1.0, 1.0]


def test_ledger_epsilon_is_reproduced_by_an_independent_accountant(dp_run: tuple[Path, str]) -> None:
    out, _ = dp_run
    ledger = RunDir(out).read_privacy()
    assert {row["hospital"] for row in ledger} == {"hospital-a", "hospital-b", "hospital-c"}
    for hospital in ("hospital-a", "hospital-c"):
        rows = [row for row in ledger if row["hospital"] == hospital]
        assert [row["steps"] for row in rows] == [STEPS, 2 * STEPS, 3 * STEPS]
        assert rows[0]["privacy_unit"] == "patient" and rows[0]["sample_rate"] == 1.0
        assert rows[0]["delta"] == pytest.approx(1e-5)
        for k in range(len(rows)):
            assert rows[k]["epsilon_rdp"] == pytest.approx(_independent_epsilon(rows[: k + 1]), rel=1e-9)
        eps = [row["epsilon_rdp"] for row in rows]
        assert eps == sorted(eps) and eps[0] < eps[-1]
        assert rows[-1]["epsilon_prv"] is not None and 0 < rows[-1]["epsilon_prv"] <= rows[-1]["epsilon_rdp"] * 1.2


def test_resumed_run_keeps_counting_from_the_spent_budget(dp_run: tuple[Path, str]) -> None:
    out, _ = dp_run
    result = runner.invoke(app, ["simulate", "--out", str(out), "--resume", "--rounds", "4"])
    assert result.exit_code == 0, result.output
    ledger = RunDir(out).read_privacy()
    a = [row for row in ledger if row["hospital"] == "hospital-a"]
    assert [row["round"] for row in a] == [1, 2, 3, 4]
    assert a[-1]["steps"] == 4 * STEPS, "a resumed run must not restart the accountant"
    assert a[-1]["epsilon_rdp"] == pytest.approx(_independent_epsilon(a), rel=1e-9)
    b = [row for row in ledger if row["hospital"] == "hospital-b"]
    assert b[-1]["round"] == 4 and not b[-1]["trained"] and b[-1]["steps"] == STEPS


def test_client_level_dp_is_accounted_per_round_and_resumes(tmp_path: Path) -> None:
    data = make_slices(n_patients=18).save(tmp_path / "slices.npz")
    out = tmp_path / "run"
    args = ["--set", "federation.client-dp-noise-multiplier=2.0", "--set", "federation.client-dp-clip=0.5"]
    result = runner.invoke(app, ["simulate", "--data", str(data), "--hospitals", "2", "--rounds", "2",
                                 "--local-steps", "2", "--out", str(out), "--set", "train.batch-size=8",
                                 "--set", "model.width=8", *args])
    assert result.exit_code == 0, result.output
    assert "client-level DP: ε=" in result.output
    result = runner.invoke(app, ["simulate", "--out", str(out), "--resume", "--rounds", "3"])
    assert result.exit_code == 0, result.output
    ledger = RunDir(out).read_client_privacy()
    assert [row["round"] for row in ledger] == [1, 2, 3]
    for k, row in enumerate(ledger, start=1):
        assert row["privacy_unit"] == "hospital" and row["hospitals"] == 2 and row["releases"] == k
        assert row["noise_std"] == pytest.approx(2.0 * 0.5 / 2)
        assert row["epsilon_rdp"] == pytest.approx(epsilon_for([(2.0, 1.0, 1)] * k, 1e-5))
    # The released generator stays usable: its BatchNorm statistics were recomputed, finite.
    from fedsynth.core.checkpoint import load_checkpoint

    tensors, _ = load_checkpoint(RunDir(out).checkpoint(3))
    running = [v for k, v in tensors.items() if k.endswith("running_var")]
    assert running and all(bool((v > 0).all()) for v in running)
