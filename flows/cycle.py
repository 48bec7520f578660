"""One active-learning cycle, as a Prefect flow.

    ingest -> load model -> pre-label pool -> query batch -> review (pause) -> record labels
           -> retrain + evaluate -> record cycle + artifacts

Every step can be re-run: ingest and pre-label skip what is stored, the query returns the
run's existing batch, retraining on unchanged labels returns the model already trained.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run

from alflow.config import CONFIG_FILENAME, ConfigError, load_config
from alflow.flows.ingest import ingest
from alflow.tasks.prelabel import prelabel_task
from alflow.tasks.query import query_task
from alflow.tasks.report import cycle_markdown, publish_batch, publish_cycle
from alflow.tasks.review import (
    answers_from_form,
    build_review_form,
    expire_stale_batches,
    form_defaults,
    simulated_answers,
)
from alflow.tasks.store import LabelWrite, Store
from alflow.tasks.train import load_model_task, retrain_task


def alflow_command() -> str:
    """How to call `alflow` from the user's shell: bare if on PATH, else by its path."""
    installed = Path(sys.executable).with_name("alflow")
    on_path = shutil.which("alflow")
    if not installed.exists() or (on_path and Path(on_path).resolve() == installed.resolve()):
        return "alflow"
    try:
        return str(installed.relative_to(Path.cwd()))
    except ValueError:
        return str(installed)


def review_instructions(batch_id: str, n: int, url: str | None, config_path: str) -> str:
    default = Path(CONFIG_FILENAME).resolve()
    cmd = alflow_command()
    config = "" if Path(config_path).resolve() == default else f" --config {config_path}"
    where = f"  in the Prefect UI: {url} -> Resume\n" if url else ""
    return (
        f"Batch {batch_id} ({n} items) is waiting for review. Label it\n{where}"
        f"  in a terminal:     {cmd} label{config}\n"
        f"  with files:        {cmd} export{config} batch.csv, edit, {cmd} import{config} batch.csv, "
        f"then {cmd} resume{config}"
    )


@flow(name="active-learning-cycle")
def active_learning_cycle(config_path: str = "alflow.toml", auto: bool = False,
                          ingest_sources: bool = True) -> dict:
    """Run one cycle; pauses for human review unless ``auto`` (simulated annotator).

    Returns a summary: cycle number, batch, labels, metrics and ``stop`` (why the loop
    should stop, or None).
    """
    logger = get_run_logger()
    settings = load_config(config_path)
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    store.migrate()
    run_id = flow_run.get_id()

    if ingest_sources and settings.sources:
        ingest(config_path)
    check_gold_labels(store, settings, auto)
    expire_stale_batches(store, run_id)

    # the newest promoted model that loads and fits labels + classifier; retrained if need be
    current = load_model_task(settings, run_id)
    model_version = current.version if current else None
    holdout = settings.holdout_fraction
    if current:
        prelabel_task(settings, current.model, model_version)
    else:
        logger.info("no model yet: cold start, the batch is chosen for coverage")

    counts = store.counts(holdout)
    budget_left = None
    if settings.stopping.budget is not None:
        budget_left = settings.stopping.budget - counts["labeled"] - counts["skipped"]
    batch_id = query_task(settings, model_version, run_id, budget_left)
    if batch_id is None:
        stop = "budget spent" if budget_left is not None and budget_left <= 0 else "pool exhausted"
        logger.info(f"nothing to ask: {stop}")
        return {"cycle": None, "batch_id": None, "stop": stop, "counts": counts}

    if auto:
        written = simulated_review(store, settings, batch_id, run_id)
    else:
        written = human_review(store, settings, batch_id, run_id, config_path)
    label_summary = written.summary()
    logger.info(f"batch {batch_id}: {label_summary}")

    train = retrain_task(settings, run_id)
    cycle = store.record_cycle(run_id, batch_id, train.model_version, _strategy(store, batch_id),
                               train.n_labels, train.metrics, train.promoted)
    counts = store.counts(holdout)
    metric = settings.evaluation.metric
    publish_cycle(cycle_markdown(counts, store.cycles(), asdict(train) if train.model_version else None,
                                 batch_id, label_summary, metric, store.prelabel_agreement(batch_id)))
    stop = _stop_reason(settings, counts, train.metrics)
    if stop:
        logger.info(f"stopping rule: {stop}")
    return {"cycle": cycle, "batch_id": batch_id, "model_version": train.model_version,
            "promoted": train.promoted, "n_labels": train.n_labels, "metrics": train.metrics,
            "labels_written": asdict(written), "stop": stop, "counts": counts}


def simulated_review(store: Store, settings, batch_id: str, run_id: str) -> LabelWrite:
    """The simulated annotator answers the batch from the gold labels (it is shown no
    pre-label, so ``prelabel_shown`` stays NULL)."""
    answers = simulated_answers(store, store.batch_items(batch_id), settings.labels)
    return store.record_labels(answers, annotator="simulated", origin="simulated", batch_id=batch_id,
                               flow_run_id=run_id, close_batch="labeled")


def human_review(store: Store, settings, batch_id: str, run_id: str, config_path: str) -> LabelWrite:
    """Pause for the Resume form (or `alflow label` / `import` + `resume`), then record it.

    An item answered while the run waited keeps that answer when its form value is still
    the field's default (untouched); a value the reviewer changed is recorded as the form
    annotator's answer (a correction if they had answered otherwise). Each row keeps the
    pre-label its field showed.
    """
    logger = get_run_logger()
    batch = store.batch_items(batch_id)
    url = publish_batch(batch_id, batch, run_id)
    logger.info(review_instructions(batch_id, len(batch), url, config_path))
    form = build_review_form(batch, settings.labels, settings.review.text_chars, settings.review.annotator)
    try:
        response = pause_flow_run(
            wait_for_input=form,
            timeout=int(settings.review.timeout_hours * 3600),
            poll_interval=settings.review.poll_interval_seconds,
        )
    except FlowPauseTimeout:
        store.close_batch(batch_id, "expired")
        logger.error(f"batch {batch_id} was not reviewed in time; answers already stored are kept")
        raise
    values = response.model_dump()
    written = store.record_labels(
        answers_from_form(values, batch), annotator=values["annotator"].strip(), origin="ui",
        batch_id=batch_id, flow_run_id=run_id, form_defaults=form_defaults(form, values, batch),
        close_batch="labeled",
    )
    if written.corrections or written.kept:
        logger.info(f"batch {batch_id}: the form changed {written.corrections} answers given while the run "
                    f"waited (corrections); {written.kept} stored answers kept over untouched form defaults")
    return written


def check_gold_labels(store: Store, settings, auto: bool) -> None:
    """Fail before anything is asked if the run needs gold labels the store does not have,
    or has stored gold labels that are not classes of ``labels`` (e.g. ``labels`` changed)."""
    from collections import Counter

    from alflow.tasks.ingest import unknown_gold_message

    if not (auto or settings.evaluation.method == "holdout"):
        return
    gold = store.query_df(
        "SELECT source, gold_label, count(*) AS n FROM items WHERE gold_label IS NOT NULL "
        "GROUP BY source, gold_label ORDER BY source"
    )
    bad = gold[~gold["gold_label"].isin(settings.labels)]
    if len(bad):
        unknown = Counter()
        for value, n in zip(bad["gold_label"], bad["n"]):
            unknown[value] += int(n)
        sources = ", ".join(dict.fromkeys(bad["source"]))
        raise ConfigError(unknown_gold_message(
            f"stored items of source {sources}", settings.labels, unknown,
            "were they ingested under other labels? restore those labels or start a new database",
        ))
    if len(gold):
        return
    if auto:
        raise ConfigError("--auto answers from gold labels, but no stored item has one (set label_column on a source)")
    raise ConfigError(
        "evaluation.method = \"holdout\" scores on gold labels, but no stored item has one; "
        "set label_column on a source or use evaluation.method = \"cv\""
    )


def _strategy(store: Store, batch_id: str) -> str:
    return store.batch(batch_id)["strategy"]


def _stop_reason(settings, counts: dict, metrics: dict | None) -> str | None:
    rules = settings.stopping
    if rules.budget is not None and counts["labeled"] + counts["skipped"] >= rules.budget:
        return f"budget of {rules.budget} labels spent"
    metric = settings.evaluation.metric
    if rules.target is not None and metrics and (metrics.get(metric) or 0) >= rules.target:
        return f"{metric} {metrics[metric]:.3f} reached the target {rules.target}"
    if counts["pool"] == 0:
        return "pool exhausted"
    return None
