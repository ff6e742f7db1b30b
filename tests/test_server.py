"""The server's aggregation: malformed updates are rejected by name, never averaged in."""

from __future__ import annotations

import io

import numpy as np
import pytest
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedsynth.engine.strategy import GeneratorFedAvg
from fedsynth.engine.updates import check_update
from fedsynth.engine.records import ARRAYS, HOSPITAL, METRICS

SHAPES = {"generator.w": (2, 3), "generator.b": (3,)}


def _metadata(node: int) -> Metadata:
    """A reply's metadata as the SuperLink would deliver it from ``node`` (built by hand:
    these tests call the strategy directly, without a running Flower engine)."""
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type="train")


def _reply(node: int, name: str, arrays: dict[str, np.ndarray] | None, num_examples: object = 10) -> Message:
    content = RecordDict({HOSPITAL: ConfigRecord({"name": name})})
    if arrays is not None:
        content[ARRAYS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    content[METRICS] = MetricRecord({"num-examples": num_examples, "d-loss": 0.5})
    return Message(metadata=_metadata(node), content=content)


def _weights(value: float, **changes: np.ndarray) -> dict[str, np.ndarray]:
    arrays = {k: np.full(shape, value, dtype=np.float32) for k, shape in SHAPES.items()}
    return {**arrays, **changes}


def test_weighted_average_of_good_updates_only() -> None:
    strategy = GeneratorFedAvg(expected_shapes=SHAPES)
    bad_nan = _weights(100.0, **{"generator.w": np.full((2, 3), np.nan, dtype=np.float32)})
    bad_shape = _weights(100.0, **{"generator.w": np.zeros((3, 2), dtype=np.float32)})
    replies = [
        _reply(1, "hospital-a", _weights(1.0), 10),
        _reply(2, "hospital-b", _weights(3.0), 30),
        _reply(3, "hospital-c", bad_nan),
        _reply(4, "hospital-d", bad_shape),
        _reply(5, "hospital-e", None),
        Message(metadata=_metadata(6),
                error=Error(code=0, reason="Traceback...\nSliceSetError: slices.npz: no such slice set file")),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    for key in SHAPES:
        assert np.allclose(arrays[key].numpy(), 2.5), "weighted by num-examples: (1*10 + 3*30) / 40"
    report = strategy.last_report
    assert set(report.hospitals) == {"hospital-a", "hospital-b"}
    reasons = {r["hospital"]: r["reason"] for r in report.rejected}
    assert "NaN" in reasons["hospital-c"]
    assert "shape (3, 2)" in reasons["hospital-d"]
    assert "no model weights" in reasons["hospital-e"]
    assert report.failures == [{"node": 6, "hospital": "node-6",
                                "reason": "SliceSetError: slices.npz: no such slice set file"}]


def test_no_usable_update_gives_no_model() -> None:
    strategy = GeneratorFedAvg(expected_shapes=SHAPES)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "hospital-a", _weights(1.0), num_examples=0)])
    assert arrays is None
    assert "num-examples is 0" in strategy.last_report.rejected[0]["reason"]


@pytest.mark.parametrize(
    ("arrays", "num_examples", "problem"),
    [
        ({"generator.w": np.zeros((2, 3), np.float32)}, 1, "missing"),
        ({**_weights(0.0), "generator.extra": np.zeros(1, np.float32)}, 1, "unexpected"),
        (_weights(0.0, **{"generator.b": np.zeros(3, np.int64)}), 1, "dtype"),
        (_weights(0.0, **{"generator.b": np.array([0, np.inf, 0], np.float32)}), 1, "infinite"),
        (_weights(0.0), "many", "expected a number"),
        (_weights(0.0), float("nan"), "positive"),
    ],
)
def test_check_update_names_the_problem(arrays: dict[str, np.ndarray], num_examples: object, problem: str) -> None:
    reason = check_update(arrays, SHAPES, num_examples)
    assert reason is not None and problem in reason


def test_check_update_accepts_a_good_update() -> None:
    assert check_update(_weights(0.5), SHAPES, 12) is None


def test_client_level_dp_clips_each_update_weights_equally_and_noises_the_average() -> None:
    shapes = {"generator.w": (40, 50), "generator.bn.running_var": (50,)}
    trainable = {"generator.w"}
    current = {"generator.w": np.zeros((40, 50), np.float32), "generator.bn.running_var": np.ones(50, np.float32)}

    def run(sigma: float) -> dict[str, np.ndarray]:
        strategy = GeneratorFedAvg(expected_shapes=shapes, client_dp=(sigma, 1.0, trainable))
        strategy.current = current  # what configure_train keeps (it needs a live Grid)
        big = {"generator.w": np.full((40, 50), 100.0, np.float32), "generator.bn.running_var": np.full(50, 9.0)}
        small = {"generator.w": np.full((40, 50), 1e-4, np.float32), "generator.bn.running_var": np.full(50, 5.0)}
        bad = {**small, "generator.w": np.full((40, 50), np.nan, np.float32)}
        arrays, _ = strategy.aggregate_train(1, [_reply(1, "hospital-a", big, 10), _reply(2, "hospital-b", small, 90),
                                                 _reply(3, "hospital-c", bad, 10)])
        assert arrays is not None and strategy.last_report.client_dp["hospitals"] == 2
        assert strategy.last_report.client_dp["clipped"] == 1
        return {k: v.numpy() for k, v in arrays.items()}

    quiet = run(1e-9)
    # hospital-a's update (norm 100 * sqrt(2000)) is clipped to norm 1; equal weights, not 10:90.
    clipped_a = 1.0 / np.sqrt(2000)
    assert np.allclose(quiet["generator.w"], (clipped_a + 1e-4) / 2, rtol=1e-4)
    # Buffers are not averaged (the server recomputes BatchNorm statistics itself).
    assert np.array_equal(quiet["generator.bn.running_var"], current["generator.bn.running_var"])
    noisy = run(1.0)
    assert np.std(noisy["generator.w"] - quiet["generator.w"]) == pytest.approx(1.0 * 1.0 / 2, rel=0.05)


def test_flower_wrapped_client_errors_are_reduced_to_the_hospitals_message() -> None:
    strategy = GeneratorFedAvg(expected_shapes=SHAPES)
    reason = ("Traceback (most recent call last):\n  ...\nException ClientAppException occurred. Message: "
              "hospital-b: SliceSetError: slices.npz: no such slice set file'>")
    strategy.aggregate_train(1, [_reply(1, "hospital-a", _weights(1.0)),
                                 Message(metadata=_metadata(2), error=Error(code=0, reason=reason))])
    assert strategy.last_report.failures[0]["reason"] == "hospital-b: SliceSetError: slices.npz: no such slice set file"


def _sent(strategy: GeneratorFedAvg, nodes: list[int]) -> None:
    """What configure_train keeps after the grid pushed a question to each node (message
    ids as the grid assigns them), built by hand: no live Grid here."""
    strategy.sent = [
        Message(metadata=Metadata(run_id=1, message_id=f"q{node}", src_node_id=1, dst_node_id=node,
                                  reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
                                  message_type="train"), content=RecordDict())
        for node in nodes
    ]


def test_thousandfold_weights_and_wrong_dtype_are_rejected_by_the_norm_and_dtype_checks() -> None:
    current = _weights(1.0)
    strategy = GeneratorFedAvg(expected_shapes=SHAPES, expected_dtypes={k: np.dtype(np.float32) for k in SHAPES},
                               max_update_norm=3.0)
    strategy.current = current
    honest = _weights(1.1)
    scaled = {k: v * 1000 for k, v in current.items()}
    wider = {k: v.astype(np.float64) for k, v in _weights(1.0).items()}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "hospital-a", honest), _reply(2, "hospital-b", scaled),
                                             _reply(3, "hospital-c", wider)])
    assert arrays is not None and np.allclose(arrays["generator.w"].numpy(), 1.1)
    reasons = {r["hospital"]: r["reason"] for r in strategy.last_report.rejected}
    assert "update norm is 999x" in reasons["hospital-b"] and "max-update-norm 3" in reasons["hospital-b"]
    assert "dtype float64, expected float32" in reasons["hospital-c"]
    assert strategy.last_report.hospitals["hospital-a"]["update-norm"] == pytest.approx(0.1, rel=1e-3)


def test_an_array_that_would_need_pickle_is_rejected_without_running_it(tmp_path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # what unpickling would run
            return (marker.write_text, ("pwned",))

    buffer = io.BytesIO()
    np.save(buffer, np.array([Payload()], dtype=object), allow_pickle=True)  # .npy with a pickled body
    hostile = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    content = RecordDict({HOSPITAL: ConfigRecord({"name": "hospital-x"}),
                          ARRAYS: ArrayRecord({"generator.w": hostile, "generator.b": Array(np.zeros(3, np.float32))}),
                          METRICS: MetricRecord({"num-examples": 5})})
    strategy = GeneratorFedAvg(expected_shapes=SHAPES)
    arrays, _ = strategy.aggregate_train(1, [Message(metadata=_metadata(1), content=content)])
    assert arrays is None
    assert "generator.w is not a plain numpy array" in strategy.last_report.rejected[0]["reason"]
    assert not marker.exists()


def test_a_node_that_never_answers_or_is_reported_unavailable_is_a_named_gap() -> None:
    strategy = GeneratorFedAvg(expected_shapes=SHAPES, node_names={2: "south", 3: "east"})
    _sent(strategy, [1, 2, 3])
    unavailable = Message(metadata=Metadata(
        run_id=1, message_id="e2", src_node_id=1, dst_node_id=1, reply_to_message_id="q2", group_id="1",
        created_at=time.time(), ttl=60.0, message_type="train"),
        error=Error(code=5, reason="Error: Node Unavailable - no heartbeat"))
    good = _reply(1, "north", _weights(1.0))
    good.metadata.__dict__["_reply_to_message_id"] = "q1"
    arrays, _ = strategy.aggregate_train(2, [good, unavailable])
    assert arrays is not None
    failures = {f["hospital"]: f["reason"] for f in strategy.last_report.failures}
    assert failures == {"south": "Error: Node Unavailable - no heartbeat",
                        "east": "no reply within federation.round-timeout"}


def test_registered_names_win_over_what_a_reply_claims() -> None:
    strategy = GeneratorFedAvg(expected_shapes=SHAPES, node_names={1: "north"})
    strategy.aggregate_train(1, [_reply(1, "south", _weights(1.0))])
    assert set(strategy.last_report.hospitals) == {"north"}


def test_every_reply_is_described_by_shapes_and_types_only() -> None:
    strategy = GeneratorFedAvg(expected_shapes=SHAPES)
    strategy.aggregate_train(1, [_reply(1, "hospital-a", _weights(0.25))])
    [described] = strategy.last_report.messages
    assert described["arrays"] == {"arrays/generator.w": [[2, 3], "float32"], "arrays/generator.b": [[3], "float32"]}
    assert described["metrics"] == {"metrics/num-examples": "int", "metrics/d-loss": "float"}
    assert described["configs"] == {"hospital/name": "str[10]"}
    assert "0.25" not in str(described)


def test_hospitals_reporting_different_metrics_are_still_averaged() -> None:
    """A DP hospital adds its privacy spend and withholds D's losses; Flower's FedAvg alone
    refuses replies whose metric keys differ."""
    strategy = GeneratorFedAvg(expected_shapes=SHAPES)
    dp = _reply(2, "hospital-b", _weights(3.0), 10)
    dp.content[METRICS] = MetricRecord({"num-examples": 10, "dp-epsilon": 1.5})
    arrays, _ = strategy.aggregate_train(1, [_reply(1, "hospital-a", _weights(1.0), 10), dp])
    assert arrays is not None and np.allclose(arrays["generator.w"].numpy(), 2.0)
    assert strategy.last_report.hospitals["hospital-a"]["d-loss"] == 0.5


def test_server_momentum_steps_along_the_accumulated_update_and_leaves_statistics_averaged() -> None:
    """FedAvgM: round 1 moves the model to the average; in round 2 the same-sized
    average step is taken plus half of round 1's (momentum 0.5), so the server overshoots
    the hospitals' average in the direction it keeps moving. BatchNorm statistics are the
    plain average."""
    shapes = {"generator.w": (2, 3), "generator.bn.running_mean": (3,)}
    strategy = GeneratorFedAvg(expected_shapes=shapes, server_step=(0.5, 1.0, {"generator.w"}))

    def round_(number: int, start: float, sent: float) -> dict[str, np.ndarray]:
        strategy.current = {k: np.full(s, start, np.float32) for k, s in shapes.items()}
        update = {k: np.full(s, sent, np.float32) for k, s in shapes.items()}
        arrays, _ = strategy.aggregate_train(number, [_reply(1, "hospital-a", update), _reply(2, "hospital-b", update)])
        assert arrays is not None
        return {k: v.numpy() for k, v in arrays.items()}

    first = round_(1, 0.0, 1.0)
    assert np.allclose(first["generator.w"], 1.0)
    second = round_(2, 1.0, 2.0)
    assert np.allclose(second["generator.w"], 1.0 + 1.0 + 0.5 * 1.0)
    assert np.allclose(second["generator.bn.running_mean"], 2.0), "statistics: the average, no momentum"
    plain = GeneratorFedAvg(expected_shapes=shapes, server_step=(0.0, 1.0, {"generator.w"}))
    plain.current = {k: np.full(s, 1.0, np.float32) for k, s in shapes.items()}
    arrays, _ = plain.aggregate_train(2, [_reply(1, "hospital-a", {k: np.full(s, 2.0, np.float32)
                                                                     for k, s in shapes.items()})])
    assert arrays is not None and np.allclose(arrays["generator.w"].numpy(), 2.0), "momentum 0 is FedAvg"


class _Nodes:
    """The one thing configure_train asks of Flower's Grid: the connected nodes (a live Grid
    needs a running SuperLink; the simulation tests use one)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.mark.parametrize(("fraction", "asked"), [(1.0, 4), (0.5, 2)])
def test_every_training_question_says_how_many_hospitals_the_round_asked(
    fraction: float, asked: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # A ServerApp task knows its run, node and task ids; messages are made with them.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    strategy = GeneratorFedAvg(expected_shapes=SHAPES, fraction_train=fraction)
    sent = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(), _Nodes([1, 2, 3, 4])))  # type: ignore[arg-type]
    assert len(sent) == asked
    assert all(m.content.config_records["config"]["hospitals-asked"] == asked for m in sent)
    assert all(m.content.config_records["config"]["server-round"] == 3 for m in sent)
