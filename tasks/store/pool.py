"""The pool: items as sources gave them, the gold holdout, and the models' predictions.

An item is in the **pool** while the loop may still ask about it: no answer recorded, not in
an open batch, not held out for evaluation. Reads page through it (keyset on item_id), so
the whole pool is never in memory at once.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Iterator, Sequence

import duckdb
import numpy as np
import pandas as pd

from alflow.tasks.store.database import Database, utcnow

# The text a model sees: the title when it adds something, then the body. The same rule as
# :func:`document`, in SQL over ``items i``.
DOC_SQL = (
    "CASE WHEN i.title IS NULL OR i.title = '' OR starts_with(i.text, i.title) "
    "THEN i.text ELSE i.title || E'\\n' || i.text END"
)


def title_adds(title: str | None, text: str) -> bool:
    """True when an item's title says something its text does not already start with."""
    return isinstance(title, str) and bool(title) and not text.startswith(title)


def document(title: str | None, text: str, sep: str = "\n") -> str:
    """An item's title and text as one string (the title only when it adds something)."""
    return f"{title}{sep}{text}" if title_adds(title, text) else text


def holdout_sql(fraction: float | None, alias: str = "i") -> str:
    """SQL that is TRUE for the held-out gold items: a stable function of the content hash."""
    if not fraction:
        return "FALSE"
    # item_id is a hex sha256, so its first 32 bits are uniform on [0, 2**32).
    return (
        f"({alias}.gold_label IS NOT NULL AND "
        f"(('0x' || substr({alias}.item_id, 1, 8))::UBIGINT / 4294967296.0) < {float(fraction)!r})"
    )


class PoolStore(Database):
    """Items, the holdout and predictions (mixed into :class:`alflow.tasks.store.Store`)."""

    def upsert_items(self, items: pd.DataFrame, ingest_run: str) -> tuple[int, int]:
        """Insert items not stored yet (by item_id) in one transaction.

        ``items`` has columns item_id, source, external_id, url, title, text, gold_label,
        meta (a JSON string). Returns (new, duplicate) counts; duplicates within ``items``
        count as duplicates too.
        """
        if items.empty:
            return 0, 0
        with self.transaction() as con:
            return self._insert_items(con, items, ingest_run)

    @staticmethod
    def _insert_items(con: duckdb.DuckDBPyConnection, items: pd.DataFrame, ingest_run: str) -> tuple[int, int]:
        """:meth:`upsert_items` inside the caller's transaction."""
        if items.empty:
            return 0, 0
        unique = items.drop_duplicates("item_id")
        in_batch_dups = len(items) - len(unique)
        frame = unique.assign(fetched_at=utcnow(), ingest_run=ingest_run)
        con.register("incoming", frame)
        new = con.execute(
            "SELECT count(*) FROM incoming WHERE item_id NOT IN (SELECT item_id FROM items)"
        ).fetchone()[0]
        con.execute(
            """INSERT INTO items BY NAME
            SELECT item_id, source, external_id, url, title, text, gold_label,
                   meta::JSON AS meta, fetched_at, ingest_run
            FROM incoming ON CONFLICT DO NOTHING"""
        )
        con.unregister("incoming")
        return int(new), int(len(unique) - new + in_batch_dups)

    def record_ingest(self, ingest_id: str, source: str, flow_run_id: str | None,
                      started_at: datetime, counts: dict, bad_reasons: dict) -> None:
        with self.transaction() as con:
            self._insert_ingest(con, ingest_id, source, flow_run_id, started_at, counts, bad_reasons)

    @staticmethod
    def _insert_ingest(con: duckdb.DuckDBPyConnection, ingest_id: str, source: str, flow_run_id: str | None,
                       started_at: datetime, counts: dict, bad_reasons: dict) -> None:
        """:meth:`record_ingest` inside the caller's transaction."""
        con.execute(
            "INSERT OR REPLACE INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [ingest_id, source, flow_run_id, started_at, utcnow(), counts["read"],
             counts["new"], counts["duplicate"], counts["bad"], json.dumps(bad_reasons)],
        )

    def items(self, item_ids: Sequence[str]) -> pd.DataFrame:
        """The stored items with these ids, in the given order (missing ids are absent)."""
        if not item_ids:
            return pd.DataFrame(columns=["item_id", "source", "title", "text", "url", "gold_label"])
        ids = pd.DataFrame({"item_id": list(item_ids), "pos": range(len(item_ids))})
        with self.connect() as con:
            con.register("wanted", ids)
            return con.execute(
                """SELECT i.item_id, i.source, i.external_id, i.title, i.text, i.url, i.gold_label
                FROM wanted w JOIN items i USING (item_id) ORDER BY w.pos"""
            ).df()

    def holdout_set(self, fraction: float) -> pd.DataFrame:
        """The held-out gold items (item_id, doc, label), never queried nor trained on."""
        return self.query_df(
            f"""SELECT i.item_id, {DOC_SQL} AS doc, i.gold_label AS label FROM items i
            WHERE {holdout_sql(fraction)} ORDER BY i.item_id"""
        )

    def gold_labels(self, item_ids: Sequence[str]) -> dict[str, str | None]:
        frame = self.items(item_ids)
        return dict(zip(frame["item_id"], frame["gold_label"]))


    def _pool_where(self, holdout_fraction: float | None) -> str:
        """Items the loop may still ask about: unanswered, not in an open batch, not held out."""
        return (
            "i.item_id NOT IN (SELECT item_id FROM labels) "
            "AND i.item_id NOT IN (SELECT bi.item_id FROM batch_items bi "
            "JOIN batches b USING (batch_id) WHERE b.status = 'open') "
            f"AND NOT {holdout_sql(holdout_fraction)}"
        )

    def pool_size(self, holdout_fraction: float | None = None) -> int:
        return int(self.scalar(f"SELECT count(*) FROM items i WHERE {self._pool_where(holdout_fraction)}"))

    def unscored_chunks(self, model_version: int, chunk_size: int,
                        holdout_fraction: float | None = None) -> Iterator[pd.DataFrame]:
        """Pool items without a prediction from ``model_version``, ``chunk_size`` at a time.

        Keyset pagination on item_id: each chunk is its own short read, so the pool is
        never in memory at once and no connection is held between chunks.
        """
        after = ""
        while True:
            chunk = self.query_df(
                f"""SELECT i.item_id, {DOC_SQL} AS doc FROM items i
                WHERE {self._pool_where(holdout_fraction)} AND i.item_id > ?
                AND i.item_id NOT IN (SELECT item_id FROM predictions WHERE model_version = ?)
                ORDER BY i.item_id LIMIT ?""",
                [after, model_version, chunk_size],
            )
            if chunk.empty:
                return
            yield chunk
            after = chunk["item_id"].iloc[-1]

    def count_unscored(self, model_version: int, holdout_fraction: float | None = None) -> int:
        return int(self.scalar(
            f"""SELECT count(*) FROM items i WHERE {self._pool_where(holdout_fraction)}
            AND i.item_id NOT IN (SELECT item_id FROM predictions WHERE model_version = ?)""",
            [model_version],
        ))

    def write_predictions(self, frame: pd.DataFrame, model_version: int) -> None:
        """Store one chunk of predictions (item_id, label, proba, least_confidence, margin, entropy)."""
        rows = frame.assign(model_version=model_version, created_at=utcnow())
        with self.transaction() as con:
            con.register("incoming", rows)
            con.execute(
                """INSERT INTO predictions BY NAME
                SELECT item_id, model_version, label, proba::DOUBLE[] AS proba, least_confidence,
                       margin, entropy, created_at FROM incoming ON CONFLICT DO NOTHING"""
            )
            con.unregister("incoming")

    def pool_predictions(self, model_version: int, n_classes: int,
                         holdout_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every pool item scored by ``model_version``: (item_ids, proba (n, n_classes), labels).

        Ordered by item_id so that a strategy's picks are reproducible under a seed.
        """
        with self.connect() as con:
            relation = con.sql(
                f"""SELECT p.item_id, p.label, p.proba FROM predictions p
                JOIN items i USING (item_id)
                WHERE p.model_version = ? AND {self._pool_where(holdout_fraction)}
                ORDER BY p.item_id""",
                params=[model_version],
            )
            # DuckDB 2 names it to_arrow_table; 1.x returns a Table from arrow().
            table = relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()
        item_ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        labels = np.asarray(table.column("label").to_pylist(), dtype=object)
        flat = table.column("proba").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        proba = flat.reshape(len(item_ids), n_classes) if len(item_ids) else np.empty((0, n_classes))
        return item_ids, proba, labels

    def sample_pool(self, n: int, seed: int, holdout_fraction: float | None = None) -> pd.DataFrame:
        """A reproducible sample of up to ``n`` pool items (item_id, doc), ordered by item_id."""
        ids = self.query_df(
            f"SELECT i.item_id FROM items i WHERE {self._pool_where(holdout_fraction)} ORDER BY i.item_id"
        )["item_id"].to_numpy()
        if len(ids) > n:
            ids = np.sort(np.random.default_rng(seed).choice(ids, size=n, replace=False))
        frame = pd.DataFrame({"item_id": ids})
        with self.connect() as con:
            con.register("wanted", frame)
            return con.execute(
                f"SELECT i.item_id, {DOC_SQL} AS doc FROM wanted JOIN items i USING (item_id) ORDER BY i.item_id"
            ).df()
