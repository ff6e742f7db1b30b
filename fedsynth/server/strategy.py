"""FedAvg over generator weights that rejects malformed updates and records each hospital."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from ..shared.records import ARRAYS, HOSPITAL, METRICS, arrays_to_numpy
from .validation import check_update

__all__ = ["GeneratorFedAvg", "RoundReport"]

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """Who contributed to a round, who failed and who was rejected, and why."""

    round: int
    hospitals: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    declined: list[dict[str, Any]] = field(default_factory=list)
    # Per hospital, what it reports having spent (DP runs): dp-* metrics and the unit.
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)


class GeneratorFedAvg(FedAvg):
    """Flower's FedAvg (weighted by ``num-examples``) applied to the model record the
    hospitals return (the generator, plus the discriminator when it is aggregated).

    Before averaging, every reply is checked against the global model's tensor names and
    shapes and for non-finite values (``check_update``); failures and rejections are
    kept in ``last_report`` with the hospital's name and the reason.
    """

    def __init__(self, *, expected_shapes: dict[str, tuple[int, ...]], **kwargs: Any) -> None:
        super().__init__(arrayrecord_key=ARRAYS, **kwargs)
        self.expected_shapes = expected_shapes
        self.last_report = RoundReport(round=0)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = RoundReport(round=server_round)
        accepted: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                report.failures.append({"node": node, "reason": _first_line(msg.error.reason)})
                continue
            content = msg.content
            info = content[HOSPITAL] if HOSPITAL in content.config_records else ConfigRecord()
            name = str(info.get("name", f"node-{node}"))
            metrics = content[METRICS] if METRICS in content.metric_records else MetricRecord()
            spent = {k: v for k, v in metrics.items() if k.startswith("dp-")}
            if spent:
                report.privacy[name] = {**spent, "dp-unit": str(info.get("dp-unit", "slice"))}
            if "declined" in info:
                report.declined.append({"hospital": name, "node": node, "reason": str(info["declined"])})
                continue
            if ARRAYS not in content.array_records:
                problem: str | None = "no model weights in the reply"
            else:
                problem = check_update(
                    arrays_to_numpy(content[ARRAYS]), self.expected_shapes, metrics.get("num-examples")
                )
            if problem:
                log.warning("round %d: rejected the update of %s: %s", server_round, name, problem)
                report.rejected.append({"hospital": name, "node": node, "reason": problem})
                continue
            report.hospitals[name] = {k: v for k, v in metrics.items() if not k.startswith("dp-")}
            accepted.append(msg)
        self.last_report = report
        if not accepted:
            return None, None
        return super().aggregate_train(server_round, accepted)


def _first_line(text: str | None) -> str:
    """Flower puts a whole traceback in the error reason; keep the exception line."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"
