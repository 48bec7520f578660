"""Embeddings: each item's vector under an embedding model, stored once (schema v12).

A vector is of the item's text as a model reads it (:data:`~alflow.tasks.store.pool.DOC_SQL`:
the title when it adds something, then the body), so a model's embedding step, which is
given texts, finds it by that text (:meth:`EmbeddingStore.vectors_of_docs`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa

from alflow.tasks.store.database import Database, utcnow
from alflow.tasks.store.pool import DOC_SQL, holdout_sql

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd


class EmbeddingStore(Database):
    """The ``embeddings`` table (mixed into :class:`alflow.tasks.store.Store`)."""

    def count_unembedded(self, embedding_model: str) -> int:
        """How many items have no vector of ``embedding_model``."""
        return int(self.scalar(
            "SELECT count(*) FROM items i WHERE i.item_id NOT IN "
            "(SELECT item_id FROM embeddings WHERE embedding_model = ?)", [embedding_model]))

    def count_unembedded_pool(self, embedding_model: str, holdout_fraction: float | None) -> tuple[int, int]:
        """(pool items, held-out items) with no vector of ``embedding_model``."""
        # _pool_where: PoolStore's rule of the pool, a sibling part of Store
        unembedded = ("i.item_id NOT IN (SELECT item_id FROM embeddings WHERE embedding_model = ?)")
        pool = self.scalar(f"SELECT count(*) FROM items i WHERE {self._pool_where(holdout_fraction)} "
                           f"AND {unembedded}", [embedding_model])
        held_out = self.scalar(f"SELECT count(*) FROM items i WHERE {holdout_sql(holdout_fraction)} "
                               f"AND {unembedded}", [embedding_model])
        return int(pool), int(held_out)

    def unembedded_items(self, embedding_model: str, limit: int) -> pd.DataFrame:
        """Up to ``limit`` items with no vector of ``embedding_model``: (item_id, doc), by
        item_id. Read and closed at once: nothing holds the file while the endpoint embeds."""
        return self.query_df(
            f"""SELECT i.item_id, {DOC_SQL} AS doc FROM items i
            WHERE i.item_id NOT IN (SELECT item_id FROM embeddings WHERE embedding_model = ?)
            ORDER BY i.item_id LIMIT {int(limit)}""",
            [embedding_model])

    def write_embeddings(self, item_ids: Sequence[str], embedding_model: str, vectors: np.ndarray) -> int:
        """Store ``vectors`` (n, d) of ``item_ids`` (n,) in one transaction; an item that has
        one of this model already keeps it. Returns the rows written."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(item_ids) != vectors.shape[0]:
            raise ValueError(f"{len(item_ids)} item ids for {vectors.shape[0]} vectors")
        if not len(item_ids):
            return 0
        rows = pa.table({
            "item_id": pa.array(list(item_ids), pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
        })
        with self.transaction() as con:
            con.register("incoming", rows)
            return int(con.execute(
                """INSERT INTO embeddings BY NAME
                SELECT item_id, ? AS embedding_model, vector::FLOAT[] AS vector, ?::TIMESTAMP AS created_at
                FROM incoming ON CONFLICT DO NOTHING""",
                [embedding_model, utcnow()]).fetchone()[0])

    def vectors_of_docs(self, docs: Sequence[str], embedding_model: str) -> tuple[np.ndarray, np.ndarray]:
        """The stored vectors of ``embedding_model`` of the items whose text is each of
        ``docs``: (positions (m,) into ``docs`` that have one, vectors (m, d) float32).
        Items with the same text have the same vector: any one serves (picked here, not by a
        GROUP BY in DuckDB, which costs twice the join with 768-dimension vectors)."""
        wanted = pa.table({"pos": pa.array(np.arange(len(docs), dtype=np.int64)),
                           "doc": pa.array(list(docs), pa.string())})
        with self.connect() as con:
            con.register("wanted", wanted)
            table = con.sql(
                f"""SELECT w.pos, e.vector FROM wanted w
                JOIN items i ON {DOC_SQL} = w.doc
                JOIN embeddings e ON e.item_id = i.item_id AND e.embedding_model = ?""",
                params=[embedding_model]).to_arrow_table()
        return _positions_and_vectors(table)

    def items_of_docs(self, docs: Sequence[str]) -> pd.DataFrame:
        """(pos, item_id, doc): one stored item whose text is ``docs[pos]``, for each doc
        that is an item's text."""
        wanted = pa.table({"pos": pa.array(np.arange(len(docs), dtype=np.int64)),
                           "doc": pa.array(list(docs), pa.string())})
        with self.connect() as con:
            con.register("wanted", wanted)
            return con.execute(
                f"""SELECT w.pos, min(i.item_id) AS item_id, any_value(w.doc) AS doc FROM wanted w
                JOIN items i ON {DOC_SQL} = w.doc GROUP BY w.pos ORDER BY w.pos""").df()


def _positions_and_vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(positions (m,) ascending, each once; their vectors (m, d) float32) of rows (pos, vector)."""
    positions = table.column("pos").to_numpy().astype(np.int64)
    if not len(positions):
        return positions, np.empty((0, 0), dtype=np.float32)
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = flat.astype(np.float32, copy=False).reshape(len(positions), -1)
    unique, first = np.unique(positions, return_index=True)
    return unique, vectors[first]
