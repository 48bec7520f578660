"""Label flags, the control slice, the stop set and each cycle's quality figures (schema v6)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from alflow.config import SKIP
from alflow.tasks.store.database import Database, utcnow
from alflow.tasks.store.pool import DOC_SQL, sample_order_sql

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd

# batch_items.picked_by of the random control slice and of flagged items asked again.
CONTROL = "control"
RECHECK = "recheck"


class QualityStore(Database):
    """Label checking, control slice and stopping state (mixed into :class:`alflow.tasks.store.Store`)."""

    # -- label flags ---------------------------------------------------------------------
    def record_label_flags(self, model_version: int, flags: pd.DataFrame) -> int:
        """Store the flags of ``model_version`` (columns item_id, label_id, given_label,
        suggested_label, score, rank) in one transaction; a re-run adds nothing. Returns
        how many the model has."""
        with self.transaction() as con:
            if len(flags):
                con.register("incoming", flags.assign(model_version=model_version, created_at=utcnow()))
                con.execute(
                    """INSERT INTO label_flags BY NAME SELECT model_version, item_id, label_id, given_label,
                    suggested_label, score, rank, created_at FROM incoming ON CONFLICT DO NOTHING"""
                )
                con.unregister("incoming")
            return int(con.execute("SELECT count(*) FROM label_flags WHERE model_version = ?",
                                   [model_version]).fetchone()[0])

    def last_checked_model(self) -> int | None:
        """The model version of the newest label check (the newest assessed cycle's model)."""
        value = self.scalar("SELECT max(model_version) FROM cycle_quality")
        return None if value is None else int(value)

    def open_label_flags(self, limit: int | None = None, model_version: int | None = None) -> pd.DataFrame:
        """The newest check's flags (or ``model_version``'s) still worth asking about, most
        likely wrong first: the item's effective label is still the one flagged, and it was
        never asked again (a recheck waits in an open batch, or was answered: confirmed or
        corrected; an expired one does not count)."""
        newest = "SELECT max(model_version) AS v FROM cycle_quality" if model_version is None \
            else f"SELECT {int(model_version)} AS v"
        return self.query_df(
            f"""WITH newest AS ({newest})
            SELECT f.item_id, f.label_id, f.given_label, f.suggested_label, f.score, f.rank, f.model_version
            FROM label_flags f JOIN newest ON f.model_version = newest.v
            JOIN effective_labels e ON e.item_id = f.item_id AND e.label = f.given_label
            WHERE f.item_id NOT IN (
                SELECT bi.item_id FROM batch_items bi JOIN batches b USING (batch_id)
                WHERE bi.picked_by = '{RECHECK}' AND b.status <> 'expired')
            ORDER BY f.rank""" + (f" LIMIT {int(limit)}" if limit is not None else "")
        )

    def label_flag_count(self, model_version: int | None = None) -> int:
        if model_version is None:
            model_version = self.last_checked_model()
            if model_version is None:
                return 0
        return int(self.scalar("SELECT count(*) FROM label_flags WHERE model_version = ?", [model_version]))

    # -- multi-label adjudication --------------------------------------------------------
    def tag_adjudication(self, distance: float) -> pd.DataFrame:
        """Multi-label items whose votes need an adjudicator, oldest vote first (the
        tag-set form of :meth:`needs_adjudication`): at least two annotators voted (skips
        left out), no deciding answer that is not a skip, not in an open batch, and the
        votes tie (no unique majority set: no effective label until decided) or two of them
        are farther apart than ``distance`` (MASI, :func:`alflow.tasks.agreement.masi_distance`).
        Columns: item_id, answers, disagreement (the largest MASI distance between two
        votes, 0..1), tie."""
        import pandas as pd

        from collections import Counter
        from itertools import combinations

        from alflow.tasks.agreement import masi_distance
        from alflow.tasks.multilabel.tags import parse_tags

        votes = self.query_df(
            """SELECT item_id, label, label_id FROM votes
            WHERE label <> ? AND item_id NOT IN (SELECT item_id FROM decisions)
              AND item_id NOT IN (SELECT bi.item_id FROM batch_items bi JOIN batches b USING (batch_id)
                                  WHERE b.status = 'open')
            ORDER BY label_id""",
            [SKIP],
        )
        rows = []
        for item_id, group in votes.groupby("item_id", sort=False):
            if len(group) < 2:
                continue
            tally = Counter(group["label"]).most_common()
            tie = len(tally) > 1 and tally[0][1] == tally[1][1]
            sets = [parse_tags(v) for v in group["label"]]
            farthest = max(masi_distance(a, b) for a, b in combinations(sets, 2))
            if tie or farthest > distance:
                rows.append((item_id, len(group), farthest, tie, int(group["label_id"].min())))
        frame = pd.DataFrame(rows, columns=["item_id", "answers", "disagreement", "tie", "first_id"])
        frame = frame.sort_values(["first_id", "item_id"]).drop(columns="first_id").reset_index(drop=True)
        return frame.astype({"answers": "int32", "disagreement": float, "tie": bool})

    # -- the control slice ---------------------------------------------------------------
    def control_draw(self, n: int, seed: int, draw: int, holdout_fraction: float | None = None) -> list[str]:
        """``n`` pool items drawn uniformly, in SQL: ordered by a hash of (seed, draw, item_id),
        so a draw is reproducible and another draw (another batch) is independent."""
        return self.query_df(
            f"""SELECT i.item_id FROM items i WHERE {self._pool_where(holdout_fraction)} {self._embedded_sql()}
            ORDER BY {sample_order_sql(seed, draw=int(draw))} LIMIT ?""",
            [n],
        )["item_id"].tolist()

    def control_outcomes(self, model_version: int) -> pd.DataFrame:
        """The control answers ``model_version`` never trained on, each with that model's
        prediction: item_id, batch_id, label (the control answer: ``control_answers``, each
        item once), predicted. Never trained on: given after its label watermark, or any
        control answer when it was trained with ``control_trains`` off. The prediction is
        the one scored for the control slice (``control_predictions``), else the model's
        pre-label of the item while it was in the pool; items with neither are left out."""
        return self.query_df(
            """WITH m AS (
                SELECT label_watermark AS watermark,
                       coalesce(json_extract(metrics, '$.control_trains')::BOOLEAN, true) AS trained
                FROM models WHERE model_version = ?
            )
            SELECT c.item_id, c.batch_id, c.label, coalesce(cp.label, p.label) AS predicted
            FROM control_answers c CROSS JOIN m
            LEFT JOIN control_predictions cp ON cp.item_id = c.item_id AND cp.model_version = ?
            LEFT JOIN predictions p ON p.item_id = c.item_id AND p.model_version = ?
            WHERE (NOT m.trained OR c.label_id > m.watermark) AND coalesce(cp.label, p.label) IS NOT NULL
            ORDER BY c.label_id""",
            [model_version, model_version, model_version],
        )

    def unscored_control(self, model_version: int) -> pd.DataFrame:
        """The control answers ``model_version`` has no prediction for yet (item_id, doc)."""
        return self.query_df(
            f"""SELECT c.item_id, {DOC_SQL} AS doc FROM control_answers c JOIN items i USING (item_id)
            WHERE c.item_id NOT IN (SELECT item_id FROM control_predictions WHERE model_version = ?)
              AND c.item_id NOT IN (SELECT item_id FROM predictions WHERE model_version = ?)
            ORDER BY c.label_id""",
            [model_version, model_version],
        )

    def record_control_predictions(self, model_version: int, item_ids: list[str], labels: list[str]) -> None:
        """Store a model's predictions of control items (a re-run adds nothing)."""
        import pandas as pd

        frame = pd.DataFrame({"model_version": model_version, "item_id": list(item_ids), "label": list(labels)})
        with self.transaction() as con:
            con.register("incoming", frame)
            con.execute("INSERT INTO control_predictions BY NAME SELECT * FROM incoming ON CONFLICT DO NOTHING")
            con.unregister("incoming")

    # -- the stop set --------------------------------------------------------------------
    def stop_set_ids(self, size: int, seed: int) -> list[str]:
        """The stop set's item ids; chosen once (a seeded uniform sample of ``size`` stored
        items) the first time it is asked for, then always the same (less the items with no
        vector while :meth:`read_embedded_only` is set)."""
        with self.transaction() as con:
            if not con.execute("SELECT count(*) FROM stop_set").fetchone()[0]:
                con.execute(
                    f"""INSERT INTO stop_set SELECT i.item_id, ? FROM items i
                    ORDER BY {sample_order_sql(seed, draw="stop")} LIMIT ?""",
                    [utcnow(), size],
                )
            # the set stays as chosen; only this read leaves out items a model cannot score now
            return [r[0] for r in con.execute(
                f"SELECT i.item_id FROM stop_set i WHERE TRUE {self._embedded_sql()} ORDER BY i.item_id").fetchall()]

    def record_stop_set_predictions(self, model_version: int, item_ids: list[str], labels: list[str]) -> None:
        import pandas as pd

        frame = pd.DataFrame({"model_version": model_version, "item_id": item_ids, "label": labels})
        with self.transaction() as con:
            con.register("incoming", frame)
            con.execute("INSERT INTO stop_set_predictions BY NAME SELECT * FROM incoming ON CONFLICT DO NOTHING")
            con.unregister("incoming")

    def stop_set_predictions(self, model_version: int) -> pd.Series:
        import pandas as pd

        frame = self.query_df(
            "SELECT item_id, label FROM stop_set_predictions WHERE model_version = ? ORDER BY item_id",
            [model_version],
        )
        return pd.Series(frame["label"].to_numpy(), index=frame["item_id"].to_numpy(), dtype=object)

    # -- per cycle -----------------------------------------------------------------------
    @staticmethod
    def _insert_cycle_quality(con, cycle: int, model_version: int | None, control: dict, flags: int,
                              stop_kappa: float | None, rules: list[dict], stop: str | None) -> None:
        """The cycle's quality row, inside the caller's transaction: the one that also writes
        its report (:meth:`alflow.tasks.store.models.ModelStore.record_assessment`)."""
        con.execute(
            """INSERT OR REPLACE INTO cycle_quality VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [cycle, model_version, control["n"], control["correct"], control["accuracy"],
             control["low"], control["high"], flags, stop_kappa, json.dumps(rules), stop, utcnow()],
        )

    def cycle_quality(self) -> pd.DataFrame:
        frame = self.query_df("SELECT * FROM cycle_quality ORDER BY cycle")
        frame["stop_rules"] = [json.loads(v) if isinstance(v, str) else v for v in frame["stop_rules"]]
        return frame
