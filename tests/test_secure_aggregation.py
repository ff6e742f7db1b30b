"""Secure aggregation (``federation.secure-aggregation: on``) through Flower's real
simulation engine, with Flower's own SecAgg+ workflow and client mod: the server ends up
with the model plain FedAvg would have given it (within SecAgg+'s quantisation), no
reply it receives holds a hospital's update, and a hospital that drops out in the middle
of a round is tolerated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, MessageType, Metadata, RecordDict
from safetensors.numpy import load_file

from fedsynth.core.weights import AVERAGE
from fedsynth.engine.launcher import run_simulation_engine
from fedsynth.engine.secure import CLIPPING_RANGE, MAX_WEIGHT, ROUND_MAX_WEIGHT, secure_reply
from fedsynth.engine.simulation import prepare_simulation
from fedsynth.runs.config import ConfigError, RunConfig
from fedsynth.runs.rundir import RunDir

from .conftest import make_slices

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")
SETTINGS = {"simulation.hospitals": 4, "simulation.partition": "iid", "federation.rounds": 2,
            "train.local-steps": 3, "train.batch-size": 8, "model.width": 8, "federation.min-hospitals": 2}
# one quantisation step of SecAgg+ (values in +-CLIPPING_RANGE mapped to 2**22 integers)
STEP = 2 * CLIPPING_RANGE / 2**22


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunDir]:
    """The same 2-round federation of 4 hospitals, plain and secure; hospital-d's slice
    file is damaged, so it fails inside its training call, after SecAgg+ has shared its
    keys: a drop-out in the middle of the secure round, both rounds."""
    root = tmp_path_factory.mktemp("secure")
    data = make_slices(n_patients=24).save(root / "slices.npz")
    out = {}
    for mode in ("off", "on"):
        run = RunDir(root / mode)
        cfg = prepare_simulation(
            RunConfig.from_overrides({**SETTINGS, "federation.secure-aggregation": mode}), data, run
        )
        (run.hospitals_dir / "hospital-d" / "slices.npz").write_bytes(b"damaged")
        outcome = run_simulation_engine(cfg, run)
        assert outcome.ok, outcome.status
        out[mode] = run
    return out


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max()) for k in a)


@pytest.mark.slow
def test_the_secure_sum_gives_the_plain_model_within_the_quantisation_error(runs: dict[str, RunDir]) -> None:
    start = load_file(str(runs["off"].root / "checkpoints" / "round-0000.safetensors"))
    first = {m: load_file(str(runs[m].root / "checkpoints" / "round-0001.safetensors")) for m in runs}
    # Round 1 starts from the same model and trains the same way: the two averages differ
    # only by SecAgg+'s stochastic rounding, at most one step per hospital, scaled by the
    # first round's max-weight over the slices of the round.
    records = {m: {r["round"]: r for r in runs[m].read_rounds()} for m in runs}
    slices = sum(h["num-examples"] for h in records["off"][1]["hospitals"].values())
    bound = 3 * STEP * MAX_WEIGHT / slices
    assert 0 < _max_diff(first["on"], first["off"]) <= bound
    assert _max_diff(first["off"], start) > 100 * bound, "the round must have moved the model"
    # Round 2 trains from those two models: still the same model, to far below the round's step.
    last = {m: load_file(str(runs[m].root / "checkpoints" / "round-0002.safetensors")) for m in runs}
    assert _max_diff(last["on"], last["off"]) < 0.01 * _max_diff(last["off"], first["off"])
    for round_ in (1, 2):
        plain_record, secure_record = records["off"][round_], records["on"][round_]
        assert set(secure_record["hospitals"]) == set(plain_record["hospitals"]) == set(HOSPITALS[:3])
        for name, stats in secure_record["hospitals"].items():
            assert stats["num-examples"] == plain_record["hospitals"][name]["num-examples"]
            assert stats["secagg-clipped-values"] == 0


@pytest.mark.slow
def test_no_reply_the_server_receives_holds_an_update(runs: dict[str, RunDir]) -> None:
    """``messages.jsonl`` holds every reply of every SecAgg+ stage, as the server's grid
    received it (its names, array shapes and entry types)."""
    secure = [json.loads(line) for line in (runs["on"].root / "messages.jsonl").read_text().splitlines()]
    # the model tensors that travel (the checkpoint also keeps the server's own running average)
    model = {k: v for k, v in load_file(str(runs["on"].root / "checkpoints" / "round-0000.safetensors")).items()
             if not k.startswith(f"{AVERAGE}.")}
    by_stage: dict[str, int] = {}
    for reply in secure:
        by_stage[reply["stage"]] = by_stage.get(reply["stage"], 0) + 1
        if "error" in reply:
            continue
        assert reply["arrays"] == {}, f"an array arrived in the clear: {reply}"
        if reply["stage"] == "collect_masked_vectors":
            assert reply["configs"]["secaggplus_configs/masked_params"] == "list"
            names = {key.split("/", 1)[1] for key in (*reply["configs"], *reply["metrics"])}
            assert not names & set(model), "a model tensor's name in a reply"
    # 3 hospitals answer the 4 stages, twice; hospital-d answers the first two stages and
    # then fails in its training call
    assert by_stage == {"setup": 8, "share_keys": 8, "collect_masked_vectors": 8, "unmask": 6}
    plain = [json.loads(line) for line in (runs["off"].root / "messages.jsonl").read_text().splitlines()]
    assert any(set(model) <= {k.split("/", 1)[1] for k in reply.get("arrays", {})} for reply in plain), (
        "the plain run's replies carry the model: the check above would see one"
    )


@pytest.mark.slow
def test_a_hospital_that_drops_out_mid_round_is_named_and_the_round_goes_on(runs: dict[str, RunDir]) -> None:
    records = runs["on"].read_rounds()
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert len(record["failures"]) == 1  # named by its error (a simulation registers no names)
        reason = record["failures"][0]["reason"]
        assert "collect_masked_vectors" in reason and "hospital-d" in reason, reason
        assert "damaged" not in reason


@pytest.mark.slow
def test_a_sum_of_one_update_is_never_unmasked(tmp_path: Path) -> None:
    """Two hospitals, one of which declines (it has not joined yet): SecAgg+ would count it
    (its update of weight 0 is masked like any other) and unmask a "sum" that is the other
    hospital's update alone. The server stops before unmasking, and the round fails saying why."""
    data = make_slices(n_patients=12).save(tmp_path / "slices.npz")
    run = RunDir(tmp_path / "run")
    cfg = prepare_simulation(RunConfig.from_overrides({
        **SETTINGS, "simulation.hospitals": 2, "federation.rounds": 1, "federation.min-hospitals": 1,
        "federation.secure-aggregation": "on", "simulation.join": "hospital-b=2"}), data, run)
    outcome = run_simulation_engine(cfg, run)
    assert not outcome.ok and outcome.status["state"] == "failed"
    assert "would reveal one hospital's update" in outcome.status["error"], outcome.status
    assert run.checkpoint_rounds() == [0], "no model was made from one hospital's update"
    stages = [json.loads(line)["stage"] for line in (run.root / "messages.jsonl").read_text().splitlines()]
    assert "unmask" not in stages and stages.count("collect_masked_vectors") == 2


def test_a_hospital_bounds_and_checks_its_own_update() -> None:
    """What the server can no longer check, each hospital checks before masking. (The
    request is built by hand, as the SuperNode would hand it to the ClientApp.)"""
    request = Message(metadata=Metadata(run_id=1, message_id="q1", src_node_id=1, dst_node_id=2,
                                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
                                        message_type=MessageType.TRAIN), content=RecordDict())
    base = {"w": np.ones(100, dtype=np.float32), "count": np.array(7, dtype=np.int64)}
    config = {ROUND_MAX_WEIGHT: 50.0}

    def reply(local: dict[str, np.ndarray] | None, examples: int = 40) -> tuple[list[np.ndarray], dict, int]:
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common import recorddict_compat as compat

        msg = secure_reply(request, base, local, metrics={"num-examples": examples}, info={"name": "h"},
                           config=config, max_update_norm=3.0)
        fitres = compat.recorddict_to_fitres(msg.content, keep_input=True)
        return parameters_to_ndarrays(fitres.parameters), fitres.metrics, fitres.num_examples

    small = {"w": base["w"] + 0.5, "count": np.array(9, dtype=np.int64)}
    update, metrics, weight = reply(small)
    assert np.allclose(update[0], 0.5) and update[1] == 0  # counters are not summed
    assert weight == 40 and metrics["name"] == "h" and "update-scaled" not in metrics
    # 10x the global model's norm, above federation.max-update-norm = 3: scaled onto the bound
    update, metrics, _ = reply({"w": base["w"] * 11, "count": base["count"]})
    assert metrics["update-scaled"] == 1
    global_norm = np.linalg.norm(np.r_[base["w"], base["count"]])  # the norm the server's bound is relative to
    assert np.linalg.norm(update[0]) == pytest.approx(3.0 * global_norm)
    # values SecAgg+ would clip (weight / max-weight x update beyond +-8) are counted
    _, metrics, _ = reply({"w": base["w"] + np.r_[np.full(3, 2.5), np.zeros(97)], "count": base["count"]}, 200)
    assert metrics["secagg-clipped-values"] == 3
    with pytest.raises(ValueError, match="non-finite"):
        reply({"w": np.full(100, np.nan, dtype=np.float32), "count": base["count"]})
    update, metrics, weight = reply(None)  # declined: nothing of weight
    assert weight == 0 and not np.any(update[0])


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"federation.client-dp-noise-multiplier": 1.0}, "client-dp-noise-multiplier"),
        ({"model.name": "dp-merf"}, "dp-merf"),
        ({"model.name": "cyclegan"}, "cyclegan"),
    ],
)
def test_what_secure_aggregation_cannot_combine_with_is_refused_naming_the_key(
    overrides: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=f"federation.secure-aggregation.*{says}"):
        RunConfig.from_overrides({"federation.secure-aggregation": "on", **overrides})


@pytest.mark.slow
def test_dp_sgd_at_each_hospital_composes_with_the_secure_sum(tmp_path: Path) -> None:
    """Each hospital's DP spend still reaches the ledger (it travels in the clear, as
    without secure aggregation), and what DP withholds stays withheld."""
    data = make_slices(n_patients=18).save(tmp_path / "slices.npz")
    run = RunDir(tmp_path / "run")
    cfg = prepare_simulation(RunConfig.from_overrides({
        **SETTINGS, "simulation.hospitals": 3, "federation.rounds": 1, "federation.secure-aggregation": "on",
        "dp.noise-multiplier": 1.0}), data, run)
    outcome = run_simulation_engine(cfg, run)
    assert outcome.ok, outcome.status
    (record,) = run.read_rounds()
    assert set(record["hospitals"]) == set(HOSPITALS[:3])
    assert all("d-loss" not in stats for stats in record["hospitals"].values())
    spent = [json.loads(line) for line in run.privacy_path.read_text().splitlines()]
    assert {line["hospital"] for line in spent} == set(HOSPITALS[:3])
    assert all(line["epsilon_rdp"] > 0 for line in spent)
