"""Secure aggregation (``federation.secure-aggregation: on``): Flower's SecAgg+.

SecAgg+ (Bell et al., CCS 2020) lets the server learn the sum of the hospitals' model
updates and nothing else: each hospital adds to its quantised update masks it agreed
pairwise with the others, and masks that cancel only in the sum. Flower implements it as
``SecAggPlusWorkflow`` (server) and ``secaggplus_mod`` (clients); both are used here as
they are. The workflow still speaks Flower's legacy strategy API (``FitIns``/``FitRes``),
so this module adapts one round of fedsynth's message-based loop to it:

- the server's side (``secure_round``): the round's hospitals are sampled as in any
  round; the workflow runs its four stages (keys, key shares, masked updates, unmasking)
  through a grid that writes down every reply it receives (``messages.jsonl``: the
  evidence that no update arrived in the clear); the unmasked mean update is checked (all
  finite, its norm within ``federation.max-update-norm``) and applied;
- the hospital's side (``read_secure_request``, ``secure_reply``): the request carries
  the global model as legacy parameters; the hospital trains as in any round, checks its
  own update (finite; above ``federation.max-update-norm`` it is scaled down to the
  bound) and hands ``secaggplus_mod`` the update minus the global model, weighted by its
  training slices, to mask.

What the server can no longer do is check one hospital's update: a hospital may still
send any finite update within the bounds it applies to itself (see docs: privacy).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedsynth.engine.records import number
from fedsynth.engine.strategy import GeneratorFedAvg, RoundReport, describe_message, first_line
from fedsynth.engine.updates import relative_update_norm

__all__ = [
    "CLIPPING_RANGE",
    "MAX_WEIGHT",
    "is_secure_request",
    "read_secure_request",
    "secure_aggregation_mod",
    "secure_reply",
    "SecureAggregator",
]

log = logging.getLogger(__name__)

# In the request's config: the model's tensor names, in the order of its parameter arrays.
TENSOR_NAMES = "fedsynth-tensors"
# The hospital's name, privacy unit and decline travel among its (clear) metrics.
INFO_KEYS = ("name", "dp-unit", "declined")
# SecAgg+'s quantisation (Flower's defaults): every value of weight / max-weight x update is
# clipped to +-CLIPPING_RANGE and stochastically rounded to one of 2**22 integers, summed
# modulo 2**32. One step is 2 x 8 / 2**22 = 3.8e-6, and the mean update's error is at most
# (hospitals x step x max-weight / the round's training slices). max-weight is the largest
# weight (training slices) among the round's hospitals as they last masked an update, so
# once every asked hospital has taken part the error stays under hospitals x step; a
# hospital not seen yet counts as MAX_WEIGHT.
CLIPPING_RANGE = 8.0
MAX_WEIGHT = 1000.0
# In the request's config: the max-weight of this round.
ROUND_MAX_WEIGHT = "secagg-max-weight"
# Every hospital of the round holds a share of every other's keys (SecAgg+ with a full
# graph); two thirds of them (at least 2) reconstruct the masks of one that drops out.
SHARES = 1.0
THRESHOLD = 2 / 3


# --- the hospital's side ---------------------------------------------------------------
def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round; any other message
    (a plain round, validation) goes straight to the ClientApp."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def is_secure_request(content: RecordDict) -> bool:
    """Whether a training request is a secure round's (legacy ``fitins`` records)."""
    return "fitins.parameters" in content.array_records


def read_secure_request(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, Scalar]]:
    """The global model (by tensor name) and the round's config of a secure round's request."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    names = str(fitins.config[TENSOR_NAMES]).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    return dict(zip(names, arrays, strict=True)), dict(fitins.config)


def secure_reply(
    msg: Message,
    global_model: Mapping[str, np.ndarray],
    local_model: Mapping[str, np.ndarray] | None,
    *,
    metrics: Mapping[str, Any],
    info: Mapping[str, str],
    config: Mapping[str, Any],
    max_update_norm: float,
) -> Message:
    """The reply ``secaggplus_mod`` masks: this hospital's update (``local_model`` minus
    ``global_model``, float tensors; integer counters send 0), weighted by its
    ``num-examples``; ``config`` is the request's. A hospital that declined
    (``local_model`` None) sends a zero update of weight 0. The hospital checks its own
    update first, as the server would have.

    Raises
    ------
    ValueError
        The update holds a NaN or an infinity: nothing is sent, and the round goes on
        without this hospital (SecAgg+ removes its masks).
    """
    out_metrics: dict[str, Scalar] = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    out_metrics.update({k: str(v) for k, v in info.items() if k in INFO_KEYS})
    delta = {
        key: (
            local_model[key].astype(np.float64) - base.astype(np.float64)
            if local_model is not None and np.issubdtype(base.dtype, np.floating)
            else np.zeros(base.shape)
        )
        for key, base in global_model.items()
    }
    weight = 0
    if local_model is not None:
        if not all(np.isfinite(d).all() for d in delta.values()):
            raise ValueError("this hospital's update holds non-finite values; it was not sent")
        weight = int(number(metrics["num-examples"]))
        max_weight = number(config.get(ROUND_MAX_WEIGHT, MAX_WEIGHT))
        norm = relative_update_norm(local_model, global_model)
        if max_update_norm and norm > max_update_norm:
            # the server's bound, applied here: the update is scaled back onto it
            delta = {k: d * (max_update_norm / norm) for k, d in delta.items()}
            out_metrics["update-scaled"] = 1
        scaled = weight / max_weight
        out_metrics["secagg-clipped-values"] = int(
            sum(int(np.count_nonzero(np.abs(d * scaled) > CLIPPING_RANGE)) for d in delta.values())
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(list(delta.values())),
        num_examples=weight,
        metrics=out_metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# --- the server's side ---------------------------------------------------------------
class _Halt(Exception):
    """Stops the workflow before it unmasks a sum that would reveal one hospital's update."""


def _weight(reply: Message) -> int:
    """The weight a masked-update reply was masked with (its ``fitres.num_examples``), 0
    when the reply is malformed."""
    try:
        value = reply.content.metric_records["fitres.num_examples"]["num_examples"]
    except (KeyError, TypeError):
        return 0
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _Wire:
    """The grid, writing down every reply the server receives (node, stage, the reply),
    and refusing to let the workflow unmask a sum of fewer than two hospitals' updates:
    a declined hospital's weight-0 update counts for SecAgg+'s threshold but adds
    nothing, so its sum could be one hospital's update, in the clear."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.replies: list[tuple[int, str, Message]] = []
        self.asked: dict[str, set[int]] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]) if messages else "?"
        if stage == Stage.UNMASK:
            weighted = [
                node
                for node, s, reply in self.replies
                if s == Stage.COLLECT_MASKED_VECTORS and not reply.has_error() and _weight(reply) > 0
            ]
            if len(weighted) < 2:
                raise _Halt(
                    f"{len(weighted)} hospital(s) sent an update of weight above 0; a sum of fewer than 2 "
                    "would reveal one hospital's update, so it is not unmasked"
                )
        self.asked[stage] = {int(m.metadata.dst_node_id) for m in messages}
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        # the grid gives each message its id as it pushes it; a reply names the one it answers
        to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
        for reply in replies:
            node = to.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
            self.replies.append((node, stage, reply))
        return replies


class _LegacyRound(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: it hands out the round's requests
    and keeps the unmasked mean update; fedsynth's strategy does the rest."""

    def __init__(self, requests: list[tuple[ClientProxy, FitIns]]) -> None:
        self.requests = requests
        self.mean_update: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return self.requests

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if results:  # the workflow gives every result the same, unmasked, parameters
            self.mean_update = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        return None


class SecureAggregator:
    """The server's side of secure aggregation, one instance per run: it remembers the
    weight (training slices) each hospital masked its last update with, to set the next
    round's max-weight from the hospitals that round asks."""

    def __init__(self) -> None:
        self.weights: dict[int, int] = {}

    def max_weight(self, nodes: Iterable[int]) -> float:
        """The largest known weight among ``nodes``; MAX_WEIGHT stands in for the unknown."""
        known = [self.weights[n] for n in nodes if n in self.weights]
        unknown = any(n not in self.weights for n in nodes)
        return float(max(known + ([int(MAX_WEIGHT)] if unknown or not known else [])))

    def round(
        self, strategy: GeneratorFedAvg, server_round: int, arrays: ArrayRecord, grid: Grid, *, timeout: float
    ) -> ArrayRecord | None:
        """One training round under SecAgg+: the new global model, or None when the round
        has no usable sum (``strategy.last_report`` says why, hospital by hospital)."""
        # The round's hospitals and config, sampled as in any round; these messages are not sent.
        planned = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        strategy.sent = []
        names = list(arrays.keys())
        current = {k: arrays[k].numpy() for k in names}
        parameters = ndarrays_to_parameters([current[k] for k in names])
        max_weight = self.max_weight(int(m.metadata.dst_node_id) for m in planned)
        requests: list[tuple[ClientProxy, FitIns]] = []
        for msg in planned:
            config: dict[str, Scalar] = {
                k: v
                for k, v in msg.content.config_records[strategy.configrecord_key].items()
                if isinstance(v, (int, float, str, bool))
            }
            config[TENSOR_NAMES] = ",".join(names)
            config[ROUND_MAX_WEIGHT] = max_weight
            requests.append(
                (GridClientProxy(int(msg.metadata.dst_node_id), grid, 0), FitIns(parameters, config))
            )
        report = RoundReport(round=server_round)
        strategy.last_report = report
        if len(requests) < 2:
            for proxy, _ in requests:
                strategy.note_failure(
                    report, int(proxy.node_id), "secure aggregation needs 2 or more hospitals a round"
                )
            return None

        legacy = _LegacyRound(requests)
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}), strategy=legacy
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            parameters, keep_input=True
        )
        wire = _Wire(grid)
        workflow = SecAggPlusWorkflow(
            SHARES, THRESHOLD, clipping_range=CLIPPING_RANGE, max_weight=max_weight, timeout=timeout
        )
        try:
            workflow(cast(Grid, wire), context)
            halted = (
                None if legacy.mean_update is not None else "too few hospitals were left to remove the masks"
            )
        except Exception as err:  # noqa: BLE001 - a malformed reply ends the round, never the server
            halted = str(err) if isinstance(err, _Halt) else f"{type(err).__name__}: {err}"
        summed = self._note_replies(strategy, report, wire)
        mean = legacy.mean_update
        if halted or mean is None or not summed:
            for _, node in summed:  # their updates were masked, and the sum never came
                strategy.note_failure(
                    report, node, f"secure aggregation halted: {halted or 'no update to sum'}"
                )
            report.hospitals.clear()
            return None
        problem = None
        if [m.shape for m in mean] != [current[k].shape for k in names]:
            problem = "its arrays do not have the global model's shapes (a reply masked other shapes)"
        else:
            new = {
                k: (current[k] + m).astype(current[k].dtype)
                if np.issubdtype(current[k].dtype, np.floating)
                else current[k]
                for k, m in zip(names, mean, strict=True)
            }
            if not all(np.isfinite(v).all() for v in new.values()):
                problem = "the sum holds non-finite values"
            else:
                norm = relative_update_norm(new, current)
                if strategy.max_update_norm and norm > strategy.max_update_norm * (1 + 1e-3):
                    problem = (
                        f"its change is {norm:.3g} of the global model's norm, "
                        "above federation.max-update-norm"
                    )
        if problem:
            who = ", ".join(name for name, _ in summed)
            log.warning("round %d: rejected the secure sum of %s: %s", server_round, who, problem)
            report.rejected.append({"hospital": f"the secure sum of {who}", "node": 0, "reason": problem})
            report.hospitals.clear()
            return None
        return strategy.apply_server_step(
            ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in new.items()})
        )

    def _note_replies(
        self, strategy: GeneratorFedAvg, report: RoundReport, wire: _Wire
    ) -> list[tuple[str, int]]:
        """Fill ``report`` from what arrived on the wire: each reply's description (stage
        by stage), each hospital's clear metrics and decline, and a failure for each
        hospital asked at the first stage whose update is not in the sum: its first error,
        the stage it did not answer, or the stage at which the protocol halted. Returns
        the hospitals whose masked update went into the sum, as (name, node)."""
        errors: dict[int, str] = {}
        answered: dict[int, list[str]] = {}
        summed = []
        for node, stage, reply in wire.replies:
            if reply.has_error():
                reason = first_line(reply.error.reason)
                report.messages.append({"node": node, "stage": stage, "error": reason})
                errors.setdefault(node, f"{reason} (secure aggregation, stage {stage})")
                continue
            answered.setdefault(node, []).append(stage)
            report.messages.append({**describe_message(node, reply.content), "stage": stage})
            if stage != Stage.COLLECT_MASKED_VECTORS:
                continue
            try:
                fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
            except Exception as err:  # noqa: BLE001 - a malformed reply is that hospital's failure
                errors.setdefault(node, f"malformed reply ({type(err).__name__}: {err}) (secure aggregation)")
                continue
            info = {k: str(v) for k, v in fitres.metrics.items() if k in INFO_KEYS}
            metrics = {k: v for k, v in fitres.metrics.items() if k not in INFO_KEYS}
            name = strategy.note_reply(report, node, info, metrics)
            if name is not None:
                # the weight it masked its update with (what the sum used), not a clear claim
                metrics["num-examples"] = weight = _weight(reply)
                if weight:
                    self.weights[node] = weight
                report.hospitals[name] = {k: v for k, v in metrics.items() if not k.startswith("dp-")}
                summed.append((name, node))
        # (a hospital whose masked update arrived is in the sum even if it fails to unmask:
        # the others' key shares remove its mask)
        out = {node for _, node in summed} | {d["node"] for d in report.declined}
        for node in sorted(wire.asked.get(Stage.SETUP, set()) - out):
            missed = [
                s for s, nodes in wire.asked.items() if node in nodes and s not in answered.get(node, [])
            ]
            if node in errors:
                reason = errors[node]
            elif missed:
                reason = f"no reply within federation.round-timeout (secure aggregation, stage {missed[0]})"
            else:
                reason = "secure aggregation halted before this hospital's update was asked for"
            strategy.note_failure(report, node, reason)
        return summed
