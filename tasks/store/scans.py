"""A file's records read by DuckDB's own reader and written in one transaction.

The files connector describes how DuckDB reads a file (a ``RecordScan``, see
:mod:`alflow.connectors.files`): queries yielding a row per row of the file, in file order,
with the items columns (item_id, title, text, external_id, url, gold_label, meta), ``reason``
(why the row is not a record; NULL for a record) and ``python_only`` (TRUE where only
Python's reader gives the record the Python path would store). :meth:`ScanStore.staged_scan`
stages those rows in a temporary table, whose rowid is then the file order, and hands the
transaction over: the records are counted, their gold labels checked, the first copy of each
item not stored yet inserted with one anti-join, and the source's ``ingests`` row and cursor
written (:meth:`StagedScan.finish`), all committed together. No row of the file becomes a
Python object.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

import duckdb

from alflow.tasks.store.cursors import CursorStore
from alflow.tasks.store.database import StoreError, utcnow

STAGED = "scan_records"


class ScanRefused(StoreError):
    """DuckDB's reader does not give this file's records as Python's reader does (rows it
    rejects otherwise, rows only Python reads, a file it cannot parse); nothing was written."""


class _Refused(Exception):
    """One attempt of a scan refused: its transaction is rolled back, the next one is tried."""


@dataclass
class StagedScan:
    """A file's rows staged in the open transaction ``con``: ``read`` records, ``bad_reasons``
    the rows that are not records, by reason."""

    con: duckdb.DuckDBPyConnection
    read: int
    bad_reasons: dict[str, int]

    def gold_counts(self) -> Counter:
        """The records' gold labels as the file has them (before any label_map): value -> count."""
        rows = self.con.execute(
            f"SELECT gold_label, count(*) FROM {STAGED} WHERE reason IS NULL AND gold_label IS NOT NULL GROUP BY ALL"
        ).fetchall()
        return Counter(dict(rows))

    def tag_gold(self, label_map: dict[str, str], tags: list[str], empty_is_answer: bool, reason: str) -> None:
        """Multi-label gold: rewrite each record's ``;``-separated gold cell as its tag set's
        text form (each tag through ``label_map``, sorted, distinct), or reject the record with
        ``reason`` where a tag is outside ``tags``; ``empty_is_answer``: a missing cell (an
        empty CSV cell) is "" (no tag applies), not "no gold". ``read``/``bad_reasons`` follow."""
        cell = "gold_label" if not empty_is_answer else "coalesce(gold_label, '')"
        mapped = ("list_transform(list_filter(list_transform(string_split(g, ';'), lambda t: trim(t)), "
                  "lambda t: t <> ''), "
                  "lambda t: coalesce(map_extract_value(MAP($raw::VARCHAR[], $mapped::VARCHAR[]), t), t))")
        self.con.execute(
            f"""UPDATE {STAGED} SET
                  reason = CASE WHEN len(list_filter(m, lambda t: NOT list_contains($tags::VARCHAR[], t))) > 0
                                THEN $reason END,
                  gold_label = array_to_string(list_sort(list_distinct(m)), ';')
                FROM (SELECT rowid AS r, {mapped} AS m FROM (SELECT rowid, {cell} AS g FROM {STAGED})) AS t
                WHERE {STAGED}.rowid = t.r AND {STAGED}.reason IS NULL AND t.m IS NOT NULL""",
            {"raw": list(label_map), "mapped": list(label_map.values()), "tags": list(tags), "reason": reason})
        rejected = int(self.con.execute(f"SELECT count(*) FROM {STAGED} WHERE reason = ?", [reason]).fetchone()[0])
        if rejected:
            self.read -= rejected
            self.bad_reasons = dict(self.bad_reasons, **{reason: self.bad_reasons.get(reason, 0) + rejected})

    def records_before(self, gold_labels: set[str]) -> int:
        """How many records come before the first whose gold label is one of ``gold_labels``
        (all of them when none is)."""
        if not gold_labels:
            return self.read
        first = self.con.execute(
            f"SELECT min(rowid) FROM {STAGED} WHERE reason IS NULL AND list_contains(?::VARCHAR[], gold_label)",
            [sorted(gold_labels)]).fetchone()[0]
        return int(self.con.execute(
            f"SELECT count(*) FROM {STAGED} WHERE reason IS NULL AND rowid < ?", [first]).fetchone()[0])

    def insert(self, source: str, ingest_run: str, label_map: dict[str, str] | None = None,
               records: int | None = None) -> tuple[int, int]:
        """Insert the first copy (in file order) of each record's item not stored yet, its gold
        label through ``label_map``; only the first ``records`` records when given. Returns
        (new, duplicate) among those records."""
        considered = self.read if records is None else min(int(records), self.read)
        if considered == 0:
            return 0, 0
        params: dict[str, Any] = {"source": source, "fetched_at": utcnow(), "ingest_run": ingest_run}
        cut = ""
        if considered < self.read:  # the rowid of the first record left out
            cut = "AND rowid < $cut"
            params["cut"] = self.con.execute(
                f"SELECT rowid FROM {STAGED} WHERE reason IS NULL ORDER BY rowid LIMIT 1 OFFSET ?",
                [considered]).fetchone()[0]
        gold = "gold_label"
        if label_map:
            gold = "coalesce(map_extract_value(MAP($raw::VARCHAR[], $mapped::VARCHAR[]), gold_label), gold_label)"
            params.update(raw=list(label_map), mapped=list(label_map.values()))
        # An anti-join on the content hash, as for a chunk of Python's records
        # (PoolStore._insert_items); the primary key stays the safety net.
        new = self.con.execute(
            f"""INSERT INTO items BY NAME
            SELECT item_id, $source AS source, external_id, url, title, text, {gold} AS gold_label,
                   meta, $fetched_at::TIMESTAMP AS fetched_at, $ingest_run AS ingest_run
            FROM (SELECT * FROM {STAGED} WHERE rowid IN (
                      SELECT min(rowid) FROM {STAGED} WHERE reason IS NULL {cut} GROUP BY item_id))
            ANTI JOIN items USING (item_id)""",
            params,
        ).fetchone()[0]
        return int(new), considered - int(new)

    def finish(self, ingest_id: str, source: str, flow_run_id: str | None, started_at: datetime, counts: dict,
               bad_reasons: dict, cursor: Any = None, settings_key: str | None = None) -> None:
        """The source's ``ingests`` row and cursor, in this transaction (after its items)."""
        CursorStore._record_finish(self.con, ingest_id, source, flow_run_id, started_at, counts, bad_reasons,
                                   cursor, settings_key)


class ScanStore(CursorStore):
    """Files read by DuckDB's reader (mixed into :class:`~alflow.tasks.store.Store`)."""

    @contextmanager
    def staged_scan(self, scan) -> Iterator[StagedScan]:
        """One transaction with the file's rows staged (see the module docstring); committed
        when the block ends, rolled back if it raises. Tries ``scan.attempts`` in order;
        raises :class:`ScanRefused` (nothing written) when each is refused."""
        refusals = []
        for query in scan.attempts:
            try:
                with self.transaction() as con:
                    staged = _stage(con, query, scan)
                    yield staged
                    return
            except _Refused as exc:
                refusals.append(str(exc))
        raise ScanRefused("; ".join(refusals))


def _stage(con: duckdb.DuckDBPyConnection, query: str, scan) -> StagedScan:
    """Stage ``query``'s rows and count them; :class:`_Refused` when DuckDB's reader fails or
    gives rows Python's reader would give otherwise."""
    # Statistics would mislead: a Parquet float column's leave NaN out, and DuckDB then folds
    # "is this NaN" to FALSE (even through a cast to text).
    con.execute("SET disabled_optimizers = 'statistics_propagation'")
    try:
        con.execute(f"CREATE TEMP TABLE {STAGED} AS {query}", list(scan.params))
    except (duckdb.InvalidInputException, duckdb.ConversionException) as exc:
        raise _Refused(f"DuckDB's reader: {str(exc).splitlines()[0]}") from None
    con.execute("RESET disabled_optimizers")
    bad: Counter = Counter()
    if scan.rejects_table:
        rejected = con.execute(
            f"SELECT error_type, count(DISTINCT line) FROM {scan.rejects_table} GROUP BY ALL").fetchall()
        for kind, n in rejected:
            if kind not in (scan.rejects or {}):
                raise _Refused(f"DuckDB's reader rejects rows as {kind}")
            bad[scan.rejects[kind]] += int(n)
    read = 0
    for reason, n, python_only in con.execute(
            f"SELECT reason, count(*), bool_or(python_only) FROM {STAGED} GROUP BY ALL").fetchall():
        if python_only:
            raise _Refused("rows only Python's reader reads as before")
        if reason is None:
            read = int(n)
        else:
            bad[reason] += int(n)
    return StagedScan(con, read, dict(bad))
