"""The DuckDB store: every table alflow reads or writes, and the only code that writes them.

One module per concern, each a part of :class:`Store`:

* :mod:`~alflow.tasks.store.database`: connections, the lock retry, transactions, and the
  schema migrations (``migrations/NNNN_*.sql``);
* :mod:`~alflow.tasks.store.pool`: items, the gold holdout, predictions, the pool;
* :mod:`~alflow.tasks.store.cursors`: each source's cursor (what it has already delivered);
* :mod:`~alflow.tasks.store.scans`: a file's records read by DuckDB's own reader, written in
  one transaction;
* :mod:`~alflow.tasks.store.batches`: queried batches and their items;
* :mod:`~alflow.tasks.store.labels`: the append-only answers and effective labels;
* :mod:`~alflow.tasks.store.models`: model versions and cycles (the learning curve);
* :mod:`~alflow.tasks.store.locks`: named locks across transactions (one cycle at a time);
* :mod:`~alflow.tasks.store.quality`: label flags, the control slice, the stop set, and
  each cycle's quality figures and stopping rules;
* :mod:`~alflow.tasks.store.llm`: the LLM's lineages, cached answers and usage;
* :mod:`~alflow.tasks.store.embeddings`: each item's vector per embedding model, stored once.
"""

from __future__ import annotations

from alflow.config import SKIP
from alflow.tasks.store.batches import BATCH_STATUSES, BatchStore, owner_gone, process_owner
from alflow.tasks.store.cursors import CursorStore
from alflow.tasks.store.database import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Database,
    StoreError,
    StoreLockedError,
    utcnow,
)
from alflow.tasks.store.embeddings import EmbeddingStore
from alflow.tasks.store.labels import ORIGINS, Answer, BatchClosedError, LabelStore, LabelWrite
from alflow.tasks.store.llm import LLMStore
from alflow.tasks.store.locks import LockHeldError, LockStore, describe_holder
from alflow.tasks.store.models import ModelStore, TaskMismatchError
from alflow.tasks.store.pool import DOC_SQL, PoolStore, document, holdout_sql, title_adds
from alflow.tasks.store.quality import CONTROL, RECHECK, QualityStore
from alflow.tasks.store.scans import ScanRefused, ScanStore, StagedScan


class Store(ScanStore, CursorStore, PoolStore, LabelStore, ModelStore, LockStore, QualityStore, LLMStore,
            EmbeddingStore):
    """The alflow database at ``path``. Cheap to create; holds no connection between calls.

    See :class:`~alflow.tasks.store.database.Database` for ``path`` and ``lock_timeout``.
    """

    def counts(self, holdout_fraction: float | None = None) -> dict:
        with self.connect() as con:
            def one(sql: str) -> int:
                return int(con.execute(sql).fetchone()[0])

            return {
                "items": one("SELECT count(*) FROM items"),
                # answered = labeled (of which adjudicated: a decision holds) + tied + skipped
                "answered": one("SELECT count(DISTINCT item_id) FROM labels"),
                "labeled": one("SELECT count(*) FROM effective_labels"),
                "adjudicated": one("SELECT count(*) FROM decisions"),
                "tied": one(
                    "SELECT count(DISTINCT item_id) FROM votes WHERE label <> 'skip' "
                    "AND item_id NOT IN (SELECT item_id FROM effective_labels)"
                ),
                "skipped": one(
                    "SELECT count(DISTINCT item_id) FROM labels WHERE item_id NOT IN (SELECT item_id FROM effective_labels) "
                    "AND item_id NOT IN (SELECT item_id FROM votes WHERE label <> 'skip')"
                ),
                "label_rows": one("SELECT count(*) FROM labels"),
                "holdout": one(f"SELECT count(*) FROM items i WHERE {holdout_sql(holdout_fraction)}"),
                "pool": one(f"SELECT count(*) FROM items i WHERE {self._pool_where(holdout_fraction)}"),
                "open_batches": one("SELECT count(*) FROM batches WHERE status = 'open'"),
                "models": one("SELECT count(*) FROM models"),
                "cycles": one("SELECT count(*) FROM cycles"),
            }


__all__ = [
    "BATCH_STATUSES",
    "CONTROL",
    "DOC_SQL",
    "MIGRATIONS",
    "ORIGINS",
    "SCHEMA_VERSION",
    "SKIP",
    "Answer",
    "BatchClosedError",
    "BatchStore",
    "Database",
    "EmbeddingStore",
    "LabelStore",
    "LabelWrite",
    "LLMStore",
    "LockHeldError",
    "LockStore",
    "ModelStore",
    "PoolStore",
    "QualityStore",
    "RECHECK",
    "ScanRefused",
    "ScanStore",
    "StagedScan",
    "Store",
    "StoreError",
    "StoreLockedError",
    "TaskMismatchError",
    "describe_holder",
    "document",
    "holdout_sql",
    "owner_gone",
    "process_owner",
    "title_adds",
    "utcnow",
]
