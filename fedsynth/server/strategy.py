"""FedAvg over generator weights that rejects malformed updates and records each hospital."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
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
    # Client-level DP on the server: hospitals averaged, how many were clipped, noise std.
    client_dp: dict[str, Any] = field(default_factory=dict)


class GeneratorFedAvg(FedAvg):
    """Flower's FedAvg (weighted by ``num-examples``) applied to the model record the
    hospitals return (the generator, plus the discriminator when it is aggregated).

    Before averaging, every reply is checked against the global model's tensor names and
    shapes and for non-finite values (``check_update``); failures and rejections are
    kept in ``last_report`` with the hospital's name and the reason.
    """

    def __init__(
        self,
        *,
        expected_shapes: dict[str, tuple[int, ...]],
        client_dp: tuple[float, float, set[str]] | None = None,
        **kwargs: Any,
    ) -> None:
        """``client_dp``: (noise multiplier, clip, names of the trainable tensors), or None."""
        super().__init__(arrayrecord_key=ARRAYS, **kwargs)
        self.expected_shapes = expected_shapes
        self.client_dp = client_dp
        # Client-level DP noise from the operating system's entropy: a seed from the run
        # config would let every hospital (they all have it) subtract the noise.
        self.rng = np.random.default_rng()
        self.current: dict[str, np.ndarray] = {}
        self.last_report = RoundReport(round=0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays_to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

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
        if self.client_dp is not None:
            return self._aggregate_client_dp(accepted, report), None
        return super().aggregate_train(server_round, accepted)

    def _aggregate_client_dp(self, accepted: list[Message], report: RoundReport) -> ArrayRecord:
        """DP-FedAvg (McMahan et al. 2018): each hospital's update of the trainable tensors
        is clipped to L2 norm C, the clipped updates are averaged with equal weights (so
        one hospital moves the sum by at most C), and Gaussian noise of std sigma*C / n is
        added to the average. Buffers (BatchNorm statistics) are not averaged: the server
        recomputes them from the noised generator (post-processing).

        Not Flower's DifferentialPrivacyServerSideFixedClipping: that wrapper clips and
        noises every array, BatchNorm buffers and integer counters included, and assumes
        the wrapped FedAvg weights hospitals equally, while this one weights by examples.
        """
        sigma, clip, trainable = self.client_dp  # type: ignore[misc]
        total = {k: np.zeros_like(self.current[k], dtype=np.float64) for k in trainable}
        clipped = 0
        for msg in accepted:
            update = arrays_to_numpy(msg.content[ARRAYS])
            delta = {k: update[k].astype(np.float64) - self.current[k] for k in trainable}
            norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
            scale = min(1.0, clip / (norm + 1e-12))
            clipped += scale < 1.0
            for k in trainable:
                total[k] += delta[k] * scale
        n = len(accepted)
        std = sigma * clip / n
        out = {}
        for k, value in self.current.items():
            if k in trainable:
                noise = self.rng.normal(0.0, std, size=value.shape)
                value = (value + total[k] / n + noise).astype(value.dtype)
            out[k] = value
        report.client_dp = {"hospitals": n, "clipped": int(clipped), "noise_std": std,
                            "noise_multiplier": sigma, "clip": clip}
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})


def _first_line(text: str | None) -> str:
    """Flower puts a whole traceback in the error reason; keep the exception line."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    line = lines[-1].strip() if lines else "unknown error"
    # "Exception ClientAppException occurred. Message: <the ClientApp's error>'>"
    match = re.search(r"Message: (.*?)'?>?$", line)
    return match.group(1).strip() if match else line
