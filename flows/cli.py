"""The `alflow` command."""

from __future__ import annotations

import functools
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


def _user_errors() -> tuple[type[BaseException], ...]:
    from alflow.config import ConfigError
    from alflow.connectors import SourceError
    from alflow.flows.prefect_server import ServerError
    from alflow.tasks.modeling import ModelError
    from alflow.tasks.review import ReviewError
    from alflow.tasks.store import StoreError

    return (ConfigError, SourceError, ServerError, ModelError, ReviewError, StoreError)


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


def _settings(config: Path | None):
    from alflow.config import load_config

    return load_config(config)


def _store(settings):
    from alflow.tasks.store import Store

    store = Store(settings.database, settings.store.lock_timeout_seconds)
    store.migrate()
    return store


def _state_dir(settings=None) -> Path:
    return Path(settings.database).parent if settings is not None else Path(".alflow").resolve()


@contextmanager
def _prefect_api(settings, start: bool = True):
    """Point Prefect at a live API for the duration (starting a local server if needed)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from alflow.flows.prefect_server import ensure_server

    info = ensure_server(_state_dir(settings), echo=lambda m: err_console.print(f"[dim]{escape(m)}[/]"))
    with temporary_settings(updates={PREFECT_API_URL: info.api_url, PREFECT_UI_URL: info.ui_url}):
        yield info


# -- run ------------------------------------------------------------------------------------
@app.command()
@friendly
def run(
    config: ConfigOption = None,
    auto: Annotated[bool, typer.Option("--auto", help="Answer from the corpus' gold labels (simulated annotator).")] = False,
    cycles: Annotated[int, typer.Option("--cycles", "-n", min=1, help="How many cycles to run.")] = 1,
    ingest: Annotated[bool, typer.Option("--ingest/--no-ingest", help="Fetch the sources first.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
):
    """Run active-learning cycles; each pauses for review in the Prefect UI unless --auto."""
    from alflow.tasks.progress import enable_bars

    settings = _settings(config)
    _store(settings)
    enable_bars(progress)
    from alflow.flows.cycle import active_learning_cycle

    with _prefect_api(settings) as info:
        console.print(f"Prefect UI: [link={info.ui_url}]{info.ui_url}[/link]")
        for number in range(1, cycles + 1):
            try:
                summary = active_learning_cycle(
                    config_path=str(settings.config_path), auto=auto, ingest_sources=ingest and number == 1
                )
            except _user_errors():
                raise
            except Exception as exc:  # the flow run failed; Prefect logged the traceback
                err_console.print(f"[bold red]error:[/] cycle {number} failed: {escape(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}")
                raise typer.Exit(1) from None
            _print_cycle(summary, settings.evaluation.metric)
            if summary.get("stop"):
                console.print(f"Stopping: {summary['stop']}.")
                break


def _print_cycle(summary: dict, metric: str) -> None:
    if summary.get("cycle") is None:
        return
    metrics = summary.get("metrics") or {}
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("accuracy", "macro_f1") if metrics.get(k) is not None)
    model = f"model v{summary['model_version']}" if summary.get("model_version") else "no model yet"
    promoted = " (promoted)" if summary.get("promoted") else (" (not promoted)" if summary.get("model_version") else "")
    console.print(
        f"[bold]cycle {summary['cycle']}[/]: {summary['n_labels']} labels, {model}{promoted}"
        + (f", {shown}" if shown else "")
    )


@app.command()
@friendly
def ingest(config: ConfigOption = None):
    """Fetch every configured source into the store (deduplicated; safe to repeat)."""
    from alflow.tasks.ingest import ingest_source
    from alflow.tasks.progress import enable_bars

    settings = _settings(config)
    _store(settings)
    enable_bars(True)
    import uuid

    ingest_id = f"cli-{uuid.uuid4().hex[:8]}"
    for source in settings.sources:
        console.print(ingest_source(settings, source.name, ingest_id).line())


# -- status ---------------------------------------------------------------------------------
@app.command()
@friendly
def status(config: ConfigOption = None):
    """Pool size, labels, batches waiting for review (with their run URLs), latest metrics."""
    settings = _settings(config)
    store = _store(settings)
    holdout = settings.holdout_fraction
    counts = store.counts(holdout)
    console.print(
        f"items: {counts['items']}  pool: {counts['pool']}  labeled: {counts['labeled']}  "
        f"skipped: {counts['skipped']}  held out: {counts['holdout']}  models: {counts['models']}"
    )
    from alflow.tasks.report import run_url

    waiting = store.batches("open")
    if waiting.empty:
        console.print("batches waiting for review: none")
    else:
        console.print("batches waiting for review:")
        ui = _ui_url()
        for row in waiting.itertuples(index=False):
            items = store.batch_items(row.batch_id)
            answered = int(items["answer"].notna().sum())
            console.print(f"  {row.batch_id}  {answered}/{len(items)} answered  {row.strategy}  "
                          f"created {str(row.created_at)[:19]} UTC")
            if isinstance(row.flow_run_id, str):
                console.print(f"    {run_url(row.flow_run_id, ui) if ui else 'flow run ' + row.flow_run_id}")
    cycles = store.cycles()
    if cycles.empty:
        console.print("cycles: none yet")
        return
    table = Table("cycle", "labels", "accuracy", "macro F1", "model", "promoted", title="latest cycles")
    table.add_column("strategy", overflow="fold")
    for row in cycles.tail(5).itertuples(index=False):
        fmt = lambda v: "–" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        table.add_row(str(row.cycle), str(row.n_labels), fmt(row.accuracy), fmt(row.macro_f1),
                      f"v{int(row.model_version)}" if row.model_version == row.model_version and row.model_version is not None else "–",
                      "yes" if row.promoted else "no", row.strategy)
    console.print(table)


def _ui_url() -> str | None:
    from alflow.flows.prefect_server import configured_api_url, healthy, ui_url_for

    api = configured_api_url() or "http://127.0.0.1:4200/api"
    return ui_url_for(api) if healthy(api, timeout=1.0) else None


# -- review: terminal, files, resume ---------------------------------------------------------
def label_session(store, settings, batch_id: str, annotator: str, getchar: Callable[[], str], out: Console) -> tuple[int, bool]:
    """Ask about each unanswered item of a batch, one key per answer; each answer is saved
    at once. Returns (answers given, True if every item is now answered)."""
    from alflow.config import SKIP
    from alflow.tasks.review import item_heading, record_answer
    from alflow.tasks.store import title_adds

    classes = settings.labels
    keys = "  ".join(f"[bold]{i}[/] {c}" for i, c in enumerate(classes, start=1))
    items = store.batch_items(batch_id)
    queue = [r for r in items.itertuples(index=False) if not isinstance(r.answer, str)]
    out.print(f"Batch {batch_id}: {len(queue)} of {len(items)} items to answer.  Keys: [bold]Enter[/] accept pre-label  "
              f"{keys}  [bold]s[/] skip  [bold]b[/] back  [bold]q[/] quit (answers are saved as you go)")
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

    given, position = 0, 0
    while position < len(queue):
        row = queue[position]
        title = item_heading(row)
        body = escape(row.text)
        if title_adds(row.title, row.text):
            body = f"[bold]{escape(row.title)}[/]\n{body}"
        out.print(Panel(body, title=f"{position + 1}/{len(queue)}  {escape(title)}", title_align="left"))
        key = next_key()
        if key in ("q", "Q", "\x03", "\x04"):
            out.print(f"Stopped; {given} answers saved.")
            return given, False
        if key in ("b", "B"):
            position = max(0, position - 1)
            continue
        if key in ("\r", "\n", "y", "Y") and isinstance(row.prelabel, str):
            label = row.prelabel
        elif key in ("s", "S"):
            label = SKIP
        elif key.isdigit() and 1 <= int(key) <= len(classes):
            label = classes[int(key) - 1]
        else:
            out.print("[yellow]Enter accepts the pre-label; a number picks a class; s skips; b goes back; q quits.[/]")
            continue
        record_answer(store, settings, batch_id, row.item_id, label, annotator, origin="cli",
                      prelabel_shown=row.prelabel if isinstance(row.prelabel, str) else None)
        out.print(f"  -> {label}")
        given += 1
        position += 1
    remaining = store.batch_items(batch_id)["answer"].isna().sum()
    return given, remaining == 0


@app.command()
@friendly
def label(
    config: ConfigOption = None,
    batch: BatchOption = None,
    annotator: AnnotatorOption = None,
    resume_run: Annotated[bool, typer.Option("--resume/--no-resume", help="Resume the paused run when all are answered.")] = True,
):
    """Label a waiting batch in the terminal, one item at a time, then resume its run."""
    from alflow.tasks.review import pick_batch

    settings = _settings(config)
    store = _store(settings)
    chosen = pick_batch(store, batch)
    who = annotator or settings.review.annotator
    given, complete = label_session(store, settings, chosen["batch_id"], who, typer.getchar, console)
    if complete and resume_run and chosen["status"] == "open":
        _resume(settings, store, chosen["batch_id"], who, skip_rest=False)
    elif complete:
        console.print("All items answered. Run `alflow resume` to continue the paused run.")


@app.command("export")
@friendly
def export_(
    path: Annotated[Path, typer.Argument(help="Where to write: a .csv or .jsonl file.")],
    config: ConfigOption = None,
    batch: BatchOption = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="csv or jsonl (default: from the name).")] = None,
    blank: Annotated[bool, typer.Option("--blank", help="Leave the label column empty instead of the pre-label.")] = False,
):
    """Write a waiting batch to CSV/JSONL for labeling in a spreadsheet or another tool."""
    from alflow.tasks.review import export_batch, pick_batch

    settings = _settings(config)
    store = _store(settings)
    chosen = pick_batch(store, batch)
    n = export_batch(store, chosen["batch_id"], path, fmt, prefill=not blank)
    console.print(f"Wrote {n} items of batch {chosen['batch_id']} to {path}. Edit the label column "
                  f"({', '.join(settings.labels)} or skip), then `alflow import {path}` and `alflow resume`.")


@app.command("import")
@friendly
def import_(
    path: Annotated[Path, typer.Argument(help="A .csv or .jsonl file with item_id and label columns.")],
    config: ConfigOption = None,
    batch: BatchOption = None,
    annotator: AnnotatorOption = None,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="csv or jsonl (default: from the name).")] = None,
):
    """Store answers from a CSV/JSONL file (all rows checked first; nothing half-written)."""
    from alflow.tasks.review import import_answers

    settings = _settings(config)
    store = _store(settings)
    written, unanswered, batch_id = import_answers(
        store, settings, path, annotator=annotator or settings.review.annotator, batch_id=batch, fmt=fmt
    )
    left = f"; {unanswered} rows had no label and wait" if unanswered else ""
    console.print(f"Batch {batch_id}: {written.summary()}{left}.")


def _resume(settings, store, batch_id: str | None, annotator: str, skip_rest: bool) -> None:
    from alflow.tasks.review import resume_batch

    with _prefect_api(settings):
        chosen = resume_batch(store, batch_id, annotator=annotator, skip_rest=skip_rest)
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
    app()


if __name__ == "__main__":
    main()
