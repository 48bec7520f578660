"""Models and cycles: every trained model version, and the learning curve."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd

from alflow.tasks.store.database import Database, utcnow


@dataclass
class CycleTimings:
    """Where one cycle's time went so far: ``seconds`` by step (see ``cycle_timings`` in
    migration 0004), from ``started_at`` (UTC); ``asked_at``: when its batch was queried."""

    started_at: datetime
    seconds: dict[str, float] = field(default_factory=dict)
    asked_at: datetime | None = None


class ModelStore(Database):
    """Model versions and cycles (mixed into :class:`alflow.tasks.store.Store`)."""

    def next_model_version(self) -> int:
        return int(self.scalar("SELECT coalesce(max(model_version), 0) + 1 FROM models"))

    def register_model(self, model_version: int, path: str, classifier: str, params: dict,
                       n_labels: int, label_watermark: int, metrics: dict | None,
                       promoted: bool, flow_run_id: str | None, labels: list[str] | None = None) -> None:
        with self.transaction() as con:
            con.execute(
                """INSERT INTO models (model_version, path, classifier, params, n_labels, label_watermark,
                                       metrics, promoted, flow_run_id, created_at, labels)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [model_version, path, classifier, json.dumps(params, default=str), n_labels,
                 label_watermark, json.dumps(metrics) if metrics is not None else None,
                 promoted, flow_run_id, utcnow(), json.dumps(labels) if labels is not None else None],
            )

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

    def record_timings(self, batch_id: str, flow_run_id: str | None, timings: CycleTimings,
                       cycle: int | None = None) -> None:
        """Where the cycle that asked ``batch_id`` spent its time: before its review
        (``cycle`` None; read back by the process that resumes the run), or once recorded."""
        with self.transaction() as con:
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
