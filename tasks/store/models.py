"""Models and cycles: every trained model version, the learning curve, and the end of each
cycle step by step (``cycle_reports``: assessed, artifacts published; alflow.tasks.finish)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import pyarrow as pa

from alflow.config import ConfigError
from alflow.tasks.store.database import Database, utcnow
from alflow.tasks.store.quality import QualityStore

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd


@dataclass
class CycleTimings:
    """Where one cycle's time went so far: ``seconds`` by step (see ``cycle_timings`` in
    migration 0004), from ``started_at`` (UTC); ``asked_at``: when its batch was queried."""

    started_at: datetime
    seconds: dict[str, float] = field(default_factory=dict)
    asked_at: datetime | None = None


class TaskMismatchError(ConfigError):
    """The store holds one task's answers and models, the config names the other."""


class ModelStore(Database):
    """Model versions and cycles (mixed into :class:`alflow.tasks.store.Store`)."""

    # -- the store's task (schema v13) ------------------------------------------------------
    def store_task(self) -> str | None:
        """'single_label' or 'multi_label': the task of the configs that used this store
        (None for a store no cycle or ingest has used yet)."""
        return self.scalar("SELECT min(task) FROM store_task")

    def claim_task(self, task: str) -> None:
        """Make ``task`` this store's task if it has none yet; raise :class:`TaskMismatchError`
        (one line naming ``task``) if it is the other one: class answers and tag-set answers
        never mix in one store."""
        stored = self.store_task()
        if stored is None:
            with self.transaction() as con:  # the first to claim it wins; read again under the lock
                stored = con.execute("SELECT min(task) FROM store_task").fetchone()[0]
                if stored is None:
                    con.execute("INSERT INTO store_task VALUES (?, ?)", [task, utcnow()])
                    return
        if stored != task:
            raise TaskMismatchError(
                f"task = {task!r} in the config, but the store {self.path} holds {stored} answers and models; "
                f"set task = {stored!r} or use another database")

    def next_model_version(self) -> int:
        return int(self.scalar("SELECT coalesce(max(model_version), 0) + 1 FROM models"))

    def register_model(self, model_version: int, path: str, classifier: str, params: dict,
                       n_labels: int, label_watermark: int, metrics: dict | None,
                       promoted: bool, flow_run_id: str | None, labels: list[str] | None = None,
                       holdout_predictions: pa.Table | None = None, task: str = "single_label",
                       thresholds: list[float] | None = None) -> None:
        """The model's row and, if given, its ``holdout_predictions`` (item_id, label: what
        its holdout metrics counted), in one transaction. ``task``: what it was trained for;
        ``thresholds``: a multi-label model's (n_tags,) per-tag thresholds, in ``labels`` order."""
        # A single-label row names only the columns every schema since v1 has (task takes
        # its default), so the same call works on a store opened before migration 13.
        extra = {} if task == "single_label" and thresholds is None else {
            "task": task, "thresholds": [float(t) for t in thresholds] if thresholds is not None else None}
        with self.transaction() as con:
            con.execute(
                f"""INSERT INTO models (model_version, path, classifier, params, n_labels, label_watermark,
                                       metrics, promoted, flow_run_id, created_at, labels{"".join(", " + c for c in extra)})
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?{", ?" * len(extra)})""",
                [model_version, path, classifier, json.dumps(params, default=str), n_labels,
                 label_watermark, json.dumps(metrics) if metrics is not None else None,
                 promoted, flow_run_id, utcnow(), json.dumps(labels) if labels is not None else None,
                 *extra.values()],
            )
            if holdout_predictions is not None:
                self._insert_holdout_predictions(con, model_version, holdout_predictions)

    # -- holdout predictions (schema v10) ---------------------------------------------------
    def holdout_predictions(self, model_version: int) -> pd.DataFrame:
        """Every stored holdout prediction of ``model_version``: (item_id, label), by item_id."""
        return self.query_df("SELECT item_id, label FROM holdout_predictions WHERE model_version = ? "
                             "ORDER BY item_id", [model_version])

    def write_holdout_predictions(self, model_version: int, predictions: pa.Table) -> int:
        """Store ``model_version``'s labels (item_id, label) of holdout items in one
        transaction; items it already has one for keep theirs. Returns the rows written."""
        if predictions.num_rows == 0:
            return 0
        with self.transaction() as con:
            return self._insert_holdout_predictions(con, model_version, predictions)

    @staticmethod
    def _insert_holdout_predictions(con, model_version: int, predictions: pa.Table) -> int:
        """:meth:`write_holdout_predictions` inside the caller's transaction."""
        con.register("holdout_incoming", predictions)
        return int(con.execute(
            """INSERT INTO holdout_predictions BY NAME
            SELECT ?::INTEGER AS model_version, item_id, label FROM holdout_incoming ON CONFLICT DO NOTHING""",
            [model_version],
        ).fetchone()[0])

    @staticmethod
    def _model_row(row: dict) -> dict:
        for key in ("metrics", "labels"):
            row[key] = json.loads(row[key]) if isinstance(row.get(key), str) else None
        return row

    def current_model(self) -> dict | None:
        """The newest promoted model row, or None before the first one.

        ``path`` is the file name in ``models_dir``; ``labels`` the class list the model was
        trained for (None for a model trained before schema v2). Whether its file is
        usable is decided by :func:`alflow.tasks.train.load_current_model`.
        """
        rows = self.promoted_models(limit=1)
        return rows[0] if rows else None

    def promoted_models(self, limit: int | None = None) -> list[dict]:
        """Every promoted model row, newest first."""
        frame = self.query_df(
            "SELECT * FROM models WHERE promoted ORDER BY model_version DESC"
            + (f" LIMIT {int(limit)}" if limit is not None else "")
        )
        return [self._model_row(row) for row in frame.to_dict("records")]

    def model_row(self, model_version: int) -> dict | None:
        frame = self.query_df("SELECT * FROM models WHERE model_version = ?", [model_version])
        return self._model_row(frame.iloc[0].to_dict()) if not frame.empty else None

    def prediction_width(self, model_version: int) -> int | None:
        """How many classes ``model_version``'s stored probabilities have (None: none stored)."""
        value = self.scalar(
            "SELECT len(proba) FROM predictions WHERE model_version = ? LIMIT 1", [model_version]
        )
        return int(value) if value is not None else None

    def record_cycle(self, flow_run_id: str | None, batch_id: str | None, model_version: int | None,
                     strategy: str, n_labels: int, metrics: dict | None, promoted: bool) -> int:
        """Record the cycle of ``batch_id`` and return its number: one row per batch, so a
        re-run of a cycle that failed after this step returns the row already written."""
        metrics = metrics or {}
        with self.transaction() as con:
            if batch_id is not None:
                done = con.execute("SELECT min(cycle) FROM cycles WHERE batch_id = ?", [batch_id]).fetchone()[0]
                if done is not None:
                    return int(done)
            cycle = con.execute("SELECT coalesce(max(cycle), 0) + 1 FROM cycles").fetchone()[0]
            con.execute(
                "INSERT INTO cycles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [cycle, flow_run_id, batch_id, model_version, strategy, n_labels,
                 metrics.get("accuracy"), metrics.get("macro_f1"),
                 json.dumps(metrics) if metrics else None, promoted, utcnow()],
            )
        return int(cycle)

    def record_timings(self, batch_id: str, flow_run_id: str | None, timings: CycleTimings,
                       cycle: int | None = None) -> None:
        """Where the cycle that asked ``batch_id`` spent its time: before its review
        (``cycle`` None; read back by the process that resumes the run), or once recorded."""
        with self.transaction() as con:
            self._write_timings(con, batch_id, flow_run_id, timings, cycle)

    @staticmethod
    def _write_timings(con, batch_id: str, flow_run_id: str | None, timings: CycleTimings,
                       cycle: int | None) -> None:
        """:meth:`record_timings` inside the caller's transaction."""
        con.execute(
            "INSERT OR REPLACE INTO cycle_timings VALUES (?, ?, ?, ?, ?, ?)",
            [batch_id, flow_run_id, cycle, timings.started_at, timings.asked_at or utcnow(),
             json.dumps(timings.seconds)],
        )

    def batch_timings(self, batch_id: str) -> CycleTimings | None:
        """What :meth:`record_timings` stored for ``batch_id``, or None."""
        with self.connect() as con:
            row = con.execute("SELECT started_at, asked_at, seconds FROM cycle_timings WHERE batch_id = ?",
                              [batch_id]).fetchone()
        return None if row is None else CycleTimings(row[0], json.loads(row[2]), row[1])

    def cycle_timings(self) -> dict[int, dict]:
        """Each recorded cycle's breakdown (seconds per step, overhead, wall), by cycle number."""
        frame = self.query_df("SELECT cycle, seconds FROM cycle_timings WHERE cycle IS NOT NULL")
        return {int(cycle): json.loads(seconds) for cycle, seconds in zip(frame["cycle"], frame["seconds"])}

    def cycles(self) -> pd.DataFrame:
        return self.query_df("SELECT * FROM cycles ORDER BY cycle")

    # -- the end of a cycle, step by step (schema v9; alflow.tasks.finish) ------------------
    def cycle_of_batch(self, batch_id: str) -> dict | None:
        """The cycle row of ``batch_id``, or None before its cycle is recorded."""
        frame = self.query_df("SELECT * FROM cycles WHERE batch_id = ? ORDER BY cycle LIMIT 1", [batch_id])
        return None if frame.empty else frame.iloc[0].to_dict()

    def unfinished_cycles(self) -> pd.DataFrame:
        """Cycle rows whose end an earlier run did not finish: not assessed, or artifacts
        not (all) published; oldest first."""
        return self.query_df(
            """SELECT c.* FROM cycles c LEFT JOIN cycle_reports r USING (cycle)
            WHERE r.published_at IS NULL ORDER BY c.cycle"""
        )

    def labeled_batch_without_cycle(self) -> dict | None:
        """The oldest batch whose answers are all recorded but whose cycle is not, among
        those newer than every batch that has a cycle: a run stopped between its review and
        its cycle row. (An older one is no such run: its answers trained a later cycle.)"""
        frame = self.query_df(
            """SELECT b.* FROM batches b
            WHERE b.status = 'labeled' AND b.batch_id NOT IN (SELECT batch_id FROM cycles WHERE batch_id IS NOT NULL)
              AND b.created_at > coalesce((SELECT max(o.created_at) FROM batches o JOIN cycles c USING (batch_id)),
                                          '-infinity'::TIMESTAMP)
            ORDER BY b.created_at, b.batch_id LIMIT 1"""
        )
        return None if frame.empty else frame.iloc[0].to_dict()

    def record_assessment(self, cycle: int, model_version: int | None, quality: dict, report: dict,
                          batch_id: str | None, flow_run_id: str | None, timings: CycleTimings | None) -> None:
        """One transaction: the cycle's quality row (:func:`alflow.tasks.stopping.assess_cycle`'s
        figures), its report (what its summary shows, JSON-ready) and its timings. Once this
        is written the cycle is assessed; a second call for it writes nothing."""
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM cycle_reports WHERE cycle = ? AND report IS NOT NULL", [cycle]).fetchall():
                return
            QualityStore._insert_cycle_quality(con, cycle, model_version, quality["control"], quality["flags"],
                                               quality["stop_kappa"], quality["rules"], quality["stop"])
            con.execute("INSERT INTO cycle_reports (cycle, report) VALUES (?, ?) "
                        "ON CONFLICT (cycle) DO UPDATE SET report = excluded.report",
                        [cycle, json.dumps(report, allow_nan=False)])
            if batch_id is not None and timings is not None:
                self._write_timings(con, batch_id, flow_run_id, timings, cycle)

    def cycle_report(self, cycle: int) -> dict | None:
        """The end of ``cycle`` as recorded: ``{cycle, report (dict, None before it is
        assessed), publishing_run, curve_artifact, summary_artifact, published_at}``; None
        when nothing is."""
        import pandas as pd

        frame = self.query_df("SELECT * FROM cycle_reports WHERE cycle = ?", [cycle])
        if frame.empty:
            return None
        row = frame.iloc[0].to_dict()
        row = {k: (None if not isinstance(v, str) and pd.isna(v) else v) for k, v in row.items()}
        row["report"] = json.loads(row["report"]) if row["report"] else None
        return row

    def start_publishing(self, cycle: int, flow_run_id: str | None) -> None:
        """Record that ``flow_run_id`` publishes ``cycle``'s artifacts now, before it does:
        a run stopped after creating one but before recording it is then looked up there."""
        with self.transaction() as con:
            con.execute("UPDATE cycle_reports SET publishing_run = ? WHERE cycle = ?", [flow_run_id, cycle])

    def record_artifact(self, cycle: int, kind: str, artifact_id: str) -> bool:
        """Record the Prefect artifact ``kind`` ('curve' or 'summary') of ``cycle``; when both
        are recorded the cycle is published (finished). Returns whether it is."""
        column, other = {"curve": ("curve_artifact", "summary_artifact"),
                         "summary": ("summary_artifact", "curve_artifact")}[kind]
        with self.transaction() as con:
            row = con.execute(
                f"""UPDATE cycle_reports SET {column} = ?,
                    published_at = CASE WHEN {other} IS NOT NULL THEN coalesce(published_at, ?) END
                WHERE cycle = ? RETURNING published_at""", [str(artifact_id), utcnow(), cycle]
            ).fetchone()
        return row is not None and row[0] is not None
