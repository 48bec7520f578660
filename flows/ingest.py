"""The ingest flow: every configured source into the DuckDB ``items`` table.

    network sources -> ingest-NAME tasks, concurrently in threads ─┐
    files sources   -> ingest-NAME tasks, one after another ────────┴─> ingest-report table
                                                                        (Failed if any failed)

One task per source. Network sources (wikipedia, youtube, google) spend their time waiting
on services, so they run concurrently in threads; file sources run one after another in
config order, so that which source an item shared by two files is stored under does not
depend on timing. The store serialises the write transactions. One source failing does not
stop the others: their items are stored, and the flow ends Failed naming the failed ones.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State

from alflow.config import ConfigError, Settings, load_config
from alflow.connectors import SourceError
from alflow.tasks.ingest import IngestReport, SourceFailed, ingest_source_task, publish_ingest
from alflow.tasks.store import Store, StoreError

NETWORK_TYPES = ("wikipedia", "youtube", "google")


class IngestFailed(SourceError):
    """Some sources failed. ``reports`` holds every source's report (the failed ones with
    their ``error``); the message names each failed source and why, in one line."""

    def __init__(self, reports: list[IngestReport]):
        self.reports = reports
        failed = [report for report in reports if report.error is not None]
        errors = "; ".join(report.error for report in failed)
        super().__init__(errors if len(reports) == 1 else f"{len(failed)} of {len(reports)} sources failed: {errors}")

    def __reduce__(self):
        return type(self), (self.reports,)

    @property
    def failed(self) -> list[str]:
        return [report.source for report in self.reports if report.error is not None]

    @property
    def all_failed(self) -> bool:
        return len(self.failed) == len(self.reports)


def source_names(settings: Settings, source: str | None = None) -> list[str]:
    """The sources to ingest: all of them, or the one named ``source`` (one-line error if
    there is none by that name)."""
    names = [s.name for s in settings.sources]
    if source is None:
        return names
    if source not in names:
        configured = ", ".join(names) if names else "none"
        raise ConfigError(f"--source {source}: no such source in {settings.config_path} (configured: {configured})")
    return [source]


@flow(name="ingest", log_prints=True)
def ingest(config_path: str = "alflow.toml", source: str | None = None, full: bool = False) -> list[IngestReport]:
    """Fetch each source (or only ``source``) and upsert its records, deduplicated by content hash.

    Safe to re-run at any time: nothing already stored is written twice, and each source
    that fetches incrementally asks only for what is new since its cursor (``full``
    ignores the cursors). Returns one report per source; if any source failed, the run
    ends Failed with :class:`IngestFailed` (raised to a caller), the others' items stored.
    """
    settings = load_config(config_path, check_model=False)  # ingest builds no model
    names = source_names(settings, source)
    Store(settings.database, settings.store.lock_timeout_seconds).migrate()
    run_id = flow_run.get_id()
    types = {s.name: s.type for s in settings.sources}
    futures = {name: ingest_source_task.submit(settings, name, run_id, run_id, full)
               for name in names if types[name] in NETWORK_TYPES}
    states: dict[str, State] = {}
    for name in names:
        if name not in futures:
            states[name] = ingest_source_task(settings, name, run_id, run_id, full, return_state=True)
    for name, future in futures.items():
        future.wait()
        states[name] = future.state
    reports = [report_from(name, states[name]) for name in names]
    publish_ingest(reports)
    if any(report.error is not None for report in reports):
        error = IngestFailed(reports)
        return Failed(message=str(error), data=error)
    return reports


def report_from(name: str, state: State) -> IngestReport:
    """A source task's report; for a failed task, one with the error that stopped it."""
    if state.is_completed():
        return state.result()
    try:
        error = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - the result could not be read: report that
        error = exc
    if isinstance(error, SourceFailed) and error.report is not None:
        return error.report
    if isinstance(error, (SourceError, ConfigError, StoreError)):
        message = str(error)
    elif isinstance(error, BaseException):
        message = f"source {name}: {type(error).__name__}: {error}"
    else:  # crashed or cancelled: no exception to show
        message = f"source {name}: task {state.name.lower()}: {state.message or ''}".rstrip(": ")
    if not message.startswith(f"source {name}:"):
        message = f"source {name}: {message}"
    return IngestReport(source=name, error=message.splitlines()[0] if message else f"source {name}: failed")


def ingest_for_cycle(config_path: str) -> list[IngestReport]:
    """The cycle's ingest step. When some sources fail the cycle goes on with what the
    others stored (a daily cycle is not lost to one flaky source) and logs an error naming
    the failed ones; when every source failed it fails with their errors."""
    try:
        return ingest(config_path)
    except IngestFailed as exc:
        if exc.all_failed:
            raise
        get_run_logger().error(f"ingest: {exc}; the cycle goes on with the items stored")
        return exc.reports
