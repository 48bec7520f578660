"""Ingest: one configured source's records into ``items``, deduplicated by content hash."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import Settings
from alflow.connectors import build_connector, to_row
from alflow.tasks.progress import track
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import Store, utcnow

WRITE_CHUNK = 5000  # records per transaction: bounded memory, and a re-run resumes cheaply


@dataclass
class IngestReport:
    source: str
    read: int = 0
    new: int = 0
    duplicate: int = 0
    bad: int = 0
    bad_reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(self.bad_reasons.items()))
        bad = f", {self.bad} rejected ({reasons})" if self.bad else ""
        return f"{self.source}: {self.read} read, {self.new} new, {self.duplicate} duplicates{bad}"


def ingest_source(settings: Settings, source_name: str, ingest_id: str,
                  flow_run_id: str | None = None) -> IngestReport:
    """Fetch one source and upsert its records, ``WRITE_CHUNK`` per transaction.

    Re-running is safe: items already stored (same content hash) count as duplicates.
    """
    source = next((s for s in settings.sources if s.name == source_name), None)
    if source is None:
        raise ValueError(f"no source named {source_name!r} in the config")
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    connector = build_connector(source)
    report = IngestReport(source=source.name)
    started = utcnow()
    rows: list[dict] = []

    def flush() -> None:
        new, duplicate = store.upsert_items(pd.DataFrame(rows), ingest_id)
        report.new += new
        report.duplicate += duplicate
        rows.clear()

    with track(f"ingest {source.name}", connector.expected_total()) as advance:
        for record in connector.fetch(progress=advance):
            rows.append(to_row(record, source.name))
            if len(rows) >= WRITE_CHUNK:
                flush()
        if rows:
            flush()
    report.read = connector.report.read
    report.bad = connector.report.n_bad
    report.bad_reasons = dict(connector.report.bad)
    store.record_ingest(ingest_id, source.name, flow_run_id, started, asdict(report), report.bad_reasons)
    return report


# Connectors that call services retry inside (backoff, Retry-After); a task-level retry
# covers a whole-source failure such as a lock held past its timeout.
@task(name="ingest-source", retries=2, retry_delay_seconds=[5, 30], cache_policy=NONE,
      retry_condition_fn=is_transient,
      task_run_name="ingest-{source_name}")
def ingest_source_task(settings: Settings, source_name: str, ingest_id: str,
                       flow_run_id: str | None = None) -> IngestReport:
    from prefect.logging import get_run_logger

    report = ingest_source(settings, source_name, ingest_id, flow_run_id)
    get_run_logger().info(report.line())
    return report
