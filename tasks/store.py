"""The DuckDB store: every table alflow reads or writes, and the only code that writes them.

Rules this module keeps:

* A connection is opened per operation and closed at its end, so a paused flow (or an idle
  `alflow label`) holds no lock and another process can write.
* DuckDB lets one process hold a database file; another process meeting the lock retries
  with backoff for ``lock_timeout`` seconds, then fails with a message naming the holder.
* Writes that belong together run in one transaction; an error rolls all of them back.
* ``labels`` is append-only: nothing here updates or deletes a label. A correction is a new
  row; the effective label is derived (latest answer per annotator, then majority).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import duckdb
import numpy as np
import pandas as pd

SKIP = "skip"
ORIGINS = ("ui", "cli", "import", "simulated")
BATCH_STATUSES = ("open", "labeled", "expired")

# The text a model sees: the title when it adds something, then the body.
DOC_SQL = (
    "CASE WHEN i.title IS NULL OR i.title = '' OR starts_with(i.text, i.title) "
    "THEN i.text ELSE i.title || E'\\n' || i.text END"
)


class StoreError(RuntimeError):
    """A store operation could not be done; the message says which and why."""


class StoreLockedError(StoreError):
    """Another process held the database file for longer than the lock timeout."""


def utcnow() -> datetime:
    """Naive UTC timestamp: every time column in the store is UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


# Each entry migrates the schema from version N-1 to N. Append, never edit a shipped one.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE items (
            item_id     VARCHAR PRIMARY KEY,      -- sha256 of the normalised title and text
            source      VARCHAR NOT NULL,          -- the configured source name
            external_id VARCHAR,                   -- the id the source gave it, if any
            url         VARCHAR,
            title       VARCHAR,
            text        VARCHAR NOT NULL,
            gold_label  VARCHAR,                   -- a label shipped with the data, if any
            meta        JSON,
            fetched_at  TIMESTAMP NOT NULL,
            ingest_run  VARCHAR                    -- ingest_id in ingests
        )""",
        """CREATE TABLE ingests (
            ingest_id   VARCHAR NOT NULL,
            source      VARCHAR NOT NULL,
            flow_run_id VARCHAR,
            started_at  TIMESTAMP NOT NULL,
            finished_at TIMESTAMP NOT NULL,
            n_read      INTEGER NOT NULL,
            n_new       INTEGER NOT NULL,
            n_duplicate INTEGER NOT NULL,
            n_bad       INTEGER NOT NULL,
            bad_reasons JSON,
            PRIMARY KEY (ingest_id, source)
        )""",
        """CREATE TABLE predictions (
            item_id          VARCHAR NOT NULL,
            model_version    INTEGER NOT NULL,
            label            VARCHAR NOT NULL,
            proba            DOUBLE[] NOT NULL,    -- in the order of the configured labels
            least_confidence DOUBLE NOT NULL,
            margin           DOUBLE NOT NULL,      -- p(top1) - p(top2): small is uncertain
            entropy          DOUBLE NOT NULL,
            created_at       TIMESTAMP NOT NULL,
            PRIMARY KEY (item_id, model_version)
        )""",
        """CREATE TABLE batches (
            batch_id      VARCHAR PRIMARY KEY,
            flow_run_id   VARCHAR,
            strategy      VARCHAR NOT NULL,
            model_version INTEGER,                 -- NULL: cold start, no model yet
            size          INTEGER NOT NULL,
            status        VARCHAR NOT NULL CHECK (status IN ('open', 'labeled', 'expired')),
            owner         VARCHAR,                 -- host:pid of the process waiting on it
            created_at    TIMESTAMP NOT NULL,
            closed_at     TIMESTAMP
        )""",
        """CREATE TABLE batch_items (
            batch_id   VARCHAR NOT NULL,
            item_id    VARCHAR NOT NULL,
            rank       INTEGER NOT NULL,           -- 1 = asked first
            score      DOUBLE,
            prelabel   VARCHAR,                    -- NULL on a cold start
            confidence DOUBLE,                     -- p(prelabel)
            picked_by  VARCHAR NOT NULL,           -- uncertainty, exploration, coverage, random
            PRIMARY KEY (batch_id, item_id)
        )""",
        "CREATE SEQUENCE label_id_seq START 1",
        """CREATE TABLE labels (
            label_id    BIGINT PRIMARY KEY DEFAULT nextval('label_id_seq'),
            item_id     VARCHAR NOT NULL,
            label       VARCHAR NOT NULL,          -- a class name, or 'skip'
            annotator   VARCHAR NOT NULL,
            origin      VARCHAR NOT NULL CHECK (origin IN ('ui', 'cli', 'import', 'simulated')),
            batch_id    VARCHAR,                   -- NULL when labeled outside a batch
            flow_run_id VARCHAR,
            created_at  TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE models (
            model_version   INTEGER PRIMARY KEY,
            path            VARCHAR NOT NULL,
            classifier      VARCHAR NOT NULL,
            params          JSON NOT NULL,
            n_labels        INTEGER NOT NULL,
            label_watermark BIGINT NOT NULL,       -- trained on labels with label_id <= this
            metrics         JSON,
            promoted        BOOLEAN NOT NULL,
            flow_run_id     VARCHAR,
            created_at      TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE cycles (
            cycle         INTEGER PRIMARY KEY,
            flow_run_id   VARCHAR,
            batch_id      VARCHAR,
            model_version INTEGER,
            strategy      VARCHAR NOT NULL,
            n_labels      INTEGER NOT NULL,
            accuracy      DOUBLE,
            macro_f1      DOUBLE,
            metrics       JSON,
            promoted      BOOLEAN NOT NULL,
            created_at    TIMESTAMP NOT NULL
        )""",
        # Latest non-skip answer per (item, annotator), then the majority across annotators;
        # a tie has no effective label until someone breaks it.
        """CREATE VIEW effective_labels AS
        WITH latest AS (
            SELECT item_id, annotator, arg_max(label, label_id) AS label, max(label_id) AS label_id
            FROM labels WHERE label <> 'skip' GROUP BY item_id, annotator
        ), votes AS (
            SELECT item_id, label, count(*) AS votes, max(label_id) AS label_id
            FROM latest GROUP BY item_id, label
        ), ranked AS (
            SELECT *, max(votes) OVER (PARTITION BY item_id) AS top,
                   count(*) OVER (PARTITION BY item_id, votes) AS ties
            FROM votes
        )
        SELECT item_id, label, votes, label_id FROM ranked WHERE votes = top AND ties = 1""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class LabelWrite:
    """What a label write did. ``kept`` answers were already given in this batch and stay."""

    new: int = 0
    duplicates: int = 0
    corrections: int = 0
    kept: int = 0
    kept_items: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.new} new"]
        if self.corrections:
            parts.append(f"{self.corrections} corrections")
        if self.duplicates:
            parts.append(f"{self.duplicates} already recorded")
        if self.kept:
            parts.append(f"{self.kept} already answered in this batch (kept)")
        return ", ".join(parts)


@dataclass(frozen=True)
class Answer:
    """One reviewer's answer for one item: a class name or 'skip'."""

    item_id: str
    label: str


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


def _holder(message: str) -> str:
    match = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    return f"PID {match.group(2)} ({match.group(1)})" if match else "another process"


def holdout_sql(fraction: float | None, alias: str = "i") -> str:
    """SQL that is TRUE for the held-out gold items: a stable function of the content hash."""
    if not fraction:
        return "FALSE"
    # item_id is a hex sha256, so its first 32 bits are uniform on [0, 2**32).
    return (
        f"({alias}.gold_label IS NOT NULL AND "
        f"(('0x' || substr({alias}.item_id, 1, 8))::UBIGINT / 4294967296.0) < {float(fraction)!r})"
    )


class Store:
    """The alflow database at ``path``. Cheap to create; holds no connection between calls.

    Parameters
    ----------
    path : str or Path
        The DuckDB file; its folder is created if missing.
    lock_timeout : float
        Seconds to keep retrying while another process holds the file.
    """

    def __init__(self, path: str | Path, lock_timeout: float = 30.0):
        self.path = Path(path)
        self.lock_timeout = float(lock_timeout)

    # -- connections -------------------------------------------------------------------
    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for one operation, closed on exit (the file lock goes with it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path))
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise StoreError(f"{self.path}: cannot open database: {exc}") from None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreLockedError(
                        f"{self.path} is locked by {_holder(str(exc))} for more than "
                        f"{self.lock_timeout:g} s; stop that process or raise "
                        "store.lock_timeout_seconds"
                    ) from None
                # Never sleep past the deadline, and try once more at it.
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One connection, one transaction: committed on success, rolled back on any error."""
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def query_df(self, sql: str, params: Sequence | dict | None = None) -> pd.DataFrame:
        with self.connect() as con:
            return con.execute(sql, params or []).df()

    def scalar(self, sql: str, params: Sequence | dict | None = None):
        with self.connect() as con:
            row = con.execute(sql, params or []).fetchone()
        return row[0] if row else None

    # -- schema ------------------------------------------------------------------------
    def schema_version(self, con: duckdb.DuckDBPyConnection) -> int:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchone()[0]
        if not exists:
            return 0
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

    def migrate(self) -> int:
        """Bring the schema to this code's version, one transaction per step. Returns it."""
        with self.transaction() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)"
            )
        with self.connect() as con:
            current = self.schema_version(con)
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema v{current}, newer than this alflow (v{SCHEMA_VERSION}); upgrade alflow"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.transaction() as con:
                for statement in MIGRATIONS[version - 1]:
                    con.execute(statement)
                con.execute("INSERT INTO schema_version VALUES (?, ?)", [version, utcnow()])
        return SCHEMA_VERSION

    # -- items -------------------------------------------------------------------------
    def upsert_items(self, items: pd.DataFrame, ingest_run: str) -> tuple[int, int]:
        """Insert items not stored yet (by item_id) in one transaction.

        ``items`` has columns item_id, source, external_id, url, title, text, gold_label,
        meta (a JSON string). Returns (new, duplicate) counts; duplicates within ``items``
        count as duplicates too.
        """
        if items.empty:
            return 0, 0
        unique = items.drop_duplicates("item_id")
        in_batch_dups = len(items) - len(unique)
        frame = unique.assign(fetched_at=utcnow(), ingest_run=ingest_run)
        with self.transaction() as con:
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

    # -- pool and predictions ----------------------------------------------------------
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

    # -- batches -----------------------------------------------------------------------
    def create_batch(self, flow_run_id: str | None, strategy: str, model_version: int | None,
                     picks: pd.DataFrame) -> str:
        """Record a queried batch and its items in one transaction; returns the batch_id.

        ``picks`` has columns item_id, rank, score, prelabel, confidence, picked_by.
        """
        batch_id = uuid.uuid4().hex[:12]
        rows = picks.assign(batch_id=batch_id)
        with self.transaction() as con:
            con.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, 'open', ?, ?, NULL)",
                [batch_id, flow_run_id, strategy, model_version, len(picks), process_owner(), utcnow()],
            )
            con.register("incoming", rows)
            con.execute(
                """INSERT INTO batch_items BY NAME SELECT batch_id, item_id, rank, score,
                prelabel, confidence, picked_by FROM incoming"""
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
        ``answered_by`` who gave it; both are NULL while the item waits.
        """
        return self.query_df(
            """SELECT bi.rank, bi.item_id, bi.score, bi.prelabel, bi.confidence, bi.picked_by,
                      i.source, i.title, i.text, i.url, i.external_id,
                      l.label AS answer, l.annotator AS answered_by
            FROM batch_items bi JOIN items i USING (item_id)
            LEFT JOIN (
                SELECT item_id, arg_max(label, label_id) AS label, arg_max(annotator, label_id) AS annotator
                FROM labels WHERE batch_id = ? GROUP BY item_id
            ) l USING (item_id)
            WHERE bi.batch_id = ? ORDER BY bi.rank""",
            [batch_id, batch_id],
        )

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

    # -- labels ------------------------------------------------------------------------
    def record_labels(self, answers: Iterable[Answer], *, annotator: str, origin: str,
                      batch_id: str | None = None, flow_run_id: str | None = None,
                      keep_batch_answers: bool = False, close_batch: str | None = None) -> LabelWrite:
        """Append answers to ``labels`` in one transaction; nothing is overwritten.

        * The same answer again from the same annotator in the same batch is a duplicate
          and is not written twice (re-importing a file is harmless).
        * A different answer from the same annotator is a correction: a new row, the
          latest of which is that annotator's answer.
        * ``keep_batch_answers`` (the Resume form, whose fields default to the pre-labels):
          items already answered in this batch, by anyone, keep that answer and the form's
          value for them is not recorded.
        * ``close_batch``: also set the batch's status (e.g. 'labeled') in the same
          transaction, so a batch is never closed without its answers or vice versa.
        """
        if origin not in ORIGINS:
            raise StoreError(f"label origin must be one of {ORIGINS}, not {origin!r}")
        answers = list(answers)
        result = LabelWrite()
        if close_batch is not None and batch_id is None:
            raise StoreError("close_batch needs a batch_id")
        if not answers:
            if close_batch:
                self.close_batch(batch_id, close_batch)
            return result
        frame = pd.DataFrame({"item_id": [a.item_id for a in answers], "label": [a.label for a in answers]})
        if frame["item_id"].duplicated().any():
            dup = frame.loc[frame["item_id"].duplicated(), "item_id"].iloc[0]
            raise StoreError(f"item {dup} is answered twice in one write")
        now = utcnow()
        with self.transaction() as con:
            con.register("incoming", frame)
            missing = con.execute(
                "SELECT item_id FROM incoming WHERE item_id NOT IN (SELECT item_id FROM items) LIMIT 1"
            ).fetchone()
            if missing:
                raise StoreError(f"item {missing[0]} is not in the store")
            previous = con.execute(
                """SELECT n.item_id,
                    (SELECT arg_max(l.label, l.label_id) FROM labels l WHERE l.item_id = n.item_id
                       AND l.annotator = ? AND l.batch_id IS NOT DISTINCT FROM ?) AS own,
                    (SELECT count(*) FROM labels l WHERE l.item_id = n.item_id
                       AND l.batch_id IS NOT DISTINCT FROM ?) AS in_batch
                FROM incoming n""",
                [annotator, batch_id, batch_id],
            ).df().set_index("item_id")
            rows = []
            for answer in answers:
                own, in_batch = previous.loc[answer.item_id, ["own", "in_batch"]]
                if keep_batch_answers and batch_id is not None and in_batch:
                    if own == answer.label:
                        result.duplicates += 1
                    else:
                        result.kept += 1
                        result.kept_items.append(answer.item_id)
                    continue
                if isinstance(own, str):
                    if own == answer.label:
                        result.duplicates += 1
                        continue
                    result.corrections += 1
                else:
                    result.new += 1
                rows.append((answer.item_id, answer.label, annotator, origin, batch_id, flow_run_id, now))
            if rows:
                con.executemany(
                    """INSERT INTO labels (item_id, label, annotator, origin, batch_id, flow_run_id, created_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?)""",
                    rows,
                )
            if close_batch:
                self._close_batch(con, batch_id, close_batch)
            con.unregister("incoming")
        return result

    def labels(self) -> pd.DataFrame:
        """Every label row, oldest first (the append-only history)."""
        return self.query_df("SELECT * FROM labels ORDER BY label_id")

    def training_set(self, holdout_fraction: float | None = None) -> tuple[pd.DataFrame, int]:
        """Effective labels joined to item text: (frame[item_id, doc, label], label_watermark).

        The watermark is the highest label_id the set was derived from, so a model row can
        say exactly which labels trained it.
        """
        with self.connect() as con:
            watermark = con.execute("SELECT coalesce(max(label_id), 0) FROM labels").fetchone()[0]
            frame = con.execute(
                f"""SELECT e.item_id, {DOC_SQL} AS doc, e.label FROM effective_labels e
                JOIN items i USING (item_id) WHERE NOT {holdout_sql(holdout_fraction)}
                ORDER BY e.item_id"""
            ).df()
        return frame, int(watermark)

    def holdout_set(self, fraction: float) -> pd.DataFrame:
        """The held-out gold items (item_id, doc, label), never queried nor trained on."""
        return self.query_df(
            f"""SELECT i.item_id, {DOC_SQL} AS doc, i.gold_label AS label FROM items i
            WHERE {holdout_sql(fraction)} ORDER BY i.item_id"""
        )

    def gold_labels(self, item_ids: Sequence[str]) -> dict[str, str | None]:
        frame = self.items(item_ids)
        return dict(zip(frame["item_id"], frame["gold_label"]))

    # -- models and cycles -------------------------------------------------------------
    def next_model_version(self) -> int:
        return int(self.scalar("SELECT coalesce(max(model_version), 0) + 1 FROM models"))

    def register_model(self, model_version: int, path: str, classifier: str, params: dict,
                       n_labels: int, label_watermark: int, metrics: dict | None,
                       promoted: bool, flow_run_id: str | None) -> None:
        with self.transaction() as con:
            con.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [model_version, path, classifier, json.dumps(params, default=str), n_labels,
                 label_watermark, json.dumps(metrics) if metrics is not None else None,
                 promoted, flow_run_id, utcnow()],
            )

    def current_model(self) -> dict | None:
        """The newest promoted model row, or None before the first one."""
        frame = self.query_df(
            "SELECT * FROM models WHERE promoted ORDER BY model_version DESC LIMIT 1"
        )
        if frame.empty:
            return None
        row = frame.iloc[0].to_dict()
        row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else None
        return row

    def record_cycle(self, flow_run_id: str | None, batch_id: str | None, model_version: int | None,
                     strategy: str, n_labels: int, metrics: dict | None, promoted: bool) -> int:
        metrics = metrics or {}
        with self.transaction() as con:
            cycle = con.execute("SELECT coalesce(max(cycle), 0) + 1 FROM cycles").fetchone()[0]
            con.execute(
                "INSERT INTO cycles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [cycle, flow_run_id, batch_id, model_version, strategy, n_labels,
                 metrics.get("accuracy"), metrics.get("macro_f1"),
                 json.dumps(metrics) if metrics else None, promoted, utcnow()],
            )
        return int(cycle)

    def cycles(self) -> pd.DataFrame:
        return self.query_df("SELECT * FROM cycles ORDER BY cycle")

    # -- status ------------------------------------------------------------------------
    def counts(self, holdout_fraction: float | None = None) -> dict:
        with self.connect() as con:
            def one(sql: str) -> int:
                return int(con.execute(sql).fetchone()[0])

            return {
                "items": one("SELECT count(*) FROM items"),
                "labeled": one("SELECT count(*) FROM effective_labels"),
                "skipped": one(
                    "SELECT count(DISTINCT item_id) FROM labels WHERE item_id NOT IN (SELECT item_id FROM effective_labels)"
                ),
                "label_rows": one("SELECT count(*) FROM labels"),
                "holdout": one(f"SELECT count(*) FROM items i WHERE {holdout_sql(holdout_fraction)}"),
                "pool": one(f"SELECT count(*) FROM items i WHERE {self._pool_where(holdout_fraction)}"),
                "open_batches": one("SELECT count(*) FROM batches WHERE status = 'open'"),
                "models": one("SELECT count(*) FROM models"),
                "cycles": one("SELECT count(*) FROM cycles"),
            }
