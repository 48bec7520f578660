"""Ingest: one configured source's records into ``items``, deduplicated by content hash.

A CSV, JSONL or Parquet file is read by DuckDB's own reader, its rows checked, hashed and
deduplicated in SQL and written in one transaction (:func:`ingest_scan`); where only Python's
reader gives the same records (a folder of text files, an encoding DuckDB does not read as
Python does, irregular CSV quoting, ...) and for the network sources, records come through
Python and are written ``WRITE_CHUNK`` (``NETWORK_WRITE_CHUNK``) at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field, replace
from typing import Callable

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE
from prefect.states import Failed

from alflow.config import Settings
from alflow.config.sources import NETWORK_SOURCES
from alflow.connectors import SourceError, build_connector, to_columns
from alflow.connectors.base import ITEM_COLUMNS
from alflow.tasks.faults import fault_point
from alflow.tasks.multilabel.tags import UNKNOWN_TAG, gold_tags
from alflow.tasks.progress import _logger, track
from alflow.tasks.retrying import is_transient
from alflow.tasks.store import ScanRefused, Store, utcnow

WRITE_CHUNK = 20_000  # records per transaction: bounded memory, and a re-run resumes cheaply
# A service's records come slowly and each one may have cost a quota: they are written a
# page or so at a time, so a source that stops keeps what it read.
NETWORK_WRITE_CHUNK = 20
ITEM_SCHEMA = pa.schema([(column, pa.string()) for column in ITEM_COLUMNS])
# Source settings that change how a source is read, not what it returns: changing them
# keeps the source's cursor (any other change starts its next fetch afresh).
HOW_NOT_WHAT = frozenset({"name", "timeout_seconds", "retries", "retry_wait_seconds", "max_retry_wait_seconds",
                          "page_delay_seconds", "user_agent", "api_key_env", "api_key_secret"})


@dataclass
class IngestReport:
    """What one source's ingest did. ``bad`` records failed (by reason in ``bad_reasons``);
    ``skipped`` were left out by the source's cursor (delivered by an earlier fetch);
    ``error`` is why the whole source stopped, None when it was read to its end."""

    source: str
    read: int = 0
    new: int = 0
    duplicate: int = 0
    bad: int = 0
    bad_reasons: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    error: str | None = None

    def reasons(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in sorted(self.bad_reasons.items()))

    def line(self) -> str:
        """``NAME: X read, Y new, Z duplicates, W failed (reasons)``; for a source that
        stopped, its error (with what it had stored before, if anything)."""
        counts = f"{self.read} read, {self.new} new, {self.duplicate} duplicates"
        if self.error is not None:
            stored = f" ({counts} before it stopped)" if self.new or self.duplicate else ""
            return f"{self.error}{stored}"
        failed = f", {self.bad} failed" + (f" ({self.reasons()})" if self.bad else "")
        skipped = f", {self.skipped} seen before (skipped)" if self.skipped else ""
        empty = "; the source is empty" if self.empty else ""
        return f"{self.source}: {counts}{failed}{skipped}{empty}"

    @property
    def empty(self) -> bool:
        """Read to its end and gave nothing at all (an empty file, a search without results):
        worth a warning, since nothing can be labeled from it."""
        return self.error is None and not (self.read or self.bad or self.skipped)


class SourceFailed(SourceError):
    """A source stopped; ``report`` says what it had read and stored before."""

    def __init__(self, message: str, report: IngestReport | None = None):
        super().__init__(message)
        self.report = report

    def __reduce__(self):
        return type(self), (str(self), self.report)


def by_reason(bad: dict[str, int]) -> dict[str, int]:
    """Reject counts in the order the ``ingests`` row and the cursor keep them: by reason."""
    return dict(sorted(bad.items()))


def settings_key(source) -> str:
    """A hash of the settings that choose what ``source`` returns (see ``HOW_NOT_WHAT``)."""
    chosen = source.model_dump(mode="json", exclude=set(HOW_NOT_WHAT))
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def unknown_gold_message(source: str, labels: list[str], unknown: Counter, hint: str) -> str:
    """One line: the gold label values outside ``labels``, most frequent first, with counts."""
    shown = 8
    ordered = sorted(unknown.items(), key=lambda pair: (-pair[1], str(pair[0])))
    values = ", ".join(f"{value!r} ({n})" for value, n in ordered[:shown])
    more = f" and {len(unknown) - shown} more values" if len(unknown) > shown else ""
    return f"{source}: gold labels not in labels {labels}: {values}{more}; {hint}"


def ingest_source(settings: Settings, source_name: str, ingest_id: str,
                  flow_run_id: str | None = None, full: bool = False) -> IngestReport:
    """Fetch one source and upsert its records, ``WRITE_CHUNK`` per transaction (a network
    source: ``NETWORK_WRITE_CHUNK``; a file DuckDB's reader reads: all in one, see
    :func:`ingest_scan`).

    Re-running is safe: items already stored (same content hash, from any source) count as
    duplicates. A source that fetches incrementally is given the cursor its last complete
    fetch left (unless ``full``, or its settings changed since), and the new cursor is
    stored in the transaction of the last chunk, so it never runs ahead of the items.
    A network source that stops mid-fetch has its records read so far stored (one
    transaction) before the error is raised, and its cursor left where it was: the next
    fetch asks for everything after it again, the stored part deduplicated.

    Gold labels go through the source's ``label_map``; each chunk is checked before it is
    written, and a gold label outside ``labels`` stops the writes: the rest of the source
    is only read, to count every such value, then the error names them (a stored item is
    never rewritten, so a bad gold label must not be stored at all).

    Raises :class:`SourceFailed` (a :class:`SourceError`) when the source stops, with the
    report of what was read and stored before.
    """
    source = next((s for s in settings.sources if s.name == source_name), None)
    if source is None:
        raise ValueError(f"no source named {source_name!r} in the config")
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    store.claim_task(settings.task)  # a store is one task: tag sets and classes never mix
    report = IngestReport(source=source.name)
    connector = None
    try:
        connector = build_connector(source)
        # A file is read as fast as it is written: the database stays open for all of its
        # reads and chunks. A service is waited on, so the database is opened per chunk
        # and free for other processes meanwhile.
        with store.held() if hasattr(connector, "fingerprint") else nullcontext():
            _ingest(store, settings, source, connector, report, ingest_id, flow_run_id, full)
    except SourceError as exc:
        if connector is not None:
            report.read = connector.report.read
            report.bad, report.bad_reasons = connector.report.n_bad, by_reason(connector.report.bad)
        report.error = str(exc).splitlines()[0] if str(exc) else f"source {source.name}: {type(exc).__name__}"
        raise SourceFailed(report.error, report) from None
    return report


def _ingest(store: Store, settings: Settings, source, connector, report: IngestReport, ingest_id: str,
            flow_run_id: str | None, full: bool) -> None:
    started = utcnow()
    records: list = []
    network = isinstance(source, NETWORK_SOURCES)
    chunk_size = NETWORK_WRITE_CHUNK if network else WRITE_CHUNK
    classes = set(settings.labels)
    label_map = source.label_map
    unknown: Counter = Counter()
    incremental = hasattr(connector, "next_cursor")
    key = settings_key(source)
    cursor = None
    stored = store.source_cursor(source.name) if not full else None
    if incremental and stored is not None and stored.settings == key:
        cursor = stored.value
    elif incremental and stored is not None:
        _logger().info(f"source {source.name}: its settings changed since the last fetch; "
                       "fetching everything again (deduplicated)")
    tags = settings.labels if settings.task == "multi_label" else None
    fingerprint = None
    if hasattr(connector, "fingerprint"):
        fingerprint = _file_ingest(store, settings, source, connector, report, ingest_id, flow_run_id, started,
                                   key, stored)
        if fingerprint is None:
            return

    def checked(gold: list) -> bool:
        if tags:  # multi-label gold is already checked per record (tagged_records)
            return True
        unknown.update(label for label in gold if label is not None and label not in classes)
        return not unknown

    def chunk() -> tuple[pa.Table, bool]:
        """The records read since the last chunk as rows, and whether their gold labels pass."""
        columns = to_columns(records, source.name)
        records.clear()
        if label_map and not tags:
            columns["gold_label"] = [label_map.get(g, g) if g is not None else None for g in columns["gold_label"]]
        ok = checked(columns["gold_label"])
        return pa.Table.from_arrays([pa.array(columns[c], pa.string()) for c in ITEM_COLUMNS], schema=ITEM_SCHEMA), ok

    writing: Future | None = None

    def written() -> None:
        """Count the chunk being written, once it is."""
        nonlocal writing
        if writing is not None:
            future, writing = writing, None
            new, duplicate = future.result()
            report.new += new
            report.duplicate += duplicate

    # One thread writes a chunk while the next is read (DuckDB lets go of the GIL); at most
    # one chunk waits for it, so memory stays at two chunks.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ingest-{source.name}") as writer, \
            track(f"ingest {source.name}", connector.expected_total()) as advance:
        fetched = connector.fetch(progress=advance, cursor=cursor) if incremental else connector.fetch(progress=advance)
        if tags:
            fetched = tagged_records(fetched, connector, label_map, tags, empty_tags_cell(source, connector))
        try:
            for record in fetched:
                records.append(record)
                if len(records) == 1:  # a chunk begun, nothing of it stored
                    fault_point("ingest-mid-chunk")
                if len(records) >= chunk_size:
                    rows, ok = chunk()
                    written()
                    writing = writer.submit(store.upsert_items, rows, ingest_id) if ok else None
        except Exception:
            with suppress(Exception):  # the source stopped: what it stored still counts
                written()
            if network and records:
                keep_read(store, source.name, chunk()[0], ingest_id, report)
            raise
        except BaseException:  # interrupted: no more writes, but the one under way counts
            with suppress(Exception):
                written()
            raise
        rows, ok = chunk()
        written()
        if not ok:
            raise SourceError(unknown_gold_message(
                f"source {source.name}", settings.labels, unknown,
                "fix label_column or map them with label_map",
            ))
        report.read = connector.report.read
        report.bad = connector.report.n_bad
        report.bad_reasons = by_reason(connector.report.bad)
        report.skipped = getattr(connector, "skipped_by_cursor", 0)
        counts = {"read": report.read, "new": report.new, "duplicate": report.duplicate, "bad": report.bad}
        next_cursor = connector.next_cursor if incremental else None
        if fingerprint is not None:
            next_cursor = {"fingerprint": fingerprint, "read": report.read, "bad_reasons": report.bad_reasons}
        new, duplicate = store.finish_ingest(
            rows, ingest_id, source.name, flow_run_id, started, counts,
            report.bad_reasons, cursor=next_cursor, settings_key=key,
        )
    report.new += new
    report.duplicate += duplicate


def _file_ingest(store: Store, settings: Settings, source, connector, report: IngestReport, ingest_id: str,
                 flow_run_id: str | None, started, key: str, stored) -> str | None:
    """A file's ingest as far as DuckDB's reader goes. None when it is done (the file unchanged
    since the last complete read, or read by DuckDB); else the file's fingerprint, for Python's
    reader to store with the rest."""
    # A file that fetches nothing new still has to be read, hashed and matched row by row to
    # learn that. Its bytes' hash answers the same question for the price of one pass: the
    # same bytes under the same settings and classes give the same records, every one stored
    # by the last complete read (items are never deleted), so that read's counts are this one's.
    last_read = stored.value.get("fingerprint") if stored is not None and stored.settings == key \
        and isinstance(stored.value, dict) else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hash-{source.name}") as pool:
        if last_read is not None:  # the look DuckDB's reader needs at the bytes waits: they may be unchanged
            fingerprint = file_fingerprint(connector, settings, look=False)
            if fingerprint == last_read:
                unchanged(store, source.name, stored, report, ingest_id, flow_run_id, started, key)
                return None
            hashed = lambda: fingerprint  # noqa: E731
        else:  # nothing to compare with: the hash and the look are read while DuckDB reads the rows
            hashed = pool.submit(file_fingerprint, connector, settings).result
        scan = connector.record_scan(looked=last_read is not None) if hasattr(connector, "record_scan") else None
        if scan is not None:
            try:
                ingest_scan(store, settings, source, connector, scan, report, ingest_id, flow_run_id, started, key,
                            hashed)
                return None
            except ScanRefused as exc:
                _logger().info(f"source {source.name}: read by Python's reader ({exc})")
        elif getattr(connector, "why_python", ""):
            _logger().info(f"source {source.name}: read by Python's reader ({connector.why_python})")
        return hashed()


def ingest_scan(store: Store, settings: Settings, source, connector, scan, report: IngestReport, ingest_id: str,
                flow_run_id: str | None, started, key: str, hashed: Callable[[], str]) -> None:
    """:func:`_ingest` for a file DuckDB's own reader reads (``scan``, from the connector):
    its rows checked, hashed and deduplicated in SQL, written in one transaction with the
    ``ingests`` row and the cursor. The same records, counts and errors as the Python path,
    which takes over (:class:`ScanRefused`, nothing written) where DuckDB would read the
    file otherwise.

    ``hashed()`` gives the file's fingerprint, for its cursor; reading it also looks at the
    bytes, as ``scan`` did not. Gold labels outside ``labels`` store what the Python path would
    have stored: the ``WRITE_CHUNK``-record chunks before the first such label.
    """
    classes, label_map = set(settings.labels), source.label_map
    unknown: Counter = Counter()
    with store.staged_scan(scan) as staged, track(f"ingest {source.name}", connector.expected_total()) as advance:
        fault_point("ingest-mid-chunk")  # the file read and staged, none of it stored
        fingerprint = hashed()
        if connector.bytes_refusal:  # bytes DuckDB's reader reads otherwise: nothing is written
            raise ScanRefused(connector.bytes_refusal)
        connector.report.read, connector.report.bad = staged.read, Counter(staged.bad_reasons)
        advance(staged.read + sum(staged.bad_reasons.values()))
        if settings.task == "multi_label":  # gold cells become tag sets' text forms, bad tags rejects
            staged.tag_gold(label_map, list(settings.labels), empty_tags_cell(source, connector), UNKNOWN_TAG)
            connector.report.read, connector.report.bad = staged.read, Counter(staged.bad_reasons)
            classes, label_map = None, {}
        gold = staged.gold_counts()
        for value, n in gold.items():
            label = label_map.get(value, value)
            if classes is not None and label not in classes:
                unknown[label] += n
        if unknown:
            outside = {value for value in gold if label_map.get(value, value) not in (classes or ())}
            chunks = staged.records_before(outside) // WRITE_CHUNK * WRITE_CHUNK
            report.new, report.duplicate = staged.insert(source.name, ingest_id, label_map, records=chunks)
        else:
            report.new, report.duplicate = staged.insert(source.name, ingest_id, label_map)
            report.read, report.bad_reasons = staged.read, by_reason(staged.bad_reasons)
            report.bad = sum(report.bad_reasons.values())
            counts = {"read": report.read, "new": report.new, "duplicate": report.duplicate, "bad": report.bad}
            cursor = {"fingerprint": fingerprint, "read": report.read, "bad_reasons": report.bad_reasons}
            staged.finish(ingest_id, source.name, flow_run_id, started, counts, report.bad_reasons, cursor=cursor,
                          settings_key=key)
    if unknown:
        raise SourceError(unknown_gold_message(f"source {source.name}", settings.labels, unknown,
                                               "fix label_column or map them with label_map"))


def empty_tags_cell(source, connector) -> bool:
    """True if a multi-label source's missing gold cell is an answer ("": no tag applies),
    not "no gold": a CSV file with ``label_column`` (a CSV row has every column, so its empty
    cell is the empty set). In JSONL, a null or absent field is no gold; write ";" there for
    the empty set."""
    return bool(getattr(source, "label_column", None)) and getattr(connector, "format", None) == "csv"


def tagged_records(records, connector, label_map: dict[str, str], tags: list[str], empty_is_answer: bool):
    """``records`` with multi-label gold: each gold cell as its tag set's text form
    (:func:`alflow.tasks.multilabel.tags.gold_tags`); a record naming a tag outside ``tags``
    is not yielded but rejected in ``connector.report`` (reason UNKNOWN_TAG), as DuckDB's
    path rejects it (:meth:`StagedScan.tag_gold`)."""
    for record in records:
        cell = "" if record.gold_label is None and empty_is_answer else record.gold_label
        try:
            gold = gold_tags(cell, label_map, tags)
        except ValueError:
            connector.report.read -= 1  # counted as read when yielded: a reject instead
            connector.report.reject(UNKNOWN_TAG)
            continue
        yield replace(record, gold_label=gold)


def keep_read(store: Store, source: str, rows: pa.Table, ingest_id: str, report: IngestReport) -> None:
    """Store the records a network source read before it stopped (one transaction) and
    count them; a failure to store them is logged, never raised over the source's error."""
    try:
        new, duplicate = store.upsert_items(rows, ingest_id)
    except Exception as exc:  # noqa: BLE001 - the source's own error is the one to raise
        _logger().warning(f"source {source}: the {len(rows)} records read before it stopped "
                          f"could not be stored: {type(exc).__name__}: {exc}")
        return
    report.new += new
    report.duplicate += duplicate


def file_fingerprint(connector, settings: Settings, look: bool = True) -> str:
    """The file's bytes' hash and the classes its gold labels were checked against (``look``:
    see the connector's ``fingerprint``)."""
    labels = hashlib.sha256(json.dumps(settings.labels).encode()).hexdigest()[:16]
    return f"{connector.fingerprint(look=look)}:{labels}"


def unchanged(store: Store, source: str, stored, report: IngestReport, ingest_id: str,
              flow_run_id: str | None, started, key: str) -> None:
    """A file read before, byte for byte: the last read's counts, every record a duplicate;
    the ``ingests`` row and the cursor's ingest run written as a read would write them."""
    report.read = int(stored.value["read"])
    report.bad_reasons = {str(k): int(n) for k, n in stored.value["bad_reasons"].items()}
    report.bad = sum(report.bad_reasons.values())
    report.duplicate = report.read
    _logger().info(f"source {source}: unchanged since ingest {stored.ingest_id} (the same bytes); "
                   f"its {report.read} records are stored")
    counts = {"read": report.read, "new": 0, "duplicate": report.duplicate, "bad": report.bad}
    # No chunk, not even an empty table: building one imports pandas (pyarrow looks for it).
    store.finish_ingest(None, ingest_id, source, flow_run_id, started, counts, report.bad_reasons,
                        cursor=stored.value, settings_key=key)


# Connectors that call services retry inside (backoff, Retry-After); a task-level retry
# covers a whole-source failure such as a lock held past its timeout.
@task(name="ingest-source", retries=2, retry_delay_seconds=[5, 30], cache_policy=NONE,
      retry_condition_fn=is_transient,
      task_run_name="ingest-{source_name}")
def ingest_source_task(settings: Settings, source_name: str, ingest_id: str,
                       flow_run_id: str | None = None, full: bool = False) -> IngestReport:
    """A source that stops ends its task Failed with its one-line reason (no traceback: the
    cause is the source, not the code), carrying the :class:`SourceFailed` with its report."""
    from prefect.logging import get_run_logger

    try:
        report = ingest_source(settings, source_name, ingest_id, flow_run_id, full)
    except SourceFailed as exc:
        return Failed(message=exc.report.line() if exc.report else str(exc), data=exc)
    logger = get_run_logger()
    (logger.warning if report.empty else logger.info)(report.line())
    return report


def ingest_rows(reports: list[IngestReport]) -> list[dict]:
    """The reports as table rows for the UI (each text cell escaped: the UI renders Markdown)."""
    from alflow.tasks.report import markdown_text

    return [
        {
            "source": markdown_text(r.source),
            "status": "failed" if r.error is not None else "ok",
            "read": r.read,
            "new": r.new,
            "duplicates": r.duplicate,
            "failed": r.bad,
            "reasons": markdown_text(r.reasons()),
            "seen before": r.skipped,
            "error": markdown_text(r.error or ""),
        }
        for r in reports
    ]


def publish_ingest(reports: list[IngestReport]) -> None:
    """Table artifact: one row per source, as the `alflow ingest` lines say it."""
    from prefect.artifacts import create_table_artifact

    failed = [r.source for r in reports if r.error is not None]
    summary = f"{len(failed)} failed: {', '.join(failed)}" if failed else "all read"
    create_table_artifact(key="ingest-report", table=ingest_rows(reports),
                          description=f"Ingest of {len(reports)} sources ({summary}).")
