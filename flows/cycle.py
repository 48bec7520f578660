"""One active-learning cycle, as a Prefect flow.

    ingest -> load model -> pre-label pool -> [ask the LLM] -> query batch -> review (suspend
           or pause) -> record labels -> retrain + evaluate -> record cycle + artifacts

With ``[llm]`` set, the LLM is asked about the query's candidates (alflow.tasks.llm): on a
cold start its answers pre-label the first batch, later they are a second opinion the
query ranks disagreements by. An LLM that cannot be used is logged and the cycle goes on.

Every step can be re-run: ingest and pre-label skip what is stored, the query returns the
run's existing batch, retraining on unchanged labels returns the model already trained.
A resumed suspended run replays from the top and goes straight to its batch's review.
A run stopped anywhere is finished by the next one: the steps of a cycle's end it had not
done, or the review of a batch it queried but never showed (alflow.tasks.finish).

One cycle at a time per database: a cycle holds the store's ``cycle`` lock from ingest to
query and from retrain to the report, never while it waits for review. A cycle that finds
``review.max_open_batches`` batches waiting asks nothing new.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from itertools import count
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run, suspend_flow_run
from prefect.runtime import deployment, flow_run
from prefect.states import Completed, State

from alflow.config import CONFIG_FILENAME, ConfigError, load_config
from alflow.flows.ingest import ingest_for_cycle
from alflow.tasks.faults import fault_point
from alflow.tasks.finish import adopt_abandoned_batch, finish_cycle, finish_interrupted
from alflow.tasks.llm import llm_opinions_task, llm_wanted
from alflow.tasks.prelabel import prelabel_task
from alflow.tasks.query import batch_k, query_task
from alflow.tasks.report import finish_batch_artifacts, publish_batch, review_outcome
from alflow.tasks.review import (
    STORED_ANSWERS,
    batch_count_text,
    build_review_form,
    expire_stale_batches,
    form_description,
    form_seconds_per_item,
    plural,
    record_review_form,
    review_key,
    review_round_items,
    review_wait_seconds,
    shown_form_defaults,
    simulated_answers,
)
from alflow.tasks.stopping import any_configured, current_rules, fired_rule
from alflow.tasks.store import LabelWrite, LockHeldError, Store, describe_holder
from alflow.tasks.store.batches import REASKED_PICKS
from alflow.tasks.timings import CycleClock
from alflow.tasks.train import load_model_task


def alflow_command() -> str:
    """How to call `alflow` from the user's shell: bare if on PATH, else by its path (quoted
    for the shell, so a line printed with it can be pasted as it is)."""
    installed = Path(sys.executable).with_name("alflow")
    on_path = shutil.which("alflow")
    if not installed.exists() or (on_path and Path(on_path).resolve() == installed.resolve()):
        return "alflow"
    try:
        return shlex.quote(str(installed.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(installed))


# The store lock a cycle holds while it works on the database (not while it waits for review).
CYCLE_LOCK = "cycle"


def take_cycle_lock(store: Store, settings, run_id: str | None) -> None:
    """Hold the cycle lock for this run (released by ``store.release_lock(CYCLE_LOCK, run_id)``),
    waiting up to ``store.cycle_lock_timeout_seconds`` for another cycle; a holder whose
    lease ran out (``store.lease_seconds``), whose process is gone or whose flow run has
    ended is taken over, and the log says whose. Raises LockHeldError."""
    logger = get_run_logger()
    wait = settings.store.cycle_lock_timeout_seconds
    store.acquire_lock(
        CYCLE_LOCK, run_id, wait, is_stale=_holder_run_ended, lease_seconds=settings.store.lease_seconds,
        on_wait=lambda holder: logger.info(f"another cycle is working on this database "
                                           f"({describe_holder(holder)}); waiting up to {wait:g} s"),
        on_takeover=lambda holder, why: logger.warning(f"took over the cycle lock from {describe_holder(holder)}: "
                                                       f"{why}"),
    )


def _holder_run_ended(holder: dict) -> bool:
    """True if the lock holder's flow run has ended (crashed, failed, ...) on this Prefect API."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if not holder.get("flow_run_id"):
        return False
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(holder["flow_run_id"])).state
    except (ObjectNotFound, ValueError):
        return False
    return state is not None and state.is_final()


def waiting_batches(store: Store, run_id: str | None, ui_url: str | None = None) -> list[dict]:
    """The open batches of runs other than ``run_id``, oldest first:
    ``{batch_id, flow_run_id, size, answered, url}`` (the run's page in the UI at ``ui_url``,
    default the configured one)."""
    from alflow.tasks.report import run_url

    waiting = []
    for batch in store.batches("open").to_dict("records"):
        if run_id is not None and batch["flow_run_id"] == run_id:
            continue
        items = store.batch_items(batch["batch_id"])
        flow_run_id = batch["flow_run_id"] if isinstance(batch["flow_run_id"], str) else None
        waiting.append({"batch_id": batch["batch_id"], "flow_run_id": flow_run_id, "size": len(items),
                        # answered as needed: with review.overlap, by enough annotators
                        "answered": int(len(items) - len(store.batch_needs(batch["batch_id"]))),
                        "url": run_url(flow_run_id, ui_url) if flow_run_id else None})
    return waiting


def waiting_message(waiting: list[dict], limit: int) -> str:
    """'batch 3f2a… (4/20 answered) at <its run's URL> is still waiting for review, so ...'."""
    listed = "; ".join(f"batch {w['batch_id']} ({w['answered']}/{w['size']} answered) at "
                       f"{w['url'] or 'flow run ' + str(w['flow_run_id'])}" for w in waiting)
    verb = "is" if len(waiting) == 1 else "are"
    return (f"{listed} {verb} still waiting for review, so this cycle asks nothing new "
            f"(review.max_open_batches = {limit}); the pool is ingested and pre-labeled")


def review_instructions(batch_id: str, size: str, url: str | None, config_path: str) -> str:
    """Where and how to label the batch; ``size``: its count ('20 items + 1 adjudication')."""
    default = Path(CONFIG_FILENAME).resolve()
    cmd = alflow_command()
    config = "" if Path(config_path).resolve() == default else f" --config {shlex.quote(str(config_path))}"
    where = f"  in the Prefect UI: {url} -> Resume\n" if url else ""
    return (
        f"Batch {batch_id} ({size}) is waiting for review. Label it\n{where}"
        f"  in a terminal:     {cmd} label{config}\n"
        f"  with files:        {cmd} export{config} batch.csv, edit, {cmd} import{config} batch.csv, "
        f"then {cmd} resume{config}"
    )


@flow(name="active-learning-cycle")
def active_learning_cycle(config_path: str | None = None, auto: bool = False,
                          ingest_sources: bool = True) -> dict:
    """Run one cycle; stops for human review unless ``auto`` (simulated annotator).

    ``config_path``: the config file (default: $ALFLOW_CONFIG, else ./alflow.toml).
    Returns a summary: cycle number, batch, labels, metrics and ``stop`` (why the loop
    should stop, or None). A cycle that asks nothing because a batch still waits for
    review, or because another cycle kept the database busy, ends Completed with a
    ``message`` saying so (in the summary and the run's state).
    """
    clock = CycleClock()
    settings = load_config(config_path)
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    store.migrate()
    store.claim_task(settings.task)  # a store is one task: refused in one line if it holds the other
    run_id = flow_run.get_id()
    config_path = str(settings.config_path)
    try:
        # A suspended run, once resumed, replays from the top: its batch is recorded, so
        # ingest, pre-label and query are not done again.
        batch = store.batch_for_run(run_id) if run_id else None
        if batch is None:
            resumed = resume_interrupted(store, settings, run_id, config_path, auto, clock)
            if resumed is not None:
                return resumed  # an earlier run's cycle, finished: this run's cycle
            selected = select_batch(store, settings, run_id, config_path, auto, ingest_sources, clock)
            if not isinstance(selected, str):
                return selected  # nothing asked: a summary, or a Completed state with its message
            batch_id = selected
        else:
            batch_id = batch["batch_id"]
            get_run_logger().info(f"resumed: batch {batch_id} was queried before the review; recording it")
            before = store.batch_timings(batch_id)  # the steps the first process took
            if before is not None:
                clock = CycleClock(before)
                clock.resumed_review()
        return review_and_retrain(store, settings, run_id, config_path, auto, batch_id, replay=batch is not None,
                                  clock=clock)
    finally:
        store.release_lock(CYCLE_LOCK, run_id)


def lock_or_busy(store: Store, settings, run_id: str | None) -> State | None:
    """Take the cycle lock (None), or the Completed state of a run that found the database
    busy for ``store.cycle_lock_timeout_seconds`` and did nothing."""
    try:
        take_cycle_lock(store, settings, run_id)
    except LockHeldError as exc:
        message = (f"another cycle kept this database busy for {settings.store.cycle_lock_timeout_seconds:g} s "
                   f"({exc}); this run asked nothing, the next one tries again")
        get_run_logger().warning(message)
        return Completed(message=message,
                         data={"cycle": None, "batch_id": None, "stop": None, "busy": True, "message": message})
    return None


def resume_interrupted(store: Store, settings, run_id: str | None, config_path: str, auto: bool,
                       clock: CycleClock) -> dict | State | None:
    """Holding the cycle lock, finish what earlier runs left: cycles whose end they did not
    finish (their missing steps only), else an open batch one of them queried and never
    showed, reviewed here as this run's own. That is this run's cycle: its summary (or the
    busy state, see :func:`lock_or_busy`); None when nothing was left, the lock held."""
    busy = lock_or_busy(store, settings, run_id)
    if busy is not None:
        return busy
    finished = finish_interrupted(store, settings, run_id)
    if finished is not None:
        return finished
    adopted = adopt_abandoned_batch(store, run_id)
    if adopted is None:
        return None
    return review_and_retrain(store, settings, run_id, config_path, auto, adopted, clock=clock)


def select_batch(store: Store, settings, run_id: str | None, config_path: str, auto: bool,
                 ingest_sources: bool, clock: CycleClock | None = None) -> str | dict | State:
    """Ingest, pre-label and query, holding the cycle lock: the new batch's id; or the
    summary when there is nothing to ask; or a Completed state with a message when batches
    still wait for review (``review.max_open_batches``) or another cycle kept the lock.
    ``clock`` times the steps."""
    logger = get_run_logger()
    clock = clock or CycleClock()
    busy = lock_or_busy(store, settings, run_id)
    if busy is not None:
        return busy

    if ingest_sources and settings.sources:
        with clock.step("ingest"):
            ingest_for_cycle(config_path)  # some sources failing: logged, the cycle goes on
    check_gold_labels(store, settings, auto)
    expire_stale_batches(store, run_id)

    # the newest promoted model that loads and fits labels + classifier; retrained if need be
    with clock.step("prelabel"):
        current = load_model_task(settings, run_id)
        model_version = current.version if current else None
        if current:
            prelabel_task(settings, current.model, model_version)
    holdout = settings.holdout_fraction

    counts = store.counts(holdout)
    waiting = [] if auto else waiting_batches(store, run_id)
    if len(waiting) >= settings.review.max_open_batches:
        message = waiting_message(waiting, settings.review.max_open_batches)
        logger.info(message)
        return Completed(message=message,
                         data={"cycle": None, "batch_id": None, "stop": None, "counts": counts,
                               "waiting": [w["batch_id"] for w in waiting], "message": message})
    if not current:
        logger.info(f"no model yet: cold start, the batch is chosen by {settings.query.cold_start}")
    stop = fired_rule(current_rules(store, settings, counts)) if any_configured(settings) else None
    if stop:  # a served schedule keeps running cycles: each says why it opens no batch
        message = f"stopping rule fired: {stop}; no batch is opened (change [stopping] to go on)"
        logger.info(message)
        return Completed(message=message, data={"cycle": None, "batch_id": None, "stop": stop, "counts": counts,
                                                "message": message})
    budget_left = None
    if settings.stopping.budget is not None:
        budget_left = settings.stopping.budget - counts["answered"]
    with clock.step("query"):
        # the LLM's answers about the candidates, or None (no [llm], or it could not be used)
        opinions = (llm_opinions_task(settings, model_version, run_id, batch_k(settings, budget_left))
                    if llm_wanted(settings, model_version) else None)
        batch_id = query_task(settings, model_version, run_id, budget_left, opinions)
    clock.asked()
    if batch_id is None:
        stop = "budget spent" if budget_left is not None and budget_left <= 0 else "pool exhausted"
        logger.info(f"nothing to ask: {stop}")
        return {"cycle": None, "batch_id": None, "stop": stop, "counts": counts}
    return batch_id


def review_and_retrain(store: Store, settings, run_id: str | None, config_path: str, auto: bool,
                       batch_id: str, replay: bool = False, clock: CycleClock | None = None) -> dict:
    """Review the batch (simulated, or stopping for a human without the cycle lock), record
    the answers, then retrain, evaluate and report holding the lock again. ``clock`` times
    the steps; the breakdown is stored with the cycle (``cycle_timings``)."""
    logger = get_run_logger()
    clock = clock or CycleClock()
    if auto:
        with clock.step("review_wait"):
            written = simulated_review(store, settings, batch_id, run_id)
    else:
        store.release_lock(CYCLE_LOCK, run_id)  # the review may take days: other cycles may run
        if not replay:  # a suspended run goes on in another process: it reads these back
            store.record_timings(batch_id, run_id, clock.timings)
        with clock.step("review_wait"):
            written = human_review(store, settings, batch_id, run_id, config_path, replay=replay)
    # what the batch holds, however its answers arrived: '20 answers, 13 kept the pre-label,
    # 6 changed it, 1 skipped (from the terminal)'
    outcome, label_summary = review_outcome(store, batch_id)
    logger.info(f"batch {batch_id}: {outcome}")

    try:
        take_cycle_lock(store, settings, run_id)
    except LockHeldError as exc:
        raise LockHeldError(f"cannot retrain: {exc} for more than {settings.store.cycle_lock_timeout_seconds:g} s; "
                            f"the answers to batch {batch_id} are recorded and the next run finishes its cycle",
                            exc.holder) from None
    # retrain, the cycle row, its assessment, its artifacts: each step once (alflow.tasks.finish)
    summary = dict(finish_cycle(store, settings, run_id, batch_id, clock, label_summary),
                   labels_written=asdict(written))
    if summary["stop"]:
        logger.info(f"stopping rule: {summary['stop']}")
    return summary


def simulated_review(store: Store, settings, batch_id: str, run_id: str) -> LabelWrite:
    """The simulated annotator answers the batch from the gold labels (it is shown no
    pre-label, so ``prelabel_shown`` stays NULL). A replay of the run (Prefect retrying it)
    finds them recorded and records nothing."""
    if store.batch(batch_id)["status"] != "open":
        return LabelWrite(replayed=True)
    batch = store.batch_items(batch_id)
    answers = (simulated_tag_answers(store, batch, settings) if settings.task == "multi_label"
               else simulated_answers(store, batch, settings.labels))
    written = store.record_labels(answers, annotator="simulated", origin="simulated", batch_id=batch_id,
                                  flow_run_id=run_id, close_batch="labeled")
    fault_point("review-between-rounds")  # its one round recorded, the retrain not begun
    return written


def simulated_tag_answers(store: Store, batch: pd.DataFrame, settings) -> list:
    """The simulated annotator of a multi-label project: each item's gold tag set as its
    text form ("" where no tag applies: an answer), ``skip`` where it has no gold; its
    answers to adjudication items are adjudications (as :func:`simulated_answers`)."""
    from alflow.config import SKIP
    from alflow.tasks.review.record import ADJUDICATION
    from alflow.tasks.store import Answer

    gold = store.gold_labels(batch["item_id"].tolist())
    return [Answer(i, gold[i] if isinstance(gold.get(i), str) and is_answer(gold[i], settings) else SKIP,
                   origin=ADJUDICATION if p == ADJUDICATION else None)
            for i, p in zip(batch["item_id"], batch["picked_by"])]


def human_review(store: Store, settings, batch_id: str, run_id: str, config_path: str,
                 replay: bool = False) -> LabelWrite:
    """Stop for the Resume form (or `alflow label` / `import` + `resume`), then record it.

    A deployed run *suspends*: its process exits, and resuming reschedules the run, which
    replays (``replay``) up to here and gets the submitted input at once. A run without a
    deployment (`alflow run`) cannot be rescheduled, so it *pauses*: its process waits.

    An item answered while the run waited keeps that answer when its form value is still
    the field's default (untouched); a value the reviewer changed is recorded as the form
    annotator's answer (a correction if they had answered otherwise). Each row keeps the
    pre-label its field showed. A replay judges against the form the run showed (saved
    with the suspension), not against answers stored since.

    With review.overlap, the review goes in rounds: while items lack their independent
    answers the run stops again (pause key review-2, review-3, ...) with a form of those
    items for an annotator who has not answered them. Each answer's ``form_seconds`` is the
    round's wait divided over its items, capped (review.max_form_seconds_per_item): a
    form's wait is not labeling time.

    Each round is recorded exactly once (``review_rounds``): a replay skips the rounds
    already recorded, so answers given another way since are never overwritten.
    """
    logger = get_run_logger()
    suspend = deployment.get_id() is not None
    if not replay:
        store.mark_offered(batch_id)  # from here on, a run dying with it open expires it (not adopted)
        batch = store.batch_items(batch_id)
        url = publish_batch(batch_id, batch, run_id)
        logger.info(review_instructions(batch_id, batch_count_text(batch), url, config_path))
    timeout = int(settings.review.timeout_hours * 3600)
    cold_start = pd.isna(store.batch(batch_id)["model_version"])
    written = LabelWrite()
    stored_answers = False  # the last round came from `alflow resume` (the terminal, files), not the form
    for round_ in count(1):
        key = review_key(round_)
        if store.round_recorded(batch_id, round_):  # a replay: this round's answers are in, never again
            logger.info(f"batch {batch_id}: review round {round_} was recorded before; not recording it again")
            written.replayed = True
            if store.batch(batch_id)["status"] != "open":
                break
            continue
        shown = shown_form_defaults(run_id, suspended=suspend, key=key) if replay else None
        batch = review_round_items(store, batch_id, round_, shown)
        given = store.answers_given(batch.loc[batch["picked_by"].isin(REASKED_PICKS), "item_id"].tolist())
        form = build_review_form(batch, settings.labels, settings.review.text_chars,
                                 settings.review.annotator if round_ == 1 else None, shown=shown, given=given,
                                 independent=round_ > 1, task=settings.task,
                                 description=form_description(batch_id, batch, cold_start, independent=round_ > 1,
                                                              task=settings.task))
        try:
            if suspend:
                response = suspend_flow_run(wait_for_input=form, timeout=timeout, key=key)
            else:
                response = pause_flow_run(wait_for_input=form, timeout=timeout, key=key,
                                          poll_interval=settings.review.poll_interval_seconds)
        except FlowPauseTimeout:
            store.close_batch(batch_id, "expired")
            logger.error(f"batch {batch_id} was not reviewed in time; answers already stored are kept")
            finish_review_artifacts(store, batch_id, run_id, "expired")
            raise
        share = form_seconds_per_item(review_wait_seconds(run_id, key), len(batch),
                                      settings.review.max_form_seconds_per_item)
        values = response.model_dump()
        stored_answers = bool(values.get(STORED_ANSWERS))
        written = written.add(record_review_form(store, form, values, batch, batch_id, run_id, round_, share))
        fault_point("review-between-rounds")  # this round recorded, the next (or the retrain) not begun
        if store.batch(batch_id)["status"] != "open":
            break
        short = store.batch_needs(batch_id)
        logger.info(f"batch {batch_id}: {len(short)} items still need an independent answer from another "
                    f"annotator (review.overlap = {settings.review.overlap}); waiting for review again")
    if stored_answers:  # `alflow resume`: nothing came from the form itself
        logger.info(f"batch {batch_id}: resumed with the answers already stored "
                    f"({review_outcome(store, batch_id)[1]}); none recorded again")
    elif written.corrections or written.kept:
        logger.info(f"batch {batch_id}: " + form_over_stored_text(written.corrections, written.kept))
    finish_review_artifacts(store, batch_id, run_id, store.batch(batch_id)["status"])
    return written


def form_over_stored_text(corrections: int, kept: int) -> str:
    """What the form did to answers given while the run waited (`alflow label`, files):
    'the form changed 1 answer given while the run waited; 2 kept, their fields left at the
    default'."""
    parts = []
    if corrections:
        parts.append(f"the form changed {plural(corrections, 'answer')} given while the run waited")
    if kept:
        parts.append(f"{plural(kept, 'answer')} given while the run waited kept, "
                     f"{'its field' if kept == 1 else 'their fields'} left at the default")
    return "; ".join(parts)


def finish_review_artifacts(store: Store, batch_id: str, run_id: str | None, status: str) -> None:
    """Tell the run's review artifacts that the batch is ``status`` (labeled, expired) and
    what it holds. Best effort: the answers are recorded, and a failure here is logged,
    never the end of the cycle."""
    if status == "open":
        return
    try:
        outcome = review_outcome(store, batch_id)[0]
        finish_batch_artifacts(batch_id, store.batch_items(batch_id), run_id, status, outcome)
    except Exception as exc:  # noqa: BLE001 - the artifacts describe the review; they never undo it
        get_run_logger().warning(f"batch {batch_id}: could not mark its review artifacts {status}: {exc}")


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
    bad = gold[~gold["gold_label"].map(lambda value: is_answer(value, settings))]
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
    if not store.scalar("SELECT count(*) FROM items"):
        raise ConfigError(nothing_stored_message(store))
    if auto:
        raise ConfigError("--auto answers from gold labels, but no stored item has one (set label_column on a source)")
    raise ConfigError(
        "evaluation.method = \"holdout\" scores on gold labels, but no stored item has one; "
        "set label_column on a source or use evaluation.method = \"cv\""
    )


def is_answer(value: str, settings) -> bool:
    """True if ``value`` is an answer of this project: a class of ``labels``, or with
    task = "multi_label" the text form of a set of its tags ("" included)."""
    if settings.task != "multi_label":
        return value in settings.labels
    from alflow.tasks.multilabel.tags import parse_tags

    return parse_tags(value) <= set(settings.labels)


def nothing_stored_message(store: Store) -> str:
    """Why there is nothing to label: no source ingested yet, or what each one's last
    ingest gave (an empty file gives 0 records)."""
    last = store.query_df("SELECT source, arg_max(n_read, finished_at) AS n_read, arg_max(n_bad, finished_at) AS n_bad "
                          "FROM ingests GROUP BY source ORDER BY source")
    if last.empty:
        return "no item is stored: no source has been ingested yet (run `alflow ingest`, or `alflow run` without --no-ingest)"
    given = ", ".join(f"source {row.source} gave {row.n_read} records" + (f" ({row.n_bad} failed)" if row.n_bad else "")
                      for row in last.itertuples(index=False))
    return f"no item is stored, so nothing can be labeled: {given} at the last ingest"

