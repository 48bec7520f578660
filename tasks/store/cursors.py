"""Source cursors: what each source has already delivered, for incremental fetching.

A connector that fetches incrementally leaves ``next_cursor`` after a complete fetch (see
:mod:`alflow.connectors.base`); it is stored in ``source_cursors`` and handed back on the
source's next fetch. A cursor is written in the transaction that commits the source's last
chunk of items and its ``ingests`` row, so it never gets ahead of what is stored.

The ``cursor`` column holds ``{"value": <next_cursor>, "settings": <key>}``: ``settings`` is
a hash of the source settings that choose its results (query, limit, language, ...), so a
cursor left by an earlier query is not applied to a changed one (a newest date from
``search = "glacier"`` would otherwise hide older ``"volcano"`` news).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import duckdb

from alflow.tasks.faults import fault_point
from alflow.tasks.store.database import utcnow
from alflow.tasks.store.pool import PoolStore

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd
    import pyarrow as pa


@dataclass(frozen=True)
class SourceCursor:
    value: Any  # the connector's next_cursor, as JSON gave it back
    settings: str | None  # the key of the source settings it was made under
    ingest_id: str | None
    updated_at: datetime


class CursorStore(PoolStore):
    """Source cursors, and the last write of an ingest (mixed into :class:`~alflow.tasks.store.Store`)."""

    def source_cursor(self, source: str) -> SourceCursor | None:
        """The cursor ``source``'s last complete fetch left, or None."""
        with self.connect() as con:
            row = con.execute(
                "SELECT cursor, ingest_id, updated_at FROM source_cursors WHERE source = ?", [source]
            ).fetchone()
        if row is None:
            return None
        stored = json.loads(row[0])
        return SourceCursor(stored.get("value"), stored.get("settings"), row[1], row[2])

    def finish_ingest(self, items: pd.DataFrame | pa.Table | None, ingest_id: str, source: str,
                      flow_run_id: str | None, started_at: datetime, counts: dict, bad_reasons: dict,
                      cursor: Any = None, settings_key: str | None = None) -> tuple[int, int]:
        """One transaction: a source's last chunk of ``items`` (None: no chunk), its ``ingests``
        row and its cursor.

        ``counts`` (read, new, duplicate, bad) are those of the chunks written before; this
        chunk's new and duplicate items are added to them for the ``ingests`` row. A None
        ``cursor`` leaves any stored one as it is (the source does not fetch incrementally).
        Returns this chunk's (new, duplicate).
        """
        with self.transaction() as con:
            new, duplicate = self._insert_items(con, items, ingest_id) if items is not None else (0, 0)
            total = {**counts, "new": counts["new"] + new, "duplicate": counts["duplicate"] + duplicate}
            self._record_finish(con, ingest_id, source, flow_run_id, started_at, total, bad_reasons, cursor,
                                settings_key)
        return new, duplicate

    @staticmethod
    def _record_finish(con: duckdb.DuckDBPyConnection, ingest_id: str, source: str, flow_run_id: str | None,
                       started_at: datetime, counts: dict, bad_reasons: dict, cursor: Any = None,
                       settings_key: str | None = None) -> None:
        """A source's ``ingests`` row (``counts`` its totals) and its cursor, in the caller's
        transaction, after the source's last items."""
        PoolStore._insert_ingest(con, ingest_id, source, flow_run_id, started_at, counts, bad_reasons)
        fault_point("ingest-after-write")  # items written, cursor not: the transaction keeps them together
        if cursor is not None:
            con.execute(
                "INSERT OR REPLACE INTO source_cursors VALUES (?, ?, ?, ?)",
                [source, json.dumps({"value": cursor, "settings": settings_key}), ingest_id, utcnow()],
            )
