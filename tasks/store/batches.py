"""Batches: the items queried for one review, who waits on them, and their status.

A batch is ``open`` while its review waits, then ``labeled`` (answers recorded) or
``expired`` (its run ended or its waiting process died; answers already given are kept and
its unanswered items return to the pool).
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import TYPE_CHECKING

import duckdb

from alflow.tasks.store.database import Database, StoreError, utcnow

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd

BATCH_STATUSES = ("open", "labeled", "expired")
# Picks that ask about an item already answered: its answers tie or disagree too much
# (adjudication), or the label check flagged its label as a likely error (recheck).
REASKED_PICKS = ("adjudication", "recheck")


class PoolChangedError(StoreError):
    """A picked item left the pool before its batch was recorded (another cycle took it)."""


def process_owner() -> str:
    """This process as ``host:pid``: who waits on a batch it created."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_gone(owner: str | None) -> bool:
    """True if ``owner`` (host:pid) is a process on this host that no longer runs.

    A process on another host, or one that cannot be checked, counts as alive.
    """
    if not isinstance(owner, str) or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


class BatchStore(Database):
    """Batches and their items (mixed into :class:`alflow.tasks.store.Store`)."""

    def create_batch(self, flow_run_id: str | None, strategy: str, model_version: int | None,
                     picks: pd.DataFrame) -> str:
        """Record a queried batch and its items in one transaction; returns the batch_id.

        ``picks`` has columns item_id, rank, score, prelabel, confidence, picked_by, and
        optionally overlap (answers wanted from distinct annotators, default 1) and
        prelabel_by (who suggested the pre-label, 'model' or 'llm'; default 'model' where
        there is one). The same
        transaction checks that every pick is still in the pool: an item not stored,
        already answered (unless picked for adjudication, :data:`REASKED_PICKS`) or in an
        open batch raises :class:`PoolChangedError` (naming it) and nothing is written; the
        caller picks again from the pool as it now is.
        """
        batch_id = uuid.uuid4().hex[:12]
        if "overlap" not in picks:
            picks = picks.assign(overlap=1)
        given = picks["prelabel_by"] if "prelabel_by" in picks else [None] * len(picks)
        picks = picks.assign(prelabel_by=[(by if isinstance(by, str) else "model") if isinstance(p, str) else None
                                          for p, by in zip(picks["prelabel"], given)])
        rows = picks.assign(batch_id=batch_id, reasked=picks["picked_by"].isin(REASKED_PICKS))
        repeated = picks["item_id"][picks["item_id"].duplicated()]
        if len(repeated):
            raise StoreError(f"item {repeated.iloc[0]} is picked twice for one batch")
        with self.transaction() as con:
            con.register("incoming", rows)
            taken = con.execute(
                """SELECT n.item_id,
                    CASE WHEN n.item_id NOT IN (SELECT item_id FROM items) THEN 'is not in the store'
                         WHEN NOT n.reasked AND n.item_id IN (SELECT item_id FROM labels)
                              THEN 'is already answered'
                         ELSE 'is in open batch ' || (
                            SELECT min(bi.batch_id) FROM batch_items bi JOIN batches b USING (batch_id)
                            WHERE b.status = 'open' AND bi.item_id = n.item_id)
                    END AS why
                FROM incoming n
                WHERE n.item_id NOT IN (SELECT item_id FROM items)
                   OR (NOT n.reasked AND n.item_id IN (SELECT item_id FROM labels))
                   OR n.item_id IN (SELECT bi.item_id FROM batch_items bi JOIN batches b USING (batch_id)
                                    WHERE b.status = 'open')
                ORDER BY n.rank"""
            ).fetchall()
            if taken:
                item_id, why = taken[0]
                more = f" (and {len(taken) - 1} more picks)" if len(taken) > 1 else ""
                raise PoolChangedError(f"cannot record the batch: item {item_id} {why}{more}")
            con.execute(
                "INSERT INTO batches (batch_id, flow_run_id, strategy, model_version, size, status, owner, "
                "created_at) VALUES (?, ?, ?, ?, ?, 'open', ?, ?)",
                [batch_id, flow_run_id, strategy, model_version, len(picks), process_owner(), utcnow()],
            )
            con.execute(
                """INSERT INTO batch_items BY NAME SELECT batch_id, item_id, rank, score,
                prelabel, confidence, picked_by, overlap, prelabel_by::VARCHAR AS prelabel_by FROM incoming"""
            )
            con.unregister("incoming")
        return batch_id

    def batch(self, batch_id: str) -> dict | None:
        frame = self.query_df("SELECT * FROM batches WHERE batch_id = ?", [batch_id])
        return None if frame.empty else frame.iloc[0].to_dict()

    def batches(self, status: str | None = None) -> pd.DataFrame:
        where = "WHERE status = ?" if status else ""
        return self.query_df(
            f"SELECT * FROM batches {where} ORDER BY created_at, batch_id", [status] if status else []
        )

    def batch_for_run(self, flow_run_id: str) -> dict | None:
        frame = self.query_df(
            "SELECT * FROM batches WHERE flow_run_id = ? ORDER BY created_at DESC LIMIT 1", [flow_run_id]
        )
        return None if frame.empty else frame.iloc[0].to_dict()

    def batch_items(self, batch_id: str) -> pd.DataFrame:
        """The batch in rank order with each item's text and its answers so far in this batch.

        ``answer`` is the latest answer recorded for the item in this batch (any annotator),
        ``answered_by`` who gave it; both are NULL while the item waits. ``overlap``: the
        distinct annotators' answers it needs, ``annotators``: how many it has in this batch.
        """
        return self.query_df(
            """SELECT bi.rank, bi.item_id, bi.score, bi.prelabel, bi.confidence, bi.picked_by, bi.prelabel_by,
                      i.source, i.title, i.text, i.url, i.external_id,
                      l.label AS answer, l.annotator AS answered_by,
                      coalesce(bi.overlap, 1) AS overlap, coalesce(l.annotators, 0) AS annotators
            FROM batch_items bi JOIN items i USING (item_id)
            LEFT JOIN (
                SELECT item_id, arg_max(label, label_id) AS label, arg_max(annotator, label_id) AS annotator,
                       count(*) AS annotators
                FROM batch_answers WHERE batch_id = ? GROUP BY item_id
            ) l USING (item_id)
            WHERE bi.batch_id = ? ORDER BY bi.rank""",
            [batch_id, batch_id],
        )

    def mark_offered(self, batch_id: str) -> None:
        """Record that ``batch_id`` is being shown for review (the first time only): from now
        on a run dying with it open expires it rather than handing it to the next cycle."""
        with self.transaction() as con:
            con.execute("UPDATE batches SET offered_at = ? WHERE batch_id = ? AND offered_at IS NULL",
                        [utcnow(), batch_id])

    def unoffered_batches(self) -> pd.DataFrame:
        """The open batches nobody has been shown yet, oldest first."""
        return self.query_df("SELECT * FROM batches WHERE status = 'open' AND offered_at IS NULL "
                             "ORDER BY created_at, batch_id")

    def adopt_batch(self, batch_id: str, from_run: str | None, flow_run_id: str | None) -> bool:
        """Hand an open batch nobody was shown from the run ``from_run`` (gone) to
        ``flow_run_id`` in this process; False if it changed meanwhile (closed, shown, or
        adopted by another run first)."""
        with self.transaction() as con:
            adopted = con.execute(
                "UPDATE batches SET flow_run_id = ?, owner = ? WHERE batch_id = ? AND status = 'open' "
                "AND offered_at IS NULL AND flow_run_id IS NOT DISTINCT FROM ? RETURNING batch_id",
                [flow_run_id, process_owner(), batch_id, from_run],
            ).fetchall()
        return bool(adopted)

    def close_batch(self, batch_id: str, status: str) -> None:
        """Mark an open batch labeled or expired (a closed batch stays as it is)."""
        with self.transaction() as con:
            self._close_batch(con, batch_id, status)

    @staticmethod
    def _close_batch(con: duckdb.DuckDBPyConnection, batch_id: str, status: str) -> None:
        if status not in BATCH_STATUSES[1:]:
            raise StoreError(f"batch status must be one of {BATCH_STATUSES[1:]}, not {status!r}")
        con.execute(
            "UPDATE batches SET status = ?, closed_at = ? WHERE batch_id = ? AND status = 'open'",
            [status, utcnow(), batch_id],
        )
