"""The `alflow` command."""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

app = typer.Typer(
    name="alflow",
    help="Active learning on Prefect: ingest, pre-label, query, pause for review, retrain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
server_app = typer.Typer(help="The local Prefect server that paused runs are resumed from.", no_args_is_help=True)
app.add_typer(server_app, name="server")

# Where a user sets Prefect's flow run heartbeats (the second name is its older one).
HEARTBEAT_VARIABLES = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="Config file (default: $ALFLOW_CONFIG or ./alflow.toml)."),
]
BatchOption = Annotated[Optional[str], typer.Option("--batch", "-b", help="Batch id (default: the only open batch).")]
AnnotatorOption = Annotated[
    Optional[str], typer.Option("--annotator", "-a", help="Who is answering (default: review.annotator).")
]
LateOption = Annotated[bool, typer.Option(
    "--late", help="Record answers for a batch that is already labeled or expired (they take the items out of "
    "any open batch that still asks them).")]


def _user_errors() -> tuple[type[BaseException], ...]:
    """The known failures' classes, of the modules imported so far: a module never imported
    raised nothing, and importing alflow.tasks.modeling to find out would cost a second."""
    import sys

    where = {"alflow.config": "ConfigError", "alflow.connectors": "SourceError",
             "alflow.flows.prefect_server": "ServerError", "alflow.tasks.modeling": "ModelError",
             "alflow.tasks.review": "ReviewError", "alflow.tasks.store": "StoreError"}
    return tuple(getattr(sys.modules[module], name) for module, name in where.items()
                 if hasattr(sys.modules.get(module), name))


def friendly(command: Callable) -> Callable:
    """Known failures print one line on stderr and exit 1, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except _user_errors() as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None

    return wrapper


def _settings(config: Path | None, check_model: bool = True):
    from alflow.config import load_config

    return load_config(config, check_model=check_model)


def _store(settings):
    from alflow.tasks.store import Store

    store = Store(settings.database, settings.store.lock_timeout_seconds)
    store.migrate()
    return store


def _state_dir(settings=None) -> Path:
    return Path(settings.database).parent if settings is not None else Path(".alflow").resolve()


@contextmanager
def _imports_kept():
    """Import in the block without the garbage collector, then keep what was imported out of
    its later collections. Prefect's modules make some 200,000 objects, none of them garbage:
    collecting while they are made, and walking them again at every full collection after,
    costs about 0.3 s of a short command."""
    import gc

    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@contextmanager
def _prefect_api(settings, start: bool = True, heartbeats: bool = True):
    """Point Prefect at a live API for the duration (starting a local server if needed).

    ``heartbeats=False``: the flow runs send no heartbeat events unless
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set. For a run that ends in seconds, in front of
    its user: a run's end waits for its heartbeat thread's one-second sleep (0.5 s on
    average, a fifth of a small `alflow ingest`)."""
    import os

    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

    from alflow.flows.prefect_server import ensure_server

    info = ensure_server(_state_dir(settings), echo=lambda m: err_console.print(f"[dim]{escape(m)}[/]"))
    updates = {PREFECT_API_URL: info.api_url, PREFECT_UI_URL: info.ui_url}
    if not heartbeats and not any(name in os.environ for name in HEARTBEAT_VARIABLES):
        updates[PREFECT_FLOWS_HEARTBEAT_FREQUENCY] = None
    with temporary_settings(updates=updates):
        yield info


# -- run ------------------------------------------------------------------------------------
class _CycleFailed(Exception):
    """A cycle's flow run failed; Prefect has logged its traceback."""

    def __init__(self, number: int, error: Exception):
        super().__init__(number, error)
        self.number = number
        self.error = error


@app.command()
@friendly
def run(
    config: ConfigOption = None,
    auto: Annotated[bool, typer.Option("--auto", help="Answer from the corpus' gold labels (simulated annotator).")] = False,
    cycles: Annotated[int, typer.Option("--cycles", "-n", min=1, help="How many cycles to run.")] = 1,
    ingest: Annotated[bool, typer.Option("--ingest/--no-ingest", help="Fetch the sources first.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show a failure's traceback and Prefect's "
                                          "report of it on the terminal too.")] = False,
):
    """Run active-learning cycles; each pauses for review in the Prefect UI unless --auto.

    A failure is one line on stderr. The run's log, tracebacks included, goes to
    logs/run.log beside the database (.alflow/logs/run.log by default).
    """
    import logging

    settings = _settings(config)
    log_path = run_log_path(settings)
    with _run_logging(log_path, verbose):
        try:
            _run_cycles(settings, auto, cycles, ingest, progress)
            return
        except typer.Exit:  # said why already (another cycle kept the database busy)
            raise
        except _CycleFailed as failed:  # Prefect logged its traceback
            error = failed.error
            line = str(error) if isinstance(error, _user_errors()) else \
                f"cycle {failed.number} failed: {_first_line(error)} (details in {log_path})"
        except Exception as exc:  # noqa: BLE001 - every failure is one line; the traceback is logged
            logging.getLogger(_TRACE_LOGGER).error("alflow run failed", exc_info=True)
            line = str(exc) if isinstance(exc, _user_errors()) else f"{_first_line(exc)} (details in {log_path})"
    err_console.print(f"[bold red]error:[/] {escape(line)}")
    raise typer.Exit(1)


def _run_cycles(settings, auto: bool, cycles: int, ingest: bool, progress: bool) -> None:
    from alflow.tasks.progress import enable_bars

    _store(settings).claim_task(settings.task)  # a store of the other task: one line, before any flow run
    enable_bars(progress)
    from alflow.flows.cycle import active_learning_cycle

    with _prefect_api(settings) as info:
        console.print(f"Prefect UI: [link={info.ui_url}]{info.ui_url}[/link]")
        for number in range(1, cycles + 1):
            try:
                summary = active_learning_cycle(
                    config_path=str(settings.config_path), auto=auto, ingest_sources=ingest and number == 1
                )
            except Exception as exc:
                raise _CycleFailed(number, exc) from exc
            _print_cycle(summary, settings.evaluation.metric)
            if summary.get("message"):  # batches wait for review, or another cycle held the database
                (err_console if summary.get("busy") else console).print(
                    ("[bold red]error:[/] " if summary.get("busy") else "") + escape(summary["message"]))
                if summary.get("busy"):
                    raise typer.Exit(1)
                break
            if summary.get("stop"):
                console.print(f"Stopping: {summary['stop']}.")
                break


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_log_path(settings) -> Path:
    """Where `alflow run` writes its log: logs/run.log beside the database."""
    return _state_dir(settings) / "logs" / "run.log"


# `alflow run` logs a traceback of its own under this name (the terminal shows it with -v only).
_TRACE_LOGGER = "alflow.cli"
# Prefect's closing line for a run or task that did not complete.
_NOT_COMPLETED = re.compile(r"Finished in state (Failed|Crashed|Cancelled|TimedOut)\b")


@contextmanager
def _run_logging(path: Path, verbose: bool):
    """Every log record of the command to ``path`` (rotated at 5 MB), and Prefect's own
    report of a failure (its traceback, "Encountered exception", "Finished in state
    Failed") off the terminal unless ``verbose``: the command says what failed in one line.
    The run's progress lines (alflow's own log lines, Prefect's run links) stay on it."""
    import logging
    from logging.handlers import RotatingFileHandler

    import prefect
    from prefect.logging.configuration import PROCESS_LOGGING_CONFIG, setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    if not PROCESS_LOGGING_CONFIG:  # Prefect sets up its handlers on first use, and then none of
        setup_logging()             # its own on a root logger that already has one (ours)
    prefect_code = str(Path(prefect.__file__).parent)

    def not_failure_report(record: logging.LogRecord) -> bool:
        if record.name == _TRACE_LOGGER:
            return False
        if not record.pathname.startswith(prefect_code):
            return True
        return record.levelno < logging.ERROR and not _NOT_COMPLETED.match(record.getMessage())

    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = RotatingFileHandler(path, maxBytes=5_000_000, backupCount=2, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(to_file)
    consoles = [] if verbose else [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in consoles:
        handler.addFilter(not_failure_report)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(not_failure_report)
        root.removeHandler(to_file)
        to_file.close()


def _print_cycle(summary: dict, metric: str) -> None:
    if summary.get("cycle") is None:
        return
    metrics = summary.get("metrics") or {}
    # a multi-label cycle's metrics are micro_f1 ... (config.settings.METRICS); a single-label one has none of them
    names = ("accuracy", "macro_f1", "micro_f1", "hamming_loss", "subset_accuracy")
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in names if metrics.get(k) is not None)
    model = f"model v{summary['model_version']}" if summary.get("model_version") else "no model yet"
    promoted = " (promoted)" if summary.get("promoted") else (" (not promoted)" if summary.get("model_version") else "")
    from alflow.tasks.modeling import self_training_note

    note = self_training_note(metrics.get("self_training"))  # with "auto", which and why
    console.print(
        f"[bold]cycle {summary['cycle']}[/]: {summary['n_labels']} labels, {model}{promoted}"
        + (f", {shown}" if shown else "") + (f" ({escape(note)})" if note else "")
    )


@contextmanager
def _run_logs_off_console():
    """Keep a flow run's log lines (in the Prefect UI) off the terminal, where the command
    prints its own summary of them."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    def not_run_log(record: logging.LogRecord) -> bool:
        return not record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))

    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    handlers = {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}
    for handler in handlers:
        handler.addFilter(not_run_log)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(not_run_log)


@app.command()
@friendly
def ingest(
    config: ConfigOption = None,
    source: Annotated[Optional[str], typer.Option("--source", "-s", help="Only this source (by its name).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Ignore what the sources delivered before: fetch "
                                       "everything again (still deduplicated).")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
):
    """Fetch the configured sources into the store, one line per source (deduplicated; safe to repeat).

    Exits 1 if any source failed; the others' items are stored.
    """
    with _imports_kept():
        from alflow.flows.ingest import IngestFailed, source_names
        from alflow.flows.ingest import ingest as ingest_flow
        from alflow.tasks.progress import enable_bars

    settings = _settings(config, check_model=False)  # ingest builds no model
    source_names(settings, source)  # an unknown name fails here, before anything starts
    _store(settings)
    if not settings.sources:
        console.print(escape(f"No sources in {settings.config_path}: add a [[sources]] table."))
        return
    enable_bars(progress)
    with _prefect_api(settings, heartbeats=False), _run_logs_off_console():
        try:
            reports, failed = ingest_flow(str(settings.config_path), source=source, full=full), None
        except IngestFailed as exc:
            reports, failed = exc.reports, exc
    for report in reports:
        if report.empty:  # nothing to label from it: said apart, though nothing failed
            err_console.print(f"[yellow]warning:[/] {escape(report.line())}")
        elif report.error is None:
            console.print(escape(report.line()))
        else:
            err_console.print(f"[bold red]error:[/] {escape(report.line())}")
    if failed is not None:
        raise typer.Exit(1)


# -- status ---------------------------------------------------------------------------------
def tag_metric_columns(rows: list[dict], cycles) -> None:
    """Add to each cycle row of a multi-label project its micro_f1, hamming_loss and
    subset_accuracy (config.settings.METRICS), read from the ``cycles`` frame's metrics JSON."""
    import json

    from alflow.config.settings import METRICS

    stored = {int(c): json.loads(m) if isinstance(m, str) else (m or {})
              for c, m in zip(cycles["cycle"], cycles["metrics"])}
    for row in rows:
        metrics = stored.get(row["cycle"]) or {}
        row.update({name: metrics.get(name) for name in METRICS["multi_label"]})


def status_report(settings, store, api_url: str | None) -> dict:
    """Where the project stands, as one JSON-ready object: ``items``, ``pool``, ``labeled``
    (of which ``adjudicated``: decided by an adjudication or a recheck), ``tied`` (votes tie:
    awaiting adjudication), ``skipped`` (only skips), ``held_out``, ``models``, ``waiting``
    (batches waiting for review:
    ``{batch_id, flow_run_id, size, answered, url}``), ``cycles`` (the learning curve:
    ``{cycle, n_labels, accuracy, macro_f1, model_version, promoted, strategy}``) and, when
    a Prefect API answers at ``api_url`` and deployments run this config, ``schedules``
    (:func:`alflow.flows.serve.served_schedules`). URLs are None without a reachable UI.
    Also ``control`` (the unbiased accuracy of the random control slice, with its Wilson
    interval), ``label_flags`` and ``stopping`` (:func:`alflow.tasks.stopping.quality_status`);
    each cycle carries its ``control_accuracy`` [``control_low``, ``control_high``] and
    ``stop_kappa``. ``agreement``: inter-annotator agreement
    (:func:`alflow.tasks.agreement.agreement_report`: ``kappa``, ``alpha``, ``per_annotator``,
    ``prelabel``, ``batches``, ``adjudication_pending``). Each cycle's ``timings``: seconds
    in each step, ``overhead`` and ``wall`` (:mod:`alflow.tasks.timings`; None for a cycle
    recorded before they were). ``llm``, when ``[llm]`` is set or an LLM was asked before:
    ``usage`` (what every run asked it, summed: :meth:`Store.llm_usage`, None if nothing)
    and ``prelabels`` (answers against the pre-labels shown, apart by who suggested them:
    :meth:`Store.prelabel_kept`)."""
    import pandas as pd

    from alflow.flows.cycle import waiting_batches
    from alflow.tasks.stopping import quality_status

    counts = store.counts(settings.holdout_fraction)
    ui = None
    if api_url:
        from alflow.flows.prefect_server import ui_url_for

        ui = ui_url_for(api_url)
    report = {key: counts[name] for key, name in (("items", "items"), ("pool", "pool"), ("labeled", "labeled"),
                                                  ("adjudicated", "adjudicated"), ("tied", "tied"),
                                                  ("skipped", "skipped"), ("held_out", "holdout"),
                                                  ("models", "models"))}
    report["waiting"] = [w if ui else dict(w, url=None) for w in waiting_batches(store, None, ui_url=ui)]

    def number(value):
        return None if value is None or pd.isna(value) else value

    report["cycles"] = [
        {"cycle": int(row.cycle), "n_labels": int(row.n_labels), "accuracy": number(row.accuracy),
         "macro_f1": number(row.macro_f1),
         "model_version": None if number(row.model_version) is None else int(row.model_version),
         "promoted": bool(row.promoted), "strategy": row.strategy}
        for row in store.cycles().itertuples(index=False)
    ]
    if settings.task == "multi_label":  # the tag-set metrics, from each cycle's metrics JSON
        tag_metric_columns(report["cycles"], store.cycles())
    timings = store.cycle_timings()
    for row in report["cycles"]:
        row["timings"] = timings.get(row["cycle"])
    measured = store.cycle_quality().set_index("cycle")
    for row in report["cycles"]:
        for key in ("control_accuracy", "control_low", "control_high", "stop_kappa"):
            row[key] = number(measured[key].get(row["cycle"])) if key in measured else None
    report.update(quality_status(store, settings, counts))
    from alflow.tasks.agreement import agreement_options, agreement_report

    report["agreement"] = agreement_report(store, **agreement_options(settings))
    usage = store.llm_usage(any_run=True)
    if settings.llm.base_url or usage is not None:
        report["llm"] = {"usage": usage, "prelabels": store.prelabel_kept()}
    if api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        from alflow.flows.serve import served_schedules

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            schedules = served_schedules(settings, ui)
        if schedules:
            report["schedules"] = schedules
    return report


@app.command()
@friendly
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object (for scripts and monitoring).")] = False,
):
    """Pool, labels, batches waiting for review (with their run URLs), cycles, schedules.

    The schedules are those of the deployments (`alflow serve`, prefect.yaml) that run
    this config, when the Prefect API answers.
    """
    import json

    settings = _settings(config)
    store = _store(settings)
    report = status_report(settings, store, _api_url())
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    console.print(
        f"items: {report['items']}  pool: {report['pool']}  labeled: {report['labeled']} "
        f"({report['adjudicated']} adjudicated or rechecked)  tied (awaiting adjudication): {report['tied']}  "
        f"skipped: {report['skipped']}  held out: {report['held_out']}  models: {report['models']}"
    )
    if not report["waiting"]:
        console.print("batches waiting for review: none")
    else:
        console.print("batches waiting for review:")
        for batch in report["waiting"]:
            console.print(f"  {batch['batch_id']}  {batch['answered']}/{batch['size']} answered")
            if batch["flow_run_id"]:
                console.print(f"    {batch['url'] or 'flow run ' + batch['flow_run_id']}")
    for schedule in report.get("schedules", []):
        when = (f"{schedule['schedule']} ({schedule['timezone'] or 'UTC'}), "
                + (f"next run {schedule['next_run'][:16]}" if schedule["active"] else "paused")
                if schedule["schedule"] else "no schedule")
        console.print(f"deployment {schedule['deployment']}: {when}")
    _print_quality(report)
    from alflow.tasks.agreement import agreement_line

    console.print(escape(agreement_line(report["agreement"])))
    for name, figures in report["agreement"]["per_annotator"].items():
        if figures["compared"]:
            console.print(escape(f"  {name}: agrees with the consensus on {figures['agreement']:.0%} of "
                                 f"{figures['compared']} shared items"))
    if "llm" in report:
        _print_llm(report["llm"])
    if not report["cycles"]:
        console.print("cycles: none yet")
        return
    shown = ("micro_f1", "macro_f1") if "micro_f1" in report["cycles"][0] else ("accuracy", "macro_f1")
    table = Table("cycle", "labels", *(name.replace("_f1", " F1") for name in shown), "model", "promoted",
                  title="latest cycles")
    table.add_column("strategy", overflow="fold")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for row in report["cycles"][-5:]:
        table.add_row(str(row["cycle"]), str(row["n_labels"]), *(fmt(row[name]) for name in shown),
                      f"v{row['model_version']}" if row["model_version"] is not None else "–",
                      "yes" if row["promoted"] else "no", row["strategy"])
    console.print(table)
    timed = [row for row in report["cycles"] if row.get("timings")]
    if timed:
        from alflow.tasks.timings import timings_line

        console.print(f"time in cycle {timed[-1]['cycle']}: {timings_line(timed[-1]['timings'])}")


def _print_llm(llm: dict) -> None:
    """The pre-labels kept, the LLM's apart from the model's, and what the LLM was asked
    (nothing when no LLM pre-label was ever shown and nothing was asked)."""
    from alflow.tasks.report import kept_text, llm_usage_text

    kept = llm["prelabels"]
    if kept["llm"]["shown"]:
        console.print(escape(f"pre-labels kept: LLM {kept_text(kept['llm'])}; model {kept_text(kept['model'])}"))
    if llm["usage"]:
        console.print(escape(f"LLM asked so far: {llm_usage_text(llm['usage'])}"))


def _print_quality(report: dict) -> None:
    """The control-slice estimate, the open label flags and the stopping rules."""
    from alflow.tasks.control import estimate_line

    console.print(f"honest estimate (blind random control slice): {estimate_line(report['control'])}")
    flags = report["label_flags"]
    if flags["model_version"] is None:
        console.print("label check: not run yet")
    else:
        console.print(f"label check: {flags['count']} likely label errors flagged after model v{flags['model_version']}"
                      f", {len(flags['open'])} waiting for re-review" + (":" if flags["open"] else ""))
        for flag in flags["open"]:
            console.print(escape(f"  {flag['item_id']}  labeled {flag['given_label']}, model suggests "
                                 f"{flag['suggested_label']} (self-confidence {flag['score']:.3f})"))
    fired = report["stopping"]["fired"]
    if fired:
        served = " (served schedules keep running and open none)" if report.get("schedules") else ""
        console.print(escape(f"stopped: {fired}; no new batch is opened{served}"))
    else:
        console.print("stopping: no rule fired")
    for rule in report["stopping"]["rules"]:
        state = "fired" if rule["fired"] else ("on" if rule["configured"] else "reported only")
        console.print(escape(f"  {rule['rule']} ({state}): {rule['detail']}"))


def _api_url() -> str | None:
    """The configured Prefect API (or the local default) if it answers, else None."""
    from alflow.flows.prefect_server import configured_api_url, healthy

    api = configured_api_url() or "http://127.0.0.1:4200/api"
    return api if healthy(api, timeout=1.0) else None


# -- show -----------------------------------------------------------------------------------
def _json_value(value):
    """A DuckDB/pandas cell as JSON: None for NULL/NaN, ISO text for a timestamp."""
    import pandas as pd

    if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value.item() if hasattr(value, "item") else value


def batch_report(settings, store, batch: dict) -> dict:
    """Everything stored for one batch, as one JSON-ready object: the batch row
    (``batch_id``, ``status``, ``strategy``, ``model_version``, ``flow_run_id``,
    ``created_at``, ``closed_at``), ``size`` (its count as words, e.g. '20 items + 1
    adjudication'), ``answered`` (its answers in one line, as the cycle's summary says them:
    :func:`alflow.tasks.report.review_outcome`) and ``arrived`` (how they arrived, '' for
    none: :func:`alflow.tasks.report.arrival_text`), ``prelabel`` (:meth:`Store.prelabel_agreement`)
    and ``items`` in rank order: ``rank``, ``item_id``, ``source``, ``title``, ``text``,
    ``url``, ``picked_by``, ``prelabel``, ``confidence``, ``prelabel_by`` (``model`` or
    ``llm``: who suggested it), ``score``, ``overlap``, ``state``
    (:meth:`Store.item_states`), ``effective_label`` (from the store's ``effective_labels``
    view; None while it has none) and ``answers``: every answer given to it in this batch,
    oldest first, each ``annotator``, ``label``, ``origin``, ``created_at`` (UTC),
    ``prelabel_shown``, ``seconds``, ``form_seconds``, ``decisive`` and ``current`` (False:
    replaced by a later answer of the same annotator)."""
    from alflow.tasks.report import review_outcome
    from alflow.tasks.review import batch_count_text

    batch_id = batch["batch_id"]
    items = store.batch_items(batch_id)
    history = store.batch_answer_history(batch_id)
    states = store.item_states(settings.review.adjudication_threshold, settings.holdout_fraction,
                               settings.review.adjudication_distance if settings.task == "multi_label" else None)
    state = dict(zip(states["item_id"], states["state"]))
    outcome, arrived = review_outcome(store, batch_id)
    report = {key: _json_value(batch.get(key)) for key in ("batch_id", "status", "strategy", "model_version",
                                                           "flow_run_id", "created_at", "closed_at")}
    if report["model_version"] is not None:
        report["model_version"] = int(report["model_version"])
    report.update(size=batch_count_text(items), answered=outcome, arrived=arrived,
                  prelabel=store.prelabel_agreement(batch_id), items=[])
    answer_keys = ("annotator", "label", "origin", "created_at", "prelabel_shown", "seconds", "form_seconds",
                   "decisive", "current")
    by_item = {item_id: rows for item_id, rows in history.groupby("item_id", sort=False)}
    for row in items.itertuples(index=False):
        rows = by_item[row.item_id]
        report["items"].append({
            **{key: _json_value(getattr(row, key)) for key in ("rank", "item_id", "source", "title", "text", "url",
                                                              "picked_by", "prelabel", "confidence", "prelabel_by",
                                                              "score", "overlap")},
            "state": state.get(row.item_id),
            "effective_label": _json_value(rows["effective"].iloc[0]),
            "answers": [{key: _json_value(answer[key]) for key in answer_keys}
                        for answer in rows[rows["label_id"].notna()].to_dict("records")],
        })
    return report


# How `alflow show` says an item's state when it has no effective label.
_NO_LABEL = {"awaiting_adjudication": "none: the answers tie or disagree, awaiting adjudication",
             "skipped": "none: only skipped", "open_batch": "none yet: in a batch waiting for review",
             "pool": "none", "held_out": "none (held out)"}


@app.command()
@friendly
def show(
    batch: Annotated[str, typer.Argument(help="A batch id, a prefix of exactly one, or 'latest' (the newest batch).")],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object: the batch, and every item with its "
                                          "whole text and answers (for scripts).")] = False,
):
    """What is stored for a batch: every item, each answer with its annotator, origin and
    time, and the item's effective label (what training uses)."""
    import json

    from alflow.tasks.report import ORIGIN_WORDS
    from alflow.tasks.review import find_batch, trim
    from alflow.tasks.review.items import confidence_text, tags_text
    from alflow.tasks.store import document

    settings = _settings(config)
    store = _store(settings)
    report = batch_report(settings, store, find_batch(store, batch))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    when = lambda value: f"{value[:19].replace('T', ' ')} UTC" if value else "–"  # noqa: E731
    model = f"model v{report['model_version']}" if report["model_version"] is not None else "no model (cold start)"
    console.print(escape(f"Batch {report['batch_id']}: {report['status']}, {report['size']}; {report['strategy']}, "
                         f"{model}; created {when(report['created_at'])}"
                         + (f", closed {when(report['closed_at'])}" if report["closed_at"] else "")
                         + (f"; flow run {report['flow_run_id']}" if report["flow_run_id"] else "")))
    console.print(escape(report["answered"]))
    width = max(40, console.size.width - 4)
    # a multi-label answer is a tag set's text form ("" is an answer: none apply): said in words
    words = tags_text if settings.task == "multi_label" else (lambda label: label)
    for item in report["items"]:
        effective = (words(item["effective_label"]) if item["effective_label"] is not None else
                     _NO_LABEL.get(item["state"], "none"))
        prelabel = ""
        if item["prelabel"] is not None:
            who = "LLM's" if item["prelabel_by"] == "llm" else "model's"
            prelabel = f" · {who} pre-label {words(item['prelabel'])} ({confidence_text(item['confidence'])})"
        console.print(f"[bold]#{item['rank']}[/] · {escape(item['source'])} · picked by {escape(item['picked_by'])}"
                      f"{escape(prelabel)} · effective label: [bold]{escape(effective)}[/]")
        console.print(f"  {escape(trim(document(item['title'], item['text'], sep=' — '), width))}")
        if not item["answers"]:
            console.print("  [dim]no answer in this batch[/]")
        for answer in item["answers"]:
            seen = answer["prelabel_shown"]
            shown = (f"shown the pre-label {words(seen)}" if seen or (seen == "" and settings.task == "multi_label")
                     else "no pre-label shown")
            console.print(escape(f"  {answer['annotator']}: {words(answer['label'])}, "
                                 f"{ORIGIN_WORDS.get(answer['origin'], 'as an ' + answer['origin'])}, "
                                 f"{when(answer['created_at'])}, {shown}"
                                 + ("" if answer["current"] else " (replaced by a later answer)")))


# -- serve ----------------------------------------------------------------------------------
@app.command()
@friendly
def serve(config: ConfigOption = None):
    """Serve the cycle and ingest flows as deployments on the config's schedules.

    Runs until Ctrl-C or SIGTERM; the schedules are paused then. A cycle waiting for review
    holds no process: resuming it reschedules it here.
    """
    from alflow.flows.serve import build_deployments, register, serve_deployments

    settings = _settings(config)
    _store(settings)
    with _prefect_api(settings) as info:
        deployments = build_deployments(settings)
        served = register(deployments, settings, info.ui_url)
        console.print(f"Serving {len(served)} deployments of {settings.config_path}:")
        for one in served:
            console.print(f"  {escape(one.line())}")
        console.print(f"Prefect UI: [link={info.ui_url}]{info.ui_url}[/link]  (Ctrl-C stops; the schedules are "
                      "paused until the next `alflow serve`)")
        serve_deployments(deployments)
    console.print("Stopped serving; the schedules are paused.")


# -- review: terminal, files, resume ---------------------------------------------------------
def item_panel(row, position: int, total: int, note: str | None, given: str | None,
               tags: list[str] | None = None) -> Panel:
    """One item as `alflow label` shows it: its heading (rank, source, pre-label; see
    :func:`~alflow.tasks.review.item_heading`) as the title, then the answer already given
    in this session (``given``), what an item asked again is told (``note``), the item's
    title when it adds something, its whole text and its URL; wrapped to the terminal.
    ``tags``: a multi-label project's tags; the model's probability of each is shown where
    its pre-label is offered (the row's ``tag_proba``)."""
    from alflow.tasks.review import item_heading, shown_prelabel
    from alflow.tasks.review.items import probabilities_text, tags_text
    from alflow.tasks.store import title_adds

    body = []
    if given is not None and tags is not None:
        body.append(f"[bold]Your answer: {escape(tags_text(given))}[/] (Enter keeps it; a number toggles a tag; "
                    "s skips)")
    elif given is not None:
        body.append(f"[bold]Your answer: {escape(given)}[/] (Enter keeps it; a class key or s changes it)")
    proba = getattr(row, "tag_proba", None)
    if tags is not None and shown_prelabel(row) is not None and isinstance(proba, (list, tuple)):
        body.append(f"[dim]Model: {escape(probabilities_text(tags, proba))}[/]")
    if note is not None:
        head, _, rest = note.partition(". ")
        body.append(f"[bold]{escape(head)}.[/] {escape(rest)}")
    if title_adds(row.title, row.text):
        body.append(f"[bold]{escape(row.title)}[/]")
    body.append(escape(row.text))
    if isinstance(row.url, str) and row.url:
        body.append(f"[dim]{escape(row.url)}[/]")
    heading = item_heading(row, multi_label=tags is not None)
    return Panel("\n".join(body), title=f"{position + 1}/{total}  {escape(heading)}", title_align="left")


class _Pager:
    """Prints a renderable a screenful at a time: the first page at once, the next on
    :meth:`more` (so a text longer than the terminal scrolls by, as with `more`)."""

    def __init__(self, out: Console, renderable):
        from rich.segment import Segment

        self.out = out
        self.lines = [[*line, Segment.line()] for line in out.render_lines(renderable, out.options, pad=False)]
        self.page = max(3, out.size.height - 4)  # room for the hint and the key's answer
        self.shown = 0
        self.more()

    @property
    def finished(self) -> bool:
        return self.shown >= len(self.lines)

    def more(self) -> None:
        from rich.segment import Segments

        if self.finished:
            return
        end = min(len(self.lines), self.shown + self.page)
        self.out.print(Segments([seg for line in self.lines[self.shown:end] for seg in line]), end="")
        self.shown = end
        if not self.finished:
            self.out.print(f"[dim]-- Space: more (lines 1-{self.shown} of {len(self.lines)}) --[/]")


def label_session(store, settings, batch_id: str, annotator: str, getchar: Callable[[], str], out: Console,
                  late: bool = False) -> tuple[int, bool]:
    """Ask ``annotator`` about each item of a batch they have not answered and that still
    needs an answer (with review.overlap, items others answered too), one key per answer
    (as `alflow label --help` lists them); each answer is saved at once with the seconds it took. Enter
    accepts the offered pre-label only; a control item (blind) and an item asked again (an
    adjudication, a recheck: every answer given and who gave it are shown, and for a
    recheck the model's suggestion) need a class key. Going back (b) shows the answer
    given, which Enter keeps (nothing is saved again). Each item shows in full, wrapped to
    the terminal; a longer one a screenful at a time (Space: more). ``late``: the batch may
    be closed. With task = "multi_label" a number toggles a tag and Enter records the
    selected set (see :func:`label`). Returns (answers saved: label rows written,
    corrections included; True if the batch is complete)."""
    import time

    from alflow.config import SKIP
    from alflow.tasks.review import (
        ADJUDICATION,
        batch_count_text,
        plural,
        prelabel_seen,
        reasked_note,
        record_answer,
        shown_prelabel,
    )
    from alflow.tasks.store import RECHECK

    from alflow.tasks.multilabel.tags import format_tags, parse_tags
    from alflow.tasks.review.items import tag_probabilities, tags_text

    classes = settings.labels
    multi = settings.task == "multi_label"  # an answer is a set of tags: number keys toggle, Enter accepts
    keys = "  ".join(f"[bold]{i}[/] {c}" for i, c in enumerate(classes, start=1))
    items = store.batch_items(batch_id)
    if multi:
        proba = tag_probabilities(store, batch_id, items["item_id"].tolist())
        items["tag_proba"] = [proba.get(i) for i in items["item_id"]]
    asked = set(store.batch_needs(batch_id, annotator)["item_id"])
    queue = [r for r in items.itertuples(index=False) if r.item_id in asked]
    given = store.answers_given([r.item_id for r in queue if r.picked_by in (ADJUDICATION, RECHECK)])
    accept_key = ("[bold]Enter[/] accept the selected tags (none selected: none of these tags apply)  "
                  f"toggle a tag: {keys}" if multi else f"[bold]Enter[/] accept pre-label  {keys}")
    out.print(f"Batch {batch_id} ({batch_count_text(items)}): {len(queue)} of {len(items)} items to answer.  "
              f"Keys: {accept_key}  [bold]s[/] skip  [bold]b[/] back  "
              "[bold]Space[/] more  [bold]q[/] quit (answers are saved as you go)")

    def selection_line(selection: set[str]) -> str:
        numbered = "  ".join(f"[{'x' if c in selection else ' '}] {i} {c}" for i, c in enumerate(classes, start=1))
        then = tags_text(format_tags(selection))
        return f"  {escape(numbered)}   Enter records: [bold]{escape(then)}[/]"
    pending: list[str] = []

    def next_key() -> str:
        # Keys typed faster than they are read arrive together: answer them one by one.
        while not pending:
            try:
                chunk = getchar()
            except (KeyboardInterrupt, EOFError):  # Ctrl-C / Ctrl-D: same as q
                return "q"
            if chunk.startswith("\x1b"):
                pending.append(chunk)  # an arrow or function key: one unknown key
            else:
                pending.extend(chunk.replace("\r\n", "\r"))
        return pending.pop(0)

    def chosen(key: str, offered: str | None) -> str | None:
        if key in ("\r", "\n", "y", "Y"):
            return offered
        if key in ("s", "S"):
            return SKIP
        if key.isdigit() and 1 <= int(key) <= len(classes):
            return classes[int(key) - 1]
        return None

    mine: dict[str, str] = {}  # item_id -> the answer given in this session
    saved, position = 0, 0
    while position < len(queue):
        row = queue[position]
        answer = mine.get(row.item_id)
        pager = _Pager(out, item_panel(row, position, len(queue), reasked_note(row, given.get(row.item_id, [])),
                                       answer, tags=classes if multi else None))
        offered = answer if answer is not None else shown_prelabel(row)
        # multi-label: the tags Enter records, starting from the answer given or the offered pre-label
        selection = set(parse_tags(offered)) if multi and offered not in (None, SKIP) else set()
        touched = False
        if multi:
            out.print(selection_line(selection))
        shown_at = time.monotonic()
        while True:
            key = next_key()
            if key == " ":
                pager.more()
                continue
            if multi and key.isdigit() and 1 <= int(key) <= len(classes):
                selection ^= {classes[int(key) - 1]}
                touched = True
                out.print(selection_line(selection))
                continue
            if key in ("q", "Q", "\x03", "\x04"):
                out.print(f"Stopped; {plural(saved, 'answer')} saved.")
                return saved, False
            if key in ("b", "B"):
                position = max(0, position - 1)
                break
            if multi and key in ("\r", "\n", "y", "Y"):  # a skip given before stays unless tags were toggled
                label = SKIP if answer == SKIP and not touched else format_tags(selection)
            elif multi:
                label = SKIP if key in ("s", "S") else None
            else:
                label = chosen(key, offered)
            if label is None and multi:
                more = "" if pager.finished else "Space shows more; "
                out.print(f"[yellow]A number toggles a tag; Enter records the selected tags (none selected: none of "
                          f"these tags apply); s skips; b goes back; {more}q quits.[/]")
                continue
            if label is None:
                accept = ("Enter keeps your answer; " if answer is not None else
                          "Enter accepts the pre-label; " if offered is not None else "this item has no pre-label: ")
                more = "" if pager.finished else "Space shows more; "
                out.print(f"[yellow]{accept}a number picks a class; s skips; b goes back; {more}q quits.[/]")
                continue
            written = record_answer(store, settings, batch_id, row.item_id, label, annotator,
                                    origin=ADJUDICATION if row.picked_by == ADJUDICATION else "cli",
                                    prelabel_shown=prelabel_seen(row), seconds=round(time.monotonic() - shown_at, 3),
                                    late=late)
            rows = written.new + written.adjudicated + written.corrections
            out.print(f"  -> {escape(tags_text(label) if multi else label)}" + ("" if rows else " (unchanged)"))
            saved += rows
            mine[row.item_id] = label
            position += 1
            break
    return saved, store.batch_needs(batch_id).empty


@app.command()
@friendly
def label(
    config: ConfigOption = None,
    batch: BatchOption = None,
    annotator: AnnotatorOption = None,
    resume_run: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume the paused run when all are answered.")] = True,
    late: LateOption = False,
):
    """Label a waiting batch in the terminal, one item at a time, then resume its run.

    Each item shows whole (its heading with source and pre-label, its title, text and URL),
    wrapped to the terminal. Keys: Enter accepts the pre-label (or, after b, keeps your
    answer); 1-9 picks a class; s skips; b goes back to the previous item and shows the
    answer you gave; Space shows the next screenful of a text longer than the terminal;
    q quits. Each answer is saved as you give it. A multi-label project (task =
    "multi_label") shows the tags numbered with the current selection (the pre-label where
    one is offered): 1-9 toggles a tag, Enter records the selection (none selected: none of
    these tags apply).
    """
    from alflow.tasks.review import closed_batch_check, pick_batch

    settings = _settings(config)
    store = _store(settings)
    chosen = pick_batch(store, batch)
    closed_batch_check(chosen, late)
    who = annotator or settings.review.annotator
    given, complete = label_session(store, settings, chosen["batch_id"], who, typer.getchar, console, late=late)
    if complete and resume_run and chosen["status"] == "open":
        _resume(settings, store, chosen["batch_id"], who, skip_rest=False)
    elif complete:
        console.print("All items answered. Run `alflow resume` to continue the paused run.")
    elif not store.batch_needs(chosen["batch_id"], who).shape[0] and store.batch_needs(chosen["batch_id"]).shape[0]:
        short = store.batch_needs(chosen["batch_id"])
        console.print(f"You ({who}) have answered every item you can; {len(short)} items still need an "
                      f"independent answer from another annotator (review.overlap = {int(short['overlap'].max())}): "
                      "`alflow label --annotator NAME`.")


@app.command("export")
@friendly
def export_(
    path: Annotated[Path, typer.Argument(help="Where to write: a .csv, .jsonl or .json (Label Studio tasks) file.")],
    config: ConfigOption = None,
    batch: BatchOption = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="csv, jsonl or label-studio (default: from the name).")] = None,
    blank: Annotated[bool, typer.Option("--blank", help="Leave the label column empty instead of the pre-label.")] = False,
):
    """Write a waiting batch to CSV/JSONL for labeling in a spreadsheet or another tool."""
    from alflow.tasks.review import export_batch, file_format, label_studio_config, pick_batch

    settings = _settings(config)
    store = _store(settings)
    chosen = pick_batch(store, batch)
    multi = settings.task == "multi_label"
    n = export_batch(store, chosen["batch_id"], path, fmt, prefill=not blank,
                     tags=list(settings.labels) if multi else None)
    if file_format(path, fmt) == "label-studio":
        console.print(f"Wrote {n} Label Studio tasks of batch {chosen['batch_id']} to {path} (with the pre-labels as "
                      f"predictions and the answers so far as annotations). Labeling config:\n"
                      f"{escape(label_studio_config(settings.labels, multiple=multi))}\nThen export the project as "
                      f"JSON, `alflow import FILE.json` and `alflow resume`.")
        return
    if multi:
        from alflow.tasks.review.files import NO_TAGS

        spelled = (f"tags separated by ';', {NO_TAGS} for \"none of these tags apply\", skip, or empty to leave "
                   "it for later" if file_format(path, fmt) == "csv" else
                   "a list of tags, [] for \"none of these tags apply\", \"skip\", or null to leave it for later")
        console.print(f"Wrote {n} items of batch {chosen['batch_id']} to {path}. Edit the labels column "
                      f"({escape(spelled)}; tags: {', '.join(settings.labels)}), then `alflow import {path}` and "
                      "`alflow resume`.")
        return
    console.print(f"Wrote {n} items of batch {chosen['batch_id']} to {path}. Edit the label column "
                  f"({', '.join(settings.labels)} or skip), then `alflow import {path}` and `alflow resume`.")


@app.command("import")
@friendly
def import_(
    path: Annotated[Path, typer.Argument(help="A .csv or .jsonl file with item_id and label columns (and optionally annotator, seconds), or Label Studio JSON tasks (.json).")],
    config: ConfigOption = None,
    batch: BatchOption = None,
    annotator: AnnotatorOption = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="csv, jsonl or label-studio (default: from the name).")] = None,
    late: LateOption = False,
):
    """Store answers from a CSV/JSONL file or Label Studio JSON (all rows checked first; nothing half-written)."""
    from alflow.tasks.review import import_answers

    settings = _settings(config)
    store = _store(settings)
    written, unanswered, batch_id = import_answers(
        store, settings, path, annotator=annotator or settings.review.annotator, batch_id=batch, fmt=fmt, late=late
    )
    left = f"; {unanswered} rows had no label and wait" if unanswered else ""
    console.print(f"Batch {batch_id}: {written.summary()}{left}.")


def _resume(settings, store, batch_id: str | None, annotator: str, skip_rest: bool) -> None:
    from alflow.tasks.review import resume_batch

    with _prefect_api(settings):
        chosen = resume_batch(store, batch_id, annotator=annotator, skip_rest=skip_rest)
    if chosen.get("deployment_id"):  # suspended: rescheduled, the deployment's process goes on with it
        console.print(f"Resumed run {chosen['flow_run_id']} of batch {chosen['batch_id']}; `alflow serve` or the "
                      "work pool's worker picks it up, records the answers and retrains.")
    else:
        console.print(f"Resumed run {chosen['flow_run_id']} of batch {chosen['batch_id']}; it records the "
                      "answers and retrains.")


@app.command()
@friendly
def resume(
    config: ConfigOption = None,
    batch: BatchOption = None,
    annotator: AnnotatorOption = None,
    skip_rest: Annotated[bool, typer.Option("--skip-rest", help="Answer 'skip' for items still unanswered.")] = False,
):
    """Resume a paused run with the answers already stored for its batch."""
    settings = _settings(config)
    store = _store(settings)
    _resume(settings, store, batch, annotator or settings.review.annotator, skip_rest)


# -- simulate -------------------------------------------------------------------------------
@app.command()
@friendly
def simulate(
    data: Annotated[Path, typer.Option("--data", help="A labeled CSV file.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for curves.csv, summary.csv and curves.png.")],
    text_col: Annotated[str, typer.Option("--text-col", help="The text column.")] = "text",
    label_col: Annotated[str, typer.Option("--label-col", help="The gold label column.")] = "label",
    split_col: Annotated[Optional[str], typer.Option("--split-col", help="Rows whose value is 'test' form the test set.")] = None,
    test_split: Annotated[Optional[float], typer.Option("--test-split", help="Share held out as the test set (default 0.25; not with --split-col).")] = None,
    strategies_: Annotated[str, typer.Option("--strategies", help="Comma-separated; 'default' is alflow.toml's query.strategy.")] = "random,margin,default",
    batch: Annotated[int, typer.Option("--batch", help="Items per simulated batch.")] = 20,
    cycles: Annotated[int, typer.Option("--cycles", help="Batches per run.")] = 25,
    init: Annotated[int, typer.Option("--init", help="Cold-start labels.")] = 20,
    seeds: Annotated[int, typer.Option("--seeds", help="Runs per strategy (seeds 0..n-1).")] = 5,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Take \\[model] and \\[query] from this file (default: the shipped alflow.toml); with \\[llm] base_url, the LLM's zero-shot accuracy on the test set is a baseline, and features with embeddings embed the data through it.")] = None,
    noise: Annotated[float, typer.Option("--noise", help="Flip this share of the simulated answers and report "
                                         "how well the label check finds them (vs random re-review).")] = 0.0,
    automation_bias: Annotated[Optional[float], typer.Option("--automation-bias", help="The annotator accepts the "
                               "pre-label of an active pick with this probability (control items are blind); "
                               "report the control-slice estimate vs the truth.")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", "-j", help="Worker processes running the (strategy, "
                    "seed) runs side by side (default: every core this process may use; 1: one after another "
                    "in this process). The results are the same.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress: bars in a terminal; "
                        "else a line per finished (strategy, seed) run, and every half minute for one still "
                        "going.")] = True,
    task: Annotated[str, typer.Option("--task", help="single_label, or multi_label: --label-col holds each "
                    "row's tags joined by ';' (empty: no tag applies), the strategies are the multi-label ones "
                    "and labels_to_95 reads evaluation.metric (micro_f1 by default).")] = "single_label",
    labels: Annotated[Optional[str], typer.Option("--labels", help="--task multi_label: the tags, comma-"
                      "separated (default: every tag --label-col names, sorted).")] = None,
):
    """Replay the loop on a labeled CSV with a simulated annotator: learning curves per strategy."""
    import math
    import sys

    from alflow.flows.simulate import SimulationError, TARGET_SHARE, summary_metric
    from alflow.flows.simulate import simulate as run_simulation
    from alflow.tasks.progress import enable_bars

    # Bars only where both streams are a terminal (they draw on stdout); lines anywhere else,
    # so that `alflow simulate ... > log` shows where it is.
    bars = progress and sys.stdout.isatty() and sys.stderr.isatty()
    enable_bars(bars)
    log = (lambda line: console.print(line, markup=False, highlight=False)) if progress and not bars else None
    try:
        result = run_simulation(data, out, text_col=text_col, label_col=label_col, split_col=split_col,
                                test_split=test_split, strategies=strategies_.split(","), batch=batch,
                                cycles=cycles, init=init, seeds=seeds, config=config, noise=noise,
                                automation_bias=automation_bias, jobs=jobs, log=log, task=task,
                                labels=[t.strip() for t in labels.split(",")] if labels else None)
    except SimulationError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    # a multi-label summary names its metric; its final figure is final_score
    metric = summary_metric(result.summary)
    final = "final_score" if "final_score" in result.summary else "final_accuracy"
    table = Table("strategy", "aulc_mean", "aulc_std", final, "labels_to_95", "÷ random",
                  "÷ best random",
                  title=f"full-pool {metric} {result.full_accuracy:.3f} "
                        f"(labels_to_95: labels until {TARGET_SHARE:.0%} of it, median over seeds; "
                        "÷ best random: over the fewer of random's with the same model and with the plain one)")
    for row in result.summary.itertuples(index=False):
        to95 = "inf" if math.isinf(row.labels_to_95) else f"{row.labels_to_95:g}"
        ratios = ["n/a" if math.isnan(v) else f"{v:.2f}" for v in (row.labels_vs_random, row.labels_vs_best_random)]
        table.add_row(row.strategy, f"{row.aulc_mean:.3f}", f"{row.aulc_std:.3f}", f"{getattr(row, final):.3f}", to95,
                      *ratios)
    console.print(table)
    if result.llm is not None:
        from alflow.flows.simulate import llm_caption

        console.print(llm_caption(result.llm), soft_wrap=True, markup=False, highlight=False)
        passes = Table("strategy", "labels to pass the LLM")
        for row in result.summary.itertuples(index=False):
            passes.add_row(row.strategy, "never" if math.isnan(row.labels_to_llm) else f"{row.labels_to_llm:g}")
        console.print(passes)
    if "flag_precision" in result.summary:
        from alflow.flows.simulate import label_check_caption

        checks = Table("strategy", "flipped", "flags", "precision", "recall", "random precision", "random recall",
                       title=label_check_caption(result.summary))
        for row in result.summary.itertuples(index=False):
            checks.add_row(row.strategy, f"{row.flipped:.1f}", f"{row.flags:.1f}", f"{row.flag_precision:.3f}",
                           f"{row.flag_recall:.3f}", f"{row.random_precision:.3f}", f"{row.random_recall:.3f}")
        console.print(checks)
    if "control_estimate" in result.summary:
        from alflow.flows.simulate import ESTIMATE_HEADERS, estimate_caption, estimate_rows

        estimates = Table(*ESTIMATE_HEADERS, title=estimate_caption(result.summary))
        for cells in estimate_rows(result.summary):
            estimates.add_row(*cells)
        console.print(estimates)
    console.print(f"Wrote {out / 'curves.csv'}, {out / 'summary.csv'} and {out / 'curves.png'}"
                  + (f" (and {out / 'estimates.csv'})." if automation_bias is not None else "."))


# -- setup ----------------------------------------------------------------------------------
@app.command()
@friendly
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write alflow.toml.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing alflow.toml.")] = False,
):
    """Write the annotated example alflow.toml (pointing at the bundled SMS corpus)."""
    from alflow.config import CONFIG_FILENAME, ConfigError

    repo = Path(__file__).resolve().parents[1]
    example = repo / CONFIG_FILENAME
    if not example.is_file():
        raise ConfigError(f"the example config {example} is not installed; use a checkout of alflow (pip install -e .)")
    target = directory / CONFIG_FILENAME
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    text = example.read_text(encoding="utf-8")
    text = text.replace('path = "data/sms_spam.csv"', f'path = "{(repo / "data" / "sms_spam.csv").as_posix()}"')
    target.write_text(text, encoding="utf-8")
    console.print(f"Wrote {target}. Next: `alflow run` (or `alflow run --auto --cycles 5` for a demo).")


@server_app.command("start")
@friendly
def server_start(config: ConfigOption = None):
    """Start (or find) the local Prefect server and print its UI address."""
    from alflow.flows.prefect_server import ensure_server

    info = ensure_server(_state_dir(_settings_or_none(config)), echo=lambda m: err_console.print(escape(m)))
    console.print(f"Prefect UI: {info.ui_url}" + (" (already running)" if not info.started else ""))


@server_app.command("stop")
@friendly
def server_stop(config: ConfigOption = None):
    """Stop the Prefect server that alflow started."""
    from alflow.flows.prefect_server import stop_server

    pid = stop_server(_state_dir(_settings_or_none(config)))
    console.print(f"Stopped the Prefect server (pid {pid})." if pid else "No Prefect server started by alflow is running.")


def _settings_or_none(config: Path | None):
    from alflow.config import ConfigError

    try:
        return _settings(config)
    except ConfigError:
        if config is not None:
            raise
        return None


def main() -> None:
    import atexit
    import gc
    import os

    from alflow.flows.prefect_server import without_telemetry

    # Registered first, so it runs last: the collections Python runs at its exit would walk
    # every object left (~0.1 s) to free memory the process gives back whole anyway.
    atexit.register(gc.freeze)
    os.environ.update(without_telemetry(dict(os.environ)))  # before anything imports Prefect
    app()


if __name__ == "__main__":
    main()
