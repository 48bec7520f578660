"""Ingest: one configured source's records into ``items``, deduplicated by content hash."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import pandas as pd
from prefect import task
from prefect.cache_policies import NONE

from alflow.config import Settings
from alflow.connectors import SourceError, build_connector, to_row
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


def unknown_gold_message(source: str, labels: list[str], unknown: Counter, hint: str) -> str:
    """One line: the gold label values outside ``labels``, most frequent first, with counts."""
    shown = 8
    ordered = sorted(unknown.items(), key=lambda pair: (-pair[1], str(pair[0])))
    values = ", ".join(f"{value!r} ({n})" for value, n in ordered[:shown])
    more = f" and {len(unknown) - shown} more values" if len(unknown) > shown else ""
    return f"{source}: gold labels not in labels {labels}: {values}{more}; {hint}"


def ingest_source(settings: Settings, source_name: str, ingest_id: str,
                  flow_run_id: str | None = None) -> IngestReport:
    """Fetch one source and upsert its records, ``WRITE_CHUNK`` per transaction.

    Re-running is safe: items already stored (same content hash) count as duplicates.
    Gold labels go through the source's ``label_map``; each chunk is checked before it is
    written, and a gold label outside ``labels`` stops the writes: the rest of the source
    is only read, to count every such value, then :class:`SourceError` names them (a
    stored item is never rewritten, so a bad gold label must not be stored at all).
    """
    source = next((s for s in settings.sources if s.name == source_name), None)
    if source is None:
        raise ValueError(f"no source named {source_name!r} in the config")
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    connector = build_connector(source)
    report = IngestReport(source=source.name)
    started = utcnow()
    rows: list[dict] = []
    classes = set(settings.labels)
    label_map = source.label_map
    unknown: Counter = Counter()

    def flush() -> None:
        bad = Counter(row["gold_label"] for row in rows
                      if row["gold_label"] is not None and row["gold_label"] not in classes)
        unknown.update(bad)
        if not unknown:
            new, duplicate = store.upsert_items(pd.DataFrame(rows), ingest_id)
            report.new += new
            report.duplicate += duplicate
        rows.clear()

    with track(f"ingest {source.name}", connector.expected_total()) as advance:
        for record in connector.fetch(progress=advance):
            row = to_row(record, source.name)
            if row["gold_label"] is not None:
                row["gold_label"] = label_map.get(row["gold_label"], row["gold_label"])
            rows.append(row)
            if len(rows) >= WRITE_CHUNK:
                flush()
        if rows:
            flush()
    if unknown:
        raise SourceError(unknown_gold_message(
            f"source {source.name}", settings.labels, unknown,
            "fix label_column or map them with label_map",
        ))
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
