"""Flower ServerApp: federated rounds over the generator, with checkpoints and a run directory."""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedsynth.core.weights import DISCRIMINATOR, GENERATOR, load_weights
from fedsynth.engine.records import METRICS, arrays_to_numpy, number, pack_model, unpack_model
from fedsynth.engine.secure import SecureAggregator
from fedsynth.engine.strategy import RELEASE, GeneratorFedAvg, RoundReport, first_line
from fedsynth.models import EMBEDDING, build_networks
from fedsynth.models.networks import GeneratorNet
from fedsynth.runs.config import RunConfig
from fedsynth.runs.rundir import RunDir
from fedsynth.runs.tracking import RunTracker
from fedsynth.server.bookkeeping import (
    build_global_models,
    record_client_privacy,
    record_privacy,
    record_round,
    restore_round,
    start_average,
    update_average,
)
from fedsynth.synthesis.generator import find_warm_start

__all__ = ["RoundFailed", "app", "federate"]

log = logging.getLogger(__name__)

app = ServerApp()


class RoundFailed(RuntimeError):
    """Too few hospitals returned a usable update for a round to count."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls, in simulation and in deployment alike."""
    federate(grid, RunConfig.from_run_config(context.run_config))


def federate(grid: Grid, cfg: RunConfig) -> RunDir:
    """Run ``cfg.federation.rounds`` rounds (continuing after the last checkpoint when
    ``output.resume`` is set), recording every round in the run directory.

    Raises
    ------
    RoundFailed
        A round in which fewer than ``federation.min-hospitals`` updates were usable.
    """
    run = RunDir(cfg.output.run_dir)
    # This ServerApp's claim on the run directory: a ServerApp orphaned by a coordinator
    # crash, failing later, must not overwrite the status of the run that resumed.
    owner = uuid.uuid4().hex
    run.set_status("running", rounds=cfg.federation.rounds, owner=owner)
    try:
        stopped = _federate(grid, cfg, run)
    except BaseException as err:
        if run.status().get("owner") == owner:
            run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    if run.status().get("owner") != owner:
        log.warning("%s was taken over by another ServerApp; leaving its status alone", run.root)
    elif stopped:
        run.set_status(
            "finished",
            rounds=run.last_round() or 0,
            planned_rounds=cfg.federation.rounds,
            stopped_early=stopped,
        )
    else:
        run.set_status("finished", rounds=cfg.federation.rounds)
    return run


def _federate(grid: Grid, cfg: RunConfig, run: RunDir) -> str | None:
    """The rounds; returns why the run stopped before its last round, if it did."""
    started = time.perf_counter()
    gen, disc = build_global_models(cfg)
    average = start_average(cfg, gen)
    last = run.last_round()
    if cfg.output.resume and last is not None:
        restore_round(run, last, gen, disc, average)
        run.truncate_rounds_after(last)
        start = last + 1
        log.info("resuming after round %d", last)
        tracker = RunTracker(run, cfg, resumed_after=last)
    else:
        if last is not None:
            raise RuntimeError(
                f"{run.root} already holds checkpoints; resume it (output.resume) or use a new run directory"
            )
        initial = record_round(run, cfg, 0, gen, disc, report={}, seconds=0.0, average=average)
        start = 1
        tracker = RunTracker(run, cfg)
        tracker.round(initial)
    state = "failed"
    try:
        if cfg.model.family.federation == EMBEDDING:
            stopped = _release_round(grid, cfg, run, gen, tracker) if start == 1 else None
        else:
            stopped = _rounds(grid, cfg, run, gen, disc, start, started, tracker, average)
        state = "finished"
        return stopped
    finally:
        tracker.close(state)


def _rounds(
    grid: Grid,
    cfg: RunConfig,
    run: RunDir,
    gen: GeneratorNet,
    disc: nn.Module | None,
    start: int,
    started: float,
    tracker: RunTracker,
    average: GeneratorNet | None = None,
) -> str | None:
    """Rounds ``start`` onwards; returns why the run stopped before its last round, if it did.
    ``average``: the generator's running average over rounds, updated after each round."""
    arrays = pack_model(gen, disc)
    client_dp = None
    trainable = {f"{GENERATOR}.{k}" for k, _ in gen.named_parameters()}
    if disc is not None:
        trainable |= {f"{DISCRIMINATOR}.{k}" for k, _ in disc.named_parameters()}
    if cfg.federation.client_dp_noise_multiplier > 0:
        client_dp = (cfg.federation.client_dp_noise_multiplier, cfg.federation.client_dp_clip, trainable)
    strategy = GeneratorFedAvg(
        expected_shapes={k: tuple(v.shape) for k, v in arrays.items()},
        expected_dtypes={k: v.numpy().dtype for k, v in arrays.items()},
        max_update_norm=cfg.federation.max_update_norm,
        node_names=run.node_names(),
        client_dp=client_dp,
        server_step=(cfg.federation.server_momentum, cfg.federation.server_lr, trainable),
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=0.0,  # validation messages are sent by _validate, to the hospitals that trained
        min_train_nodes=cfg.federation.min_hospitals,
        min_available_nodes=cfg.federation.min_hospitals,
    )
    secure = SecureAggregator()
    for round_ in range(start, cfg.federation.rounds + 1):
        began = time.perf_counter()
        if cfg.federation.secure_aggregation == "on":
            # SecAgg+'s four stages: waiting and summing are interleaved, timed as waiting
            aggregated = secure.round(strategy, round_, arrays, grid, timeout=cfg.federation.round_timeout)
            waited, aggregating = time.perf_counter() - began, 0.0
        else:
            messages = strategy.configure_train(round_, arrays, ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
            waited = time.perf_counter() - began
            aggregated, _ = strategy.aggregate_train(round_, replies)
            aggregating = time.perf_counter() - began - waited
        report = strategy.last_report
        stopped = _take_replies(run, cfg, round_, report, usable=aggregated is not None, doing="train")
        if stopped or aggregated is None:
            return stopped
        arrays = aggregated
        gen_state, disc_state = unpack_model(arrays)
        load_weights(gen, gen_state)
        if disc is not None:
            load_weights(disc, disc_state)
        if client_dp is not None:
            cfg.model.family.after_noised_update(
                gen, num_classes=len(cfg.data.classes), seed=cfg.train.seed + round_
            )
            arrays = pack_model(gen, disc)
            record_client_privacy(run, cfg, round_, report)
        if average is not None:
            update_average(average, gen, round_, cfg.federation.generator_average)
        trained = [node for node, name in strategy.node_names.items() if name in report.hospitals]
        # the hospitals score what sampling draws from: the running average, where there is one
        scored = pack_model(average, disc) if average is not None else arrays
        validation = (
            _validate(strategy, round_, scored, grid, cfg, trained) if validation_enabled(cfg) else None
        )
        record = record_round(
            run,
            cfg,
            round_,
            gen,
            disc,
            report={
                "hospitals": report.hospitals,
                "failures": report.failures,
                "rejected": report.rejected,
                "declined": report.declined,
                **({"validation": validation} if validation else {}),
                # the server's side of the round: waiting for the hospitals, then checking and averaging
                "server": {"wait-seconds": round(waited, 3), "aggregate-seconds": round(aggregating, 4)},
            },
            seconds=time.perf_counter() - began,
            average=average,
        )
        tracker.round(record)
        if report.declined and cfg.dp.on_budget_exhausted == "stop":
            names = ", ".join(d["hospital"] for d in report.declined)
            return f"round {round_}: {names} declined for privacy budget and dp.on-budget-exhausted is 'stop'"
        spent = time.perf_counter() - started
        if (
            cfg.federation.time_budget
            and spent >= cfg.federation.time_budget
            and round_ < cfg.federation.rounds
        ):
            return (
                f"round {round_}: federation.time-budget of {cfg.federation.time_budget:g} s spent "
                f"({spent:.0f} s)"
            )
    return None


def _release_round(
    grid: Grid, cfg: RunConfig, run: RunDir, gen: GeneratorNet, tracker: RunTracker
) -> str | None:
    """The one round of a family that federates a summary (dp-merf): the server sends
    no weights, only the round number; every hospital replies with its (noisy) release,
    checked like an update (names, shapes, finite values); the server adds the releases
    and fits the generator to their sum. Returns why the run stopped, if too few
    hospitals had budget left to release."""
    began = time.perf_counter()
    family = cfg.model.family
    strategy = GeneratorFedAvg(
        expected_shapes={f"{RELEASE}.{k}": v for k, v in family.release_shapes(cfg).items()},
        node_names=run.node_names(),
        sum_updates=True,
        fraction_train=1.0,  # one release per hospital: every hospital is asked
        fraction_evaluate=0.0,
        min_train_nodes=cfg.federation.min_hospitals,
        min_available_nodes=cfg.federation.min_hospitals,
    )
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages, timeout=cfg.federation.round_timeout)
    summed, _ = strategy.aggregate_train(1, replies)
    report = strategy.last_report
    stopped = _take_replies(run, cfg, 1, report, usable=summed is not None, doing="release")
    if stopped or summed is None:
        return stopped
    released = {k.removeprefix(f"{RELEASE}."): v for k, v in arrays_to_numpy(summed).items()}
    _, features = build_networks(cfg)
    log.info("fitting the generator to the releases of %s", ", ".join(report.hospitals))
    owner = run.status().get("owner")

    def progress(step: int, steps: int) -> None:  # shown by `fedsynth simulate`'s progress bar
        if step % max(1, steps // 50) == 0 or step == steps:
            run.set_status("running", rounds=1, owner=owner, fitting=[step, steps])

    fit = family.fit(gen, features, released, cfg, progress=progress)
    record = record_round(
        run,
        cfg,
        1,
        gen,
        None,
        report={
            "hospitals": report.hospitals,
            "failures": report.failures,
            "rejected": report.rejected,
            "declined": report.declined,
            "fit": fit,
        },
        seconds=time.perf_counter() - began,
    )
    tracker.round(record)
    return None


def _take_replies(
    run: RunDir, cfg: RunConfig, round_: int, report: RoundReport, *, usable: bool, doing: str
) -> str | None:
    """Record what the round's replies carried (``messages.jsonl``) and what each hospital
    spent (``privacy.jsonl``); with fewer than ``federation.min-hospitals`` usable replies,
    return why the run stops (hospitals out of privacy budget) or raise ``RoundFailed``."""
    for message in report.messages:
        run.append_message({"round": round_, **message})
    record_privacy(run, round_, report, warm_start=_warm_record(cfg))
    if usable and len(report.hospitals) >= cfg.federation.min_hospitals:
        return None
    if report.declined and not report.failures and not report.rejected:
        names = ", ".join(d["hospital"] for d in report.declined)
        return (
            f"round {round_}: too few hospitals with privacy budget left to {doing} ({names} declined; "
            f"federation.min-hospitals is {cfg.federation.min_hospitals})"
        )
    raise RoundFailed(_describe_failure(report, cfg.federation.min_hospitals))


def _warm_record(cfg: RunConfig) -> dict[str, object] | None:
    """The warm start the privacy ledger names (``train.init-from``), or None."""
    return find_warm_start(cfg.train.init_from).record() if cfg.train.init_from else None


def validation_enabled(cfg: RunConfig) -> bool:
    """Whether hospitals score each round on their validation slices: ``auto`` is on
    unless DP is on (the score leaves without noise, outside any privacy ledger)."""
    if cfg.federation.validation_score != "auto":
        return cfg.federation.validation_score == "on"
    return not (cfg.dp.enabled or cfg.federation.client_dp_noise_multiplier > 0)


def _validate(
    strategy: GeneratorFedAvg,
    round_: int,
    arrays: ArrayRecord,
    grid: Grid,
    cfg: RunConfig,
    trained: list[int],
) -> dict[str, Any]:
    """The hospitals that trained this round score the new global generator on their own
    validation slices (patients they never train on); only the score comes back. The
    round's score is their Fréchet distances averaged with their validation slice counts
    as weights; `fedsynth sample --round best` compares rounds scored by the same
    hospitals. A hospital that fails or does not answer is listed and never stops the run;
    the server waits at most 10 minutes (or federation.round-timeout, if shorter)."""
    if not trained:
        return {"hospitals": {}}
    record = RecordDict(
        {strategy.arrayrecord_key: arrays, strategy.configrecord_key: ConfigRecord({"server-round": round_})}
    )
    messages = [
        Message(content=record, dst_node_id=node, message_type=MessageType.EVALUATE) for node in trained
    ]
    scores: dict[str, dict[str, float]] = {}
    failures: list[dict[str, Any]] = []
    answered: set[int] = set()
    replies = list(grid.send_and_receive(messages, timeout=min(cfg.federation.round_timeout, 600.0)))
    asked = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in messages}
    for reply in replies:
        node = asked.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
        answered.add(node)
        name = strategy.node_names.get(node, f"node-{node}")
        if reply.has_error():
            failures.append({"node": node, "hospital": name, "reason": first_line(reply.error.reason)})
            continue
        metrics = (
            reply.content.metric_records[METRICS]
            if METRICS in reply.content.metric_records
            else MetricRecord()
        )
        n = int(number(metrics.get("val-n", 0)))
        fd = number(metrics["val-fd"]) if "val-fd" in metrics else None
        if n > 0 and fd is not None and math.isfinite(fd):
            scores[name] = {"fd": fd, "n": n}
            if "val-cycle" in metrics:  # cyclegan: the mean cycle error on the validation slices
                scores[name]["cycle"] = number(metrics["val-cycle"])
    for node in sorted(set(trained) - answered):
        failures.append(
            {"node": node, "hospital": strategy.node_names.get(node, f"node-{node}"), "reason": "no reply"}
        )
    out: dict[str, Any] = {"hospitals": scores}
    if scores:
        total = sum(v["n"] for v in scores.values())
        out["fd"] = sum(v["fd"] * v["n"] for v in scores.values()) / total
    if failures:
        out["failures"] = failures
    return out


def _describe_failure(report: RoundReport, needed: int) -> str:
    problems = [f"{f.get('hospital', f['node'])}: {f['reason']}" for f in report.failures]
    problems += [f"{r['hospital']}: rejected, {r['reason']}" for r in report.rejected]
    detail = "; ".join(problems) if problems else "no replies"
    return (
        f"round {report.round}: {len(report.hospitals)} usable update(s), federation.min-hospitals is "
        f"{needed} ({detail})"
    )
