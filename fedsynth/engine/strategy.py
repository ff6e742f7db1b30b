"""FedAvg over generator weights that rejects malformed updates and records each hospital."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedsynth.core.weights import DISCRIMINATOR, GENERATOR
from fedsynth.engine.records import ARRAYS, HOSPITAL, HOSPITALS_ASKED, METRICS, arrays_to_numpy, number
from fedsynth.engine.updates import check_update, read_update, relative_update_norm

__all__ = ["RELEASE", "GeneratorFedAvg", "RoundReport", "describe_message", "first_line"]

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
    # What every reply carried (record names, array shapes and dtypes, metric types):
    # the evidence of what left each hospital, kept in RUN/messages.jsonl.
    messages: list[dict[str, Any]] = field(default_factory=list)


# The prefix of the tensors a hospital of a summary-federating family (dp-merf) sends in
# place of weights: ``release.sum``, ``release.count``.
RELEASE = "release"

# A family whose networks have parts trained by only some hospitals (cyclegan's two
# translators and two PatchGANs) reports a weight per part: the metric ``weight-<part>``
# weights the tensors ``generator.<part>.*`` and ``discriminator.<part>.*`` in the average.
PART_WEIGHT = "weight-"


def part_metric(key: str) -> str | None:
    """The metric that would weight tensor ``key`` (``generator.a2b.x`` -> ``weight-a2b``)."""
    network, _, rest = key.partition(".")
    part, dot, _ = rest.partition(".")
    return f"{PART_WEIGHT}{part}" if network in (GENERATOR, DISCRIMINATOR) and dot else None


class GeneratorFedAvg(FedAvg):
    """Flower's FedAvg (weighted by ``num-examples``) applied to the model record the
    hospitals return (the generator, plus the discriminator when it is aggregated).

    Before averaging, every reply is checked against the global model's tensor names,
    shapes and dtypes, for non-finite values and for its norm (``check_update``);
    failures (an error, or no reply at all from a hospital that was asked) and
    rejections are kept in ``last_report`` with the hospital's name and the reason.
    """

    def __init__(
        self,
        *,
        expected_shapes: dict[str, tuple[int, ...]],
        expected_dtypes: dict[str, np.dtype] | None = None,
        client_dp: tuple[float, float, set[str]] | None = None,
        server_step: tuple[float, float, set[str]] | None = None,
        max_update_norm: float = 0.0,
        node_names: dict[int, str] | None = None,
        sum_updates: bool = False,
        **kwargs: Any,
    ) -> None:
        """``client_dp``: (noise multiplier, clip, names of the trainable tensors), or None.
        ``server_step``: (momentum, step size, names of the trainable tensors) for FedAvgM,
        or None for plain averaging.
        ``max_update_norm``: largest ||update - global|| / ||global|| accepted (0: no bound).
        ``node_names``: the names hospitals were registered under, by SuperNode id; they
        win over the name a reply declares, and name nodes that fail before replying.
        ``sum_updates``: add the accepted replies' arrays instead of averaging them (the
        releases of a family that federates a summary, dp-merf's, are sums)."""
        super().__init__(arrayrecord_key=ARRAYS, **kwargs)
        self.expected_shapes = expected_shapes
        self.expected_dtypes = expected_dtypes
        self.max_update_norm = max_update_norm
        self.sum_updates = sum_updates
        self.registered: dict[int, str] = dict(node_names or {})
        self.node_names: dict[int, str] = dict(self.registered)
        self.sent: list[Message] = []
        self.client_dp = client_dp
        self.server_step = server_step
        # FedAvgM's velocity; starts at zero (also after a resume: it is not checkpointed).
        self.velocity: dict[str, np.ndarray] = {}
        # Client-level DP noise from the operating system's entropy: a seed from the run
        # config would let every hospital (they all have it) subtract the noise.
        self.rng = np.random.default_rng()
        self.current: dict[str, np.ndarray] = {}
        self.last_report = RoundReport(round=0)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = arrays_to_numpy(arrays)
        # Kept: the grid gives each message its id when it pushes it, and a reply (or
        # the SuperLink's "node unavailable" error) names the message it answers.
        self.sent = list(super().configure_train(server_round, arrays, config, grid))
        for msg in self.sent:  # how many copies will be averaged: the hospitals scale their steps by it
            msg.content.config_records[self.configrecord_key][HOSPITALS_ASKED] = len(self.sent)
        return self.sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = RoundReport(round=server_round)
        accepted: list[Message] = []
        asked = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self.sent}
        answered: set[int] = set()
        for msg in replies:
            # The node a reply is about: the one its question went to (an error from the
            # SuperLink, e.g. "node unavailable", has the SuperLink as sender).
            node = asked.get(msg.metadata.reply_to_message_id, int(msg.metadata.src_node_id))
            answered.add(node)
            if msg.has_error():
                reason = first_line(msg.error.reason)
                report.messages.append({"node": node, "error": reason})
                self.note_failure(report, node, reason)
                continue
            content = msg.content
            report.messages.append(describe_message(node, content))
            info = content.config_records[HOSPITAL] if HOSPITAL in content.config_records else ConfigRecord()
            metrics = content.metric_records[METRICS] if METRICS in content.metric_records else MetricRecord()
            name = self.note_reply(report, node, info, metrics)
            if name is None:
                continue
            problem: str | None = None
            norm = None
            if ARRAYS not in content.array_records:
                problem = "no model weights in the reply"
            else:
                try:
                    update = read_update(content.array_records[ARRAYS])
                except ValueError as err:
                    problem = str(err)
                else:
                    problem = check_update(
                        update,
                        self.expected_shapes,
                        metrics.get("num-examples"),
                        expected_dtypes=self.expected_dtypes,
                        current=self.current,
                        max_update_norm=self.max_update_norm,
                    )
                    if problem is None and self.current:
                        norm = relative_update_norm(update, self.current)
            if problem:
                log.warning("round %d: rejected the update of %s: %s", server_round, name, problem)
                report.rejected.append({"hospital": name, "node": node, "reason": problem})
                continue
            report.hospitals[name] = {k: v for k, v in metrics.items() if not k.startswith("dp-")}
            if norm is not None:
                report.hospitals[name]["update-norm"] = round(norm, 6)
            accepted.append(msg)
        for node in sorted(set(asked.values()) - answered):
            self.note_failure(report, node, "no reply within federation.round-timeout")
        self.last_report = report
        if not accepted:
            return None, None
        if self.sum_updates:
            return self._sum(accepted), None
        if self.client_dp is not None:
            return self.apply_server_step(self._aggregate_client_dp(accepted, report)), None
        if any(
            metric.startswith(PART_WEIGHT)
            for msg in accepted
            for metric in msg.content.metric_records[METRICS]
        ):
            averaged, untrained = self._aggregate_parts(accepted)
            return self.apply_server_step(averaged, keep=untrained), None
        # Hospitals report different metrics (a DP hospital adds its spend and withholds
        # its discriminator's losses), and Flower's FedAvg refuses replies whose metric
        # keys differ. The metrics are kept in the report already; FedAvg needs only the
        # weight of each update.
        for msg in accepted:
            msg.content[METRICS] = MetricRecord(
                {"num-examples": number(msg.content.metric_records[METRICS]["num-examples"])}
            )
        fed_averaged, fed_metrics = super().aggregate_train(server_round, accepted)
        return (self.apply_server_step(fed_averaged) if fed_averaged is not None else None), fed_metrics

    def note_reply(
        self, report: RoundReport, node: int, info: Mapping[str, Any], metrics: Mapping[str, Any]
    ) -> str | None:
        """Name the hospital behind a reply (``info``: its declared name, privacy unit and
        decline) and keep what it spent in ``report.privacy``; returns its name, or None
        when it declined the round (then listed in ``report.declined``)."""
        name = self.registered.get(node) or str(info.get("name", f"node-{node}"))
        self.node_names[node] = name
        spent = {k: v for k, v in metrics.items() if k.startswith("dp-")}
        if spent:
            report.privacy[name] = {**spent, "dp-unit": str(info.get("dp-unit", "slice"))}
        if "declined" in info:
            report.declined.append({"hospital": name, "node": node, "reason": str(info["declined"])})
            return None
        return name

    def note_failure(self, report: RoundReport, node: int, reason: str) -> None:
        """A hospital that was asked and failed: an error, or no reply."""
        report.failures.append(
            {"node": node, "hospital": self.node_names.get(node, f"node-{node}"), "reason": reason}
        )

    @staticmethod
    def _sum(accepted: list[Message]) -> ArrayRecord:
        """The accepted replies' arrays added up, key by key (float64, then float32)."""
        updates = [arrays_to_numpy(m.content.array_records[ARRAYS]) for m in accepted]
        total = {key: np.sum([u[key].astype(np.float64) for u in updates], axis=0) for key in updates[0]}
        return ArrayRecord({k: Array(np.ascontiguousarray(v.astype(np.float32))) for k, v in total.items()})

    def _aggregate_parts(self, accepted: list[Message]) -> tuple[ArrayRecord, set[str]]:
        """Each part averaged with its own weights (``part_metric``), the other tensors by
        ``num-examples``. Cyclegan's hospitals report ``weight-a2b`` (``weight-b2a``), the
        number of real slices the translator's adversarial signal came from, and
        ``weight-a`` (``weight-b``), their real slices of each domain; 0 means a hospital
        could not train that part (no slices of the domain it needs), so its copy,
        unchanged, is left out. A part no hospital trained this round keeps the global
        weights (returned, so the server step leaves them be)."""
        updates = [
            (arrays_to_numpy(m.content.array_records[ARRAYS]), m.content.metric_records[METRICS])
            for m in accepted
        ]
        out = {}
        untrained = set()
        for key in updates[0][0]:
            weights = []
            metric = part_metric(key)
            for _, metrics in updates:
                weight = number(metrics["num-examples"])
                if metric is not None and metric in metrics:
                    weight = number(metrics[metric])
                weights.append(weight)
            total = sum(weights)
            value: np.ndarray | float
            if total <= 0:
                value = self.current.get(key, updates[0][0][key])
                untrained.add(key)
            else:
                value = (
                    sum(w * u[key].astype(np.float64) for w, (u, _) in zip(weights, updates, strict=True))
                    / total
                )
            out[key] = np.asarray(value).astype(updates[0][0][key].dtype)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()}), untrained

    def apply_server_step(self, averaged: ArrayRecord, keep: set[str] | None = None) -> ArrayRecord:
        """FedAvgM (Hsu et al. 2019): the server treats the averaged update as a gradient
        and steps along its momentum, ``v = beta v + (avg - global)``, ``global += lr v``.
        Only trainable tensors move this way; BatchNorm statistics are the plain average.
        ``keep``: tensors nobody trained this round (a part: see ``_aggregate_parts``), left as they are."""
        if self.server_step is None or not self.current:
            return averaged
        momentum, lr, trainable = self.server_step
        if momentum == 0 and lr == 1:
            return averaged
        avg = arrays_to_numpy(averaged)
        out = {}
        for k, value in avg.items():
            if k in trainable and k not in (keep or ()):
                delta = value.astype(np.float64) - self.current[k]
                velocity = momentum * self.velocity.get(k, 0.0) + delta
                self.velocity[k] = velocity
                value = (self.current[k] + lr * velocity).astype(value.dtype)
            out[k] = value
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})

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
            update = arrays_to_numpy(msg.content.array_records[ARRAYS])
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
        report.client_dp = {
            "hospitals": n,
            "clipped": int(clipped),
            "noise_std": std,
            "noise_multiplier": sigma,
            "clip": clip,
        }
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in out.items()})


def describe_message(node: int, content: Any) -> dict[str, Any]:
    """What a reply carries, without its values: record names, every array's shape and
    dtype, every metric's and config entry's type (strings by length)."""
    arrays = {}
    for record_name in content.array_records:
        for key, array in content[record_name].items():
            arrays[f"{record_name}/{key}"] = [list(array.shape), str(array.dtype)]
    metrics = {f"{r}/{k}": type(v).__name__ for r in content.metric_records for k, v in content[r].items()}
    configs = {
        f"{r}/{k}": (f"str[{len(v)}]" if isinstance(v, str) else type(v).__name__)
        for r in content.config_records
        for k, v in content[r].items()
    }
    return {"node": node, "arrays": arrays, "metrics": metrics, "configs": configs}


def first_line(text: str | None) -> str:
    """Flower puts a whole traceback in the error reason; keep the exception line."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    line = lines[-1].strip() if lines else "unknown error"
    # "Exception ClientAppException occurred. Message: <the ClientApp's error>'>"
    match = re.search(r"Message: (.*?)'?>?$", line)
    return match.group(1).strip() if match else line
