"""The pool: items as sources gave them, the gold holdout, and the models' predictions.

An item is in the **pool** while the loop may still ask about it: no answer recorded, not in
an open batch, not held out for evaluation. Reads page through it (keyset on item_id), so
the whole pool is never in memory at once.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Iterator, Sequence

import duckdb
import numpy as np
import pyarrow as pa

from alflow.tasks.faults import fault_point
from alflow.tasks.store.database import Database, utcnow

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd

# The text a model sees: the title when it adds something, then the body. The same rule as
# :func:`document`, in SQL over ``items i``.
DOC_SQL = (
    "CASE WHEN i.title IS NULL OR i.title = '' OR starts_with(i.text, i.title) "
    "THEN i.text ELSE i.title || E'\\n' || i.text END"
)


# How each stored uncertainty measure sorts, most uncertain first (margin: small is unsure).
UNCERTAINTY_ORDER = {"least_confidence": "DESC", "margin": "ASC", "entropy": "DESC"}


def sample_order_sql(seed: int, alias: str = "i", draw: int | str | None = None) -> str:
    """An ORDER BY key that shuffles rows by a seeded hash of item_id: ``ORDER BY key LIMIT
    n`` is a uniform sample of n rows, the same for the same seed and rows whatever order
    DuckDB's threads scan them in (``USING SAMPLE ... REPEATABLE`` is repeatable only
    single-threaded). A top-N in DuckDB: only the n rows leave the database. The seed is
    salted into the hashed string: ``hash(item_id, seed)`` orders nearly alike for nearby seeds.
    ``draw`` (an int, or a name from code) gives an independent shuffle for the same seed."""
    if draw is not None and not (isinstance(draw, int) or str(draw).isidentifier()):
        raise ValueError(f"draw must be an int or a name, got {draw!r}")
    salt = f"{int(seed)}:" if draw is None else f"{int(seed)}:{draw}:"
    return f"hash('{salt}' || {alias}.item_id), {alias}.item_id"


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


# Per database file (resolved path) in this process: the embedding model whose vectors the
# reads that feed a model require, while the endpoint cannot embed the rest (set and cleared
# by alflow.tasks.embeddings, process-wide like the model's vector sources: a cycle's tasks
# each open their own Store).
_EMBEDDED_ONLY: dict[str, str] = {}


class PoolStore(Database):
    """Items, the holdout and predictions (mixed into :class:`alflow.tasks.store.Store`)."""

    def read_embedded_only(self, embedding_model: str | None) -> None:
        """From now on, in this process, the reads a model scores (:meth:`unscored_chunks`,
        :meth:`count_unscored`, :meth:`sample_pool`, the holdout's, the control draw, the stop
        set) leave out items with no vector of ``embedding_model``; None: they read every item."""
        key = str(self.path.resolve())
        if embedding_model is None:
            _EMBEDDED_ONLY.pop(key, None)
        else:
            _EMBEDDED_ONLY[key] = embedding_model

    def embedded_only(self) -> str | None:
        """The embedding model :meth:`read_embedded_only` set for this file, or None."""
        return _EMBEDDED_ONLY.get(str(self.path.resolve()))

    def _embedded_sql(self, alias: str = "i") -> str:
        """``AND`` the item has a vector of :meth:`embedded_only`'s model; "" when unset."""
        model = self.embedded_only()
        if model is None:
            return ""
        quoted = model.replace("'", "''")
        return (f" AND {alias}.item_id IN (SELECT item_id FROM embeddings "
                f"WHERE embedding_model = '{quoted}')")

    def upsert_items(self, items: pd.DataFrame | pa.Table, ingest_run: str) -> tuple[int, int]:
        """Insert items not stored yet (by item_id) in one transaction.

        ``items`` (a DataFrame or an Arrow table) has columns item_id, source, external_id,
        url, title, text, gold_label, meta (a JSON string). Returns (new, duplicate) counts;
        duplicates within ``items`` count as duplicates too (the first copy is the one kept).
        """
        if len(items) == 0:
            return 0, 0
        with self.transaction() as con:
            return self._insert_items(con, items, ingest_run)

    @staticmethod
    def _insert_items(con: duckdb.DuckDBPyConnection, items: pd.DataFrame | pa.Table,
                      ingest_run: str) -> tuple[int, int]:
        """:meth:`upsert_items` inside the caller's transaction."""
        if len(items) == 0:
            return 0, 0
        table = items if isinstance(items, pa.Table) else pa.Table.from_pandas(items, preserve_index=False)
        first: dict[str, int] = {}
        for position, item_id in enumerate(table.column("item_id").to_pylist()):
            first.setdefault(item_id, position)
        if len(first) < len(table):
            table = table.take(list(first.values()))
        con.register("incoming", table)
        # An anti-join on the content hash: a hash join over the chunk, cheaper than a
        # per-row primary-key conflict check (which stays as the safety net).
        new = con.execute(
            """INSERT INTO items BY NAME
            SELECT item_id, source, external_id, url, title, text, gold_label,
                   meta::JSON AS meta, ?::TIMESTAMP AS fetched_at, ? AS ingest_run
            FROM incoming ANTI JOIN items USING (item_id)""",
            [utcnow(), ingest_run],
        ).fetchone()[0]
        con.unregister("incoming")
        return int(new), len(items) - int(new)

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
        import pandas as pd

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

    def holdout_labels(self, fraction: float, labels: Sequence[str]) -> pd.DataFrame:
        """The held-out gold items whose gold label is one of ``labels``: (item_id, label),
        ordered by item_id. No texts: a model's holdout metrics need only its predictions.
        Read as Arrow (a fifth of the holdout at 1M items: ~190k rows), whose strings become
        the frame's columns without a Python object per value."""
        with self.connect() as con:
            return con.sql(
                f"""SELECT i.item_id, i.gold_label AS label FROM items i
                WHERE {holdout_sql(fraction)} AND list_contains(?, i.gold_label) {self._embedded_sql()}
                ORDER BY i.item_id""",
                params=[list(labels)],
            ).to_arrow_table().to_pandas()

    def holdout_chunks(self, fraction: float, labels: Sequence[str], chunk_size: int,
                       unpredicted_by: int | None = None) -> Iterator[pa.RecordBatch]:
        """The texts of the items :meth:`holdout_labels` lists: Arrow record batches of at
        most ``chunk_size`` rows (item_id, doc), in no particular order; with
        ``unpredicted_by``, only those that model version has no stored holdout prediction
        of (``holdout_predictions``). One streaming read, like :meth:`unscored_chunks`."""
        unpredicted = ("" if unpredicted_by is None else
                       f"AND i.item_id NOT IN (SELECT item_id FROM holdout_predictions "
                       f"WHERE model_version = {int(unpredicted_by)})")
        with self.connect() as con:
            reader = con.sql(
                f"""SELECT i.item_id, {DOC_SQL} AS doc FROM items i
                WHERE {holdout_sql(fraction)} AND list_contains(?, i.gold_label) {unpredicted}
                {self._embedded_sql()}""",
                params=[list(labels)],
            ).to_arrow_reader(chunk_size)
            for batch in reader:
                if batch.num_rows:
                    yield batch

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
                        holdout_fraction: float | None = None) -> Iterator[pa.RecordBatch]:
        """Pool items without a prediction from ``model_version``: Arrow record batches of
        at most ``chunk_size`` rows (columns item_id, doc), in no particular order.

        One streaming read: DuckDB hands over a batch at a time, so the pool is never in
        Python's memory at once. The read sees the pool as it was when it started (its own
        snapshot), so predictions written meanwhile, by other connections, do not disturb it.
        """
        with self.connect() as con:
            reader = con.sql(
                f"""SELECT i.item_id, {DOC_SQL} AS doc FROM items i
                WHERE {self._pool_where(holdout_fraction)} {self._embedded_sql()}
                AND i.item_id NOT IN (SELECT item_id FROM predictions WHERE model_version = {int(model_version)})"""
            ).to_arrow_reader(chunk_size)
            for batch in reader:
                if batch.num_rows:
                    yield batch

    def count_unscored(self, model_version: int, holdout_fraction: float | None = None) -> int:
        return int(self.scalar(
            f"""SELECT count(*) FROM items i WHERE {self._pool_where(holdout_fraction)} {self._embedded_sql()}
            AND i.item_id NOT IN (SELECT item_id FROM predictions WHERE model_version = ?)""",
            [model_version],
        ))

    def write_predictions(self, frame: pd.DataFrame | pa.Table, model_version: int) -> int:
        """Store predictions (item_id, label, proba, least_confidence, margin, entropy) in one
        transaction: one bulk ``INSERT ... SELECT`` from the registered table, never a row at
        a time. ``proba`` is a list of floats per row (an Arrow list or fixed-size list
        column, or Python lists). Rows already stored for this version are left as they are.
        Returns how many rows were written."""
        insert = """INSERT INTO predictions BY NAME
            SELECT item_id, ?::INTEGER AS model_version, label, proba::DOUBLE[] AS proba,
                   least_confidence, margin, entropy, ?::TIMESTAMP AS created_at FROM incoming"""
        try:
            # Pre-label sends only unscored items: without ON CONFLICT the append is about
            # a third cheaper, and the primary key still refuses a row stored meanwhile.
            return self._append(frame, insert, [model_version, utcnow()])
        except duckdb.ConstraintException:
            return self._append(frame, insert + " ON CONFLICT DO NOTHING", [model_version, utcnow()])

    def _append(self, frame: pd.DataFrame | pa.Table, sql: str, params: list) -> int:
        # No unregister: the view goes with the connection, and after a failed statement
        # DuckDB would refuse it (the transaction is aborted) and hide the real error.
        with self.transaction() as con:
            con.register("incoming", frame)
            written = int(con.execute(sql, params).fetchone()[0])
            fault_point("prelabel-mid-write")  # inserted, not committed: the rows come all or none
            return written

    def pool_predictions(self, model_version: int, n_classes: int,
                         holdout_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For EVERY pool item scored by ``model_version``: (item_ids, proba (n, n_classes),
        labels), ordered by item_id. Memory grows with the pool: the query step reads only
        :meth:`top_predictions` and :meth:`sample_predictions`; this is for small pools and tests.
        """
        return self._predictions_of(
            f"""SELECT p.item_id, p.label, p.proba FROM predictions p JOIN items i USING (item_id)
            WHERE p.model_version = ? AND {self._pool_where(holdout_fraction)} ORDER BY p.item_id""",
            [model_version], n_classes)

    def top_predictions(self, model_version: int, n_classes: int, by: str, limit: int,
                        holdout_fraction: float | None = None,
                        per_label: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``limit`` pool items ``model_version`` is least sure of by the stored measure
        ``by`` (least_confidence, margin or entropy), most uncertain first, ties by item_id:
        (item_ids (m,), proba (m, n_classes), labels (m,)), m <= limit.

        ``ORDER BY ... LIMIT`` in DuckDB (a top-N, no full sort): only these m rows reach
        Python. ``per_label``: ``limit`` items per predicted label instead of in all.
        """
        if by not in UNCERTAINTY_ORDER:
            raise ValueError(f"by must be one of {sorted(UNCERTAINTY_ORDER)}, got {by!r}")
        order = f"p.{by} {UNCERTAINTY_ORDER[by]}, p.item_id"
        cut = (f"QUALIFY row_number() OVER (PARTITION BY p.label ORDER BY {order}) <= {int(limit)}"
               if per_label else "")
        return self._predictions_of(
            f"""SELECT p.item_id, p.label, p.proba FROM predictions p JOIN items i USING (item_id)
            WHERE p.model_version = ? AND {self._pool_where(holdout_fraction)}
            {cut} ORDER BY {order} {'' if per_label else f'LIMIT {int(limit)}'}""",
            [model_version], n_classes)

    def sample_predictions(self, model_version: int, n_classes: int, n: int, seed: int,
                           holdout_fraction: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A uniform sample of up to ``n`` pool items scored by ``model_version``, the same
        for the same seed and pool (see :func:`sample_order_sql`), ordered by item_id:
        (item_ids, proba (n, n_classes), labels)."""
        return self._predictions_of(
            f"""SELECT * FROM (SELECT p.item_id, p.label, p.proba FROM predictions p JOIN items i USING (item_id)
            WHERE p.model_version = ? AND {self._pool_where(holdout_fraction)}
            ORDER BY {sample_order_sql(seed, 'p')} LIMIT {int(n)}) ORDER BY item_id""",
            [model_version], n_classes)

    def _predictions_of(self, sql: str, params: list, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self.connect() as con:
            table = con.sql(sql, params=params).to_arrow_table()
        item_ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        labels = np.asarray(table.column("label").to_pylist(), dtype=object)
        flat = table.column("proba").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        proba = flat.reshape(len(item_ids), n_classes) if len(item_ids) else np.empty((0, n_classes))
        return item_ids, proba, labels

    def sample_pool(self, n: int, seed: int, holdout_fraction: float | None = None) -> pd.DataFrame:
        """A uniform sample of up to ``n`` pool items (item_id, doc), the same for the same
        seed and pool (see :func:`sample_order_sql`), ordered by item_id. Drawn in DuckDB:
        only the sample reaches Python, and its texts are built for the sample alone."""
        return self.query_df(
            f"""SELECT i.item_id, {DOC_SQL} AS doc FROM items i WHERE i.item_id IN (
                SELECT i.item_id FROM items i WHERE {self._pool_where(holdout_fraction)} {self._embedded_sql()}
                ORDER BY {sample_order_sql(seed)} LIMIT {int(n)})
            ORDER BY i.item_id"""
        )
