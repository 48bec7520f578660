"""The end of a cycle, each step done once; and what a stopped run left unfinished.

After its review, a cycle ends in four steps, each recorded in the transaction of its effect:

1. **retrain**: the model file, then its ``models`` row with its promotion; run again on
   the same labels it returns that model ("already trained on these labels"), and a file
   no row names is written over by the next model of its number (:mod:`alflow.tasks.train`);
2. **the cycle row**: one per batch (:meth:`Store.record_cycle` returns the existing one);
3. **the assessment**: label check, stop-set kappa, control estimate and stopping rules
   (:func:`alflow.tasks.stopping.assess_cycle`), stored as the cycle's ``cycle_quality`` row
   together with its report (what its summary shows) and its timings, in one transaction;
4. **the artifacts**: a learning-curve version and the cycle summary in Prefect. They are
   side effects outside the database, so the run records itself as their publisher first,
   then each artifact's id once it exists; the cycle is finished when both are recorded.

A run stopped anywhere (``kill -9``, SIGTERM to `alflow serve`, a worker or `alflow run`)
leaves some prefix of these done. The next cycle run finishes such a cycle before anything
else: the missing steps only, from what is recorded (:func:`finish_interrupted`), and that
is its cycle. An artifact the stopped run created but had not recorded is found in Prefect
under that run (by its key and the cycle its description names) and recorded, not created
again: every cycle has exactly one summary and one learning-curve version, whichever run
published them.

An open batch whose run died before it was shown to anyone (after the query, before the
review) is **adopted** by the next cycle run (:func:`adopt_abandoned_batch`), which reviews
it as its own, so no batch is queried twice. A batch that was shown for review keeps the
rule it had: when its run is gone it is expired, its answers kept, the rest back in the pool
(:mod:`alflow.tasks.review.liveness`), since a person may have seen, half answered or
exported it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import date, datetime
from uuid import UUID

import numpy as np
import pandas as pd
from prefect import get_run_logger

from alflow.config import Settings
from alflow.tasks.agreement import agreement_options, agreement_report
from alflow.tasks.faults import fault_point
from alflow.tasks.report import (
    LEARNING_CURVE_KEY,
    SUMMARY_KEY,
    curve_picture,
    cycle_markdown,
    find_artifact,
    llm_report,
    publish_cycle,
    publish_learning_curve,
    review_outcome,
    summary_description,
)
from alflow.tasks.stopping import assess_cycle_task
from alflow.tasks.store import LabelWrite, Store, owner_gone
from alflow.tasks.timings import CycleClock
from alflow.tasks.embeddings import use_stored_vectors
from alflow.tasks.train import TrainResult, retrain_task

# What a cycle finished by a later run says of its answers: they were recorded by the run
# that reviewed them, nothing is recorded again.
RECORDED_BEFORE = LabelWrite(replayed=True)


def finish_cycle(store: Store, settings: Settings, run_id: str | None, batch_id: str, clock: CycleClock,
                 label_summary: str) -> dict:
    """The end of the cycle of ``batch_id``, whose answers are recorded: retrain and record
    the cycle unless its row exists, then :func:`complete_cycle`. The caller holds the
    cycle lock. Returns the cycle's summary (see :func:`cycle_summary`)."""
    row = store.cycle_of_batch(batch_id)
    if row is None:
        with clock.step("train"):
            train = retrain_task(settings, run_id)
        clock.add("train", -train.evaluate_seconds)
        clock.add("evaluate", train.evaluate_seconds)
        cycle = store.record_cycle(run_id, batch_id, train.model_version, store.batch(batch_id)["strategy"],
                                   train.n_labels, train.metrics, train.promoted)
        fault_point("cycle-row")
    else:  # recorded by an earlier run: its model stands, whatever was answered since
        cycle, train = int(row["cycle"]), recorded_training(row)
    return complete_cycle(store, settings, run_id, cycle, batch_id, train, clock, label_summary)


def complete_cycle(store: Store, settings: Settings, run_id: str | None, cycle: int, batch_id: str | None,
                   train: TrainResult, clock: CycleClock, label_summary: str) -> dict:
    """Assess ``cycle`` unless it was, then publish its artifacts unless they were."""
    recorded = store.cycle_report(cycle)
    if recorded is None or recorded["report"] is None:
        # a cycle finished by a later process assesses before anything here trained or loaded
        use_stored_vectors(store, settings, embed=False)
        assess(store, settings, run_id, cycle, batch_id, train, clock, label_summary)
        fault_point("quality-row")
        recorded = store.cycle_report(cycle)
    if recorded["published_at"] is None:
        publish_artifacts(store, settings, cycle, run_id, recorded["report"])
    return cycle_summary(cycle, recorded["report"])


def assess(store: Store, settings: Settings, run_id: str | None, cycle: int, batch_id: str | None,
           train: TrainResult, clock: CycleClock, label_summary: str) -> None:
    """The labels and the stopping rules judged by the cycle's model, stored with what the
    cycle's summary shows, in one transaction (:meth:`Store.record_assessment`)."""
    counts = store.counts(settings.holdout_fraction)
    with clock.step("evaluate"):
        quality = assess_cycle_task(settings, cycle, train.model_version, counts, train.metrics)
    annotators = agreement_report(store, **agreement_options(settings))
    if batch_id is not None:
        annotators = dict(annotators, batch=agreement_report(store, batch_id, **agreement_options(settings)))
    timings = clock.breakdown()
    report = plain({
        "batch_id": batch_id, "counts": counts, "train": asdict(train), "label_summary": label_summary,
        "metric": settings.evaluation.metric, "quality": quality, "annotators": annotators,
        "prelabel": store.prelabel_agreement(batch_id) if batch_id is not None else None,
        "timings": timings.seconds, "llm": llm_report(store, batch_id),
    })
    store.record_assessment(cycle, train.model_version, quality, report, batch_id, run_id, timings)


def publish_artifacts(store: Store, settings: Settings, cycle: int, run_id: str | None, report: dict) -> None:
    """The cycle's learning-curve version and summary in Prefect, each exactly once (see the
    module docstring): found under the run that last tried, or created and recorded."""
    recorded = store.cycle_report(cycle)
    curve_start = f"**cycle {cycle}**:"  # how alflow.tasks.report.curve_caption begins
    wanted = {"curve": (LEARNING_CURVE_KEY, curve_start), "summary": (SUMMARY_KEY, summary_description(cycle))}
    missing = [kind for kind in wanted if recorded[f"{kind}_artifact"] is None]
    if recorded["publishing_run"]:  # an earlier attempt may have published one and stopped
        for kind in list(missing):
            found = find_artifact(recorded["publishing_run"], *wanted[kind])
            if found is not None:
                store.record_artifact(cycle, kind, found)
                missing.remove(kind)
    if not missing:
        return
    store.start_publishing(cycle, run_id)
    cycles = store.cycles()
    cycles = cycles[cycles["cycle"] <= cycle].reset_index(drop=True)  # the curve as of this cycle
    url, path = curve_picture(cycles, report["metric"], settings.database)
    if "curve" in missing:
        artifact = publish_learning_curve(cycles, url, path)
        fault_point("artifacts")
        store.record_artifact(cycle, "curve", artifact)
    if "summary" in missing:
        train = report["train"] if report["train"]["model_version"] is not None else None
        markdown = cycle_markdown(report["counts"], cycles, train, report["batch_id"], report["label_summary"],
                                  report["metric"], report["prelabel"], url, quality=report["quality"],
                                  annotators=report["annotators"], timings=report["timings"], llm=report.get("llm"))
        store.record_artifact(cycle, "summary", publish_cycle(markdown, cycle))


def cycle_summary(cycle: int, report: dict) -> dict:
    """What a cycle run returns, from the cycle's stored report (the same whichever run
    finished it): cycle, batch_id, model_version, promoted, n_labels, metrics, stop,
    counts, quality, agreement, timings, llm (:func:`~alflow.tasks.report.llm_report`)."""
    train, counts, quality = report["train"], report["counts"], report["quality"]
    stop = quality["stop"] or ("pool exhausted" if counts["pool"] == 0 else None)
    return {"cycle": cycle, "batch_id": report["batch_id"], "model_version": train["model_version"],
            "promoted": train["promoted"], "n_labels": train["n_labels"], "metrics": train["metrics"],
            "stop": stop, "counts": counts, "quality": quality, "agreement": report["annotators"],
            "timings": report["timings"], "llm": report.get("llm")}


def recorded_training(row: dict) -> TrainResult:
    """The retrain a recorded ``cycles`` row holds: its model, labels, metrics, promotion."""
    metrics = json.loads(row["metrics"]) if isinstance(row.get("metrics"), str) else None
    version = None if pd.isna(row["model_version"]) else int(row["model_version"])
    reason = ((metrics or {}).get("promotion") or {}).get("reason", "recorded before")
    return TrainResult(version, int(row["n_labels"]), metrics, bool(row["promoted"]), reason)


# -- what an earlier run left -------------------------------------------------------------------
def finish_interrupted(store: Store, settings: Settings, run_id: str | None) -> dict | None:
    """Finish every cycle an earlier run left unfinished, oldest first: recorded but not
    assessed or not published, or reviewed but not recorded. Returns the last one's
    summary (with ``finished``: the cycles this run finished), or None when there was none.
    The caller holds the cycle lock."""
    logger = get_run_logger()
    finished = []
    summary = None
    for row in store.unfinished_cycles().to_dict("records"):
        batch_id = row["batch_id"] if isinstance(row["batch_id"], str) else None
        logger.warning(f"cycle {row['cycle']} was not finished by the run that recorded it; finishing it")
        summary = complete_cycle(store, settings, run_id, int(row["cycle"]), batch_id, recorded_training(row),
                                 clock_of(store, batch_id), arrival_of(store, batch_id))
        finished.append(summary["cycle"])
    while (batch := store.labeled_batch_without_cycle()) is not None:
        logger.warning(f"batch {batch['batch_id']} was answered but its run stopped before recording its cycle; "
                       "finishing it")
        summary = finish_cycle(store, settings, run_id, batch["batch_id"], clock_of(store, batch["batch_id"]),
                               arrival_of(store, batch["batch_id"]))
        finished.append(summary["cycle"])
    if summary is None:
        return None
    return dict(summary, labels_written=asdict(RECORDED_BEFORE), finished=finished)


def arrival_of(store: Store, batch_id: str | None) -> str:
    """How the answers of a cycle another run recorded arrived ("from the terminal", ...),
    for the summary of the run that finishes it."""
    return (review_outcome(store, batch_id)[1] if batch_id else "") or RECORDED_BEFORE.summary()


def clock_of(store: Store, batch_id: str | None) -> CycleClock:
    """The timings a cycle's first process stored before its review, if any, to go on with."""
    stored = store.batch_timings(batch_id) if batch_id is not None else None
    return CycleClock(stored)


def adopt_abandoned_batch(store: Store, run_id: str | None) -> str | None:
    """Take over the oldest open batch nobody was shown whose run is gone (see the module
    docstring): it becomes this run's batch (its ``flow_run_id`` and owner), the old run
    is marked Crashed if Prefect still thinks it runs. Returns its id, or None."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    waiting = store.unoffered_batches()
    if waiting.empty:
        return None
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        for batch in waiting.to_dict("records"):
            old_run = batch["flow_run_id"] if isinstance(batch["flow_run_id"], str) else None
            if old_run is not None and old_run == run_id:
                continue
            state = _run_state(client, old_run)
            why = _abandoned(batch, state)
            if why is None or not store.adopt_batch(batch["batch_id"], old_run, run_id):
                continue
            if old_run is not None and state is not None and not state.is_final():
                client.set_flow_run_state(UUID(old_run), Crashed(
                    message=f"its batch {batch['batch_id']} was taken over by run {run_id}: {why}"), force=True)
            logger.warning(f"batch {batch['batch_id']} was queried by run {old_run} but never reviewed ({why}); "
                           "this run reviews it")
            return batch["batch_id"]
    return None


def _run_state(client, flow_run_id: str | None):
    from prefect.exceptions import ObjectNotFound

    if flow_run_id is None:
        return None
    try:
        return client.read_flow_run(UUID(flow_run_id)).state
    except (ObjectNotFound, ValueError):  # a run on another Prefect server, or no run id
        return None


def _abandoned(batch: dict, state) -> str | None:
    """Why nobody will come back for an open batch nobody was shown, or None while its run
    may: the run ended, or its process is gone and Prefect will not start it again."""
    if state is not None and state.is_final():
        return f"its run ended {state.type.value.lower()}"
    if state is not None and (state.is_scheduled() or state.is_pending() or state.is_paused()):
        return None  # it starts again (or is resumed) and finds its batch
    if owner_gone(batch.get("owner")):
        return f"the process that queried it ({batch['owner']}) is gone"
    return None


# -- JSON ----------------------------------------------------------------------------------------
def plain(value):
    """``value`` as plain JSON: numpy scalars and arrays as numbers and lists, NaN and
    infinities as None (JSON has none), dates as ISO strings, keys as strings."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    if value is pd.NA or value is pd.NaT:
        return None
    return value
