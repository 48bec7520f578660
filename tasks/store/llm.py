"""The LLM's side of the store (schema v11): its lineages, its cached answers, what each run
asked it, and how reviewers took its pre-labels.

An LLM lineage (``llm_models``) is the endpoint, its model name and the prompt's hash; its
answers (``llm_predictions``) are kept per (item, lineage), so an item is asked once per
lineage. A failed request stores nothing and is asked again next time.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Sequence

import numpy as np

from alflow.config import SKIP
from alflow.tasks.store.database import Database, utcnow

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd

# The columns of an LLM answer, as :meth:`LLMStore.llm_answers` reads them and
# :meth:`LLMStore.record_llm_answers` writes them.
ANSWER_COLUMNS = ["item_id", "label", "confidence", "proba", "status"]
# What llm_usage counts; the order of its columns.
USAGE_COUNTS = ("requests", "failed", "retried", "outside", "malformed")
USAGE_TOKENS = ("prompt_tokens", "completion_tokens")
# Who suggested a batch item's pre-label (batch_items.prelabel_by).
SUGGESTERS = ("model", "llm")


def _lineage_key(lineage: dict, labels: Sequence[str]) -> list:
    missing = [key for key in ("base_url", "model", "prompt_hash") if not lineage.get(key)]
    if missing:
        raise ValueError(f"an LLM lineage needs {', '.join(missing)}")
    return [str(lineage["base_url"]), str(lineage["model"]), str(lineage["prompt_hash"]), json.dumps(list(labels))]


class LLMStore(Database):
    """LLM lineages, answers, usage (mixed into :class:`alflow.tasks.store.Store`)."""

    def find_llm_version(self, lineage: dict, labels: Sequence[str]) -> int | None:
        """The llm_version of ``lineage`` ({base_url, model, prompt_hash}) over ``labels``,
        or None if nothing was ever asked under it. Writes nothing."""
        value = self.scalar(
            "SELECT llm_version FROM llm_models WHERE base_url = ? AND model = ? AND prompt_hash = ? AND labels = ?",
            _lineage_key(lineage, labels))
        return None if value is None else int(value)

    def llm_version(self, lineage: dict, labels: Sequence[str]) -> int:
        """The llm_version of ``lineage`` over ``labels``, recorded the first time (one
        transaction: two processes meeting a new lineage get one row)."""
        key = _lineage_key(lineage, labels)
        with self.transaction() as con:
            found = con.execute("SELECT llm_version FROM llm_models WHERE base_url = ? AND model = ? "
                                "AND prompt_hash = ? AND labels = ?", key).fetchone()
            if found is not None:
                return int(found[0])
            version = int(con.execute("SELECT coalesce(max(llm_version), 0) + 1 FROM llm_models").fetchone()[0])
            con.execute("INSERT INTO llm_models VALUES (?, ?, ?, ?, ?, ?)", [version, *key, utcnow()])
            return version

    def llm_answers(self, llm_version: int, item_ids: Sequence[str]) -> pd.DataFrame:
        """The stored answers of ``llm_version`` for those of ``item_ids`` it has one for, in
        the given order: item_id, label, confidence, proba (a list or None), status."""
        import pandas as pd

        if not len(item_ids):
            return pd.DataFrame(columns=ANSWER_COLUMNS)
        wanted = pd.DataFrame({"item_id": list(item_ids), "pos": range(len(item_ids))})
        with self.connect() as con:
            con.register("wanted", wanted)
            frame = con.execute(
                """SELECT p.item_id, p.label, p.confidence, p.proba, p.status
                FROM wanted w JOIN llm_predictions p ON p.item_id = w.item_id AND p.llm_version = ?
                ORDER BY w.pos""", [llm_version]).df()
        frame["proba"] = [None if p is None or (np.ndim(p) == 0 and pd.isna(p)) else list(p) for p in frame["proba"]]
        return frame

    def record_llm_answers(self, llm_version: int | None, answers: pd.DataFrame, usage: dict,
                           flow_run_id: str | None, step: str, error: str | None = None) -> int:
        """Store the LLM's answers (:data:`ANSWER_COLUMNS`; status ok, outside or malformed:
        failed ones are the caller's to leave out) and the ``usage`` row of the asking
        (counts :data:`USAGE_COUNTS`, tokens :data:`USAGE_TOKENS` or None, ``seconds``;
        ``error``: why the endpoint was unusable) in one transaction. An answer already
        stored for the item is kept. Returns the answers written."""
        import pandas as pd

        rows = answers[ANSWER_COLUMNS].copy() if len(answers) else pd.DataFrame(columns=ANSWER_COLUMNS)
        ok = rows["status"] == "ok"
        # An answer that is no label stores none of a label's parts.
        rows.loc[~ok, ["label", "confidence"]] = None
        rows["proba"] = [p if is_ok and p is not None else None for p, is_ok in zip(rows["proba"], ok)]
        rows["confidence"] = pd.to_numeric(rows["confidence"], errors="coerce").astype(float)
        with self.transaction() as con:
            written = 0
            if len(rows):
                con.register("incoming", rows)
                written = int(con.execute(
                    """INSERT INTO llm_predictions BY NAME
                    SELECT item_id, ?::INTEGER AS llm_version, label::VARCHAR AS label, confidence,
                           proba::DOUBLE[] AS proba, status, ?::TIMESTAMP AS created_at FROM incoming
                    ON CONFLICT DO NOTHING""", [llm_version, utcnow()]).fetchone()[0])
            con.execute(
                f"""INSERT INTO llm_usage (flow_run_id, step, llm_version, {', '.join(USAGE_COUNTS + USAGE_TOKENS)},
                                           seconds, error, created_at) VALUES ({', '.join(['?'] * 13)})""",
                [flow_run_id, step, llm_version, *(int(usage.get(k) or 0) for k in USAGE_COUNTS),
                 *(None if usage.get(k) is None else int(usage[k]) for k in USAGE_TOKENS),
                 float(usage.get("seconds") or 0.0), error, utcnow()])
        return written

    def pool_members(self, item_ids: Sequence[str], holdout_fraction: float | None = None) -> list[str]:
        """Those of ``item_ids`` still in the pool (unanswered, in no open batch, not held
        out), in the given order: what is left of candidates asked about earlier."""
        import pandas as pd

        if not len(item_ids):
            return []
        wanted = pd.DataFrame({"item_id": list(item_ids), "pos": range(len(item_ids))})
        with self.connect() as con:
            con.register("wanted", wanted)
            # _pool_where: PoolStore's rule of the pool, a sibling part of Store
            return [row[0] for row in con.execute(
                f"""SELECT w.item_id FROM wanted w JOIN items i USING (item_id)
                WHERE {self._pool_where(holdout_fraction)} ORDER BY w.pos""").fetchall()]

    def llm_labels(self, llm_version: int, min_confidence: float | None = None) -> pd.DataFrame:
        """The labels ``llm_version`` gave (status ok), with confidence at least
        ``min_confidence`` when given (an answer without a confidence then never passes):
        item_id, label, confidence, ordered by item_id. Holdout and control items are not
        left out here."""
        floor = "" if min_confidence is None else "AND confidence >= ?"
        return self.query_df(
            f"""SELECT item_id, label, confidence FROM llm_predictions
            WHERE llm_version = ? AND status = 'ok' {floor} ORDER BY item_id""",
            [llm_version] if min_confidence is None else [llm_version, float(min_confidence)])

    def llm_usage(self, flow_run_id: str | None = None, any_run: bool = False) -> dict | None:
        """What was asked of the LLM, summed: by the run ``flow_run_id``, or by every run
        (``any_run``). A dict of :data:`USAGE_COUNTS`, :data:`USAGE_TOKENS` (None when no
        server reported them), ``seconds`` and ``steps`` (the steps that asked, in order);
        None when nothing was asked."""
        import pandas as pd

        where = "" if any_run else "WHERE flow_run_id IS NOT DISTINCT FROM ?"
        row = self.query_df(
            f"""SELECT count(*) AS n, {', '.join(f'sum({k}) AS {k}' for k in USAGE_COUNTS + USAGE_TOKENS)},
                   sum(seconds) AS seconds, list(DISTINCT step ORDER BY step) AS steps,
                   arg_max(error, created_at) FILTER (WHERE error IS NOT NULL) AS error
            FROM llm_usage {where}""", [] if any_run else [flow_run_id]).iloc[0]
        if not int(row["n"]):
            return None
        usage = {k: int(row[k]) for k in USAGE_COUNTS}
        usage.update({k: None if pd.isna(row[k]) else int(row[k]) for k in USAGE_TOKENS})
        usage["seconds"] = round(float(row["seconds"]), 3)
        usage["steps"] = list(row["steps"])
        usage["error"] = row["error"] if isinstance(row["error"], str) else None
        return usage

    def prelabel_kept(self, batch_id: str | None = None) -> dict[str, dict]:
        """How reviewers took the pre-labels shown to them, apart by who suggested them
        (:data:`SUGGESTERS`): ``{suggester: {shown, kept, changed, skipped}}`` over each
        annotator's latest answer per item in ``batch_id`` (None: in every batch). An
        answer is counted under the suggester of its batch item's pre-label; one given
        without a pre-label is not counted."""
        where = "AND a.batch_id = ?" if batch_id is not None else ""
        frame = self.query_df(
            f"""SELECT coalesce(bi.prelabel_by, 'model') AS prelabel_by, count(*) AS shown,
                count(*) FILTER (WHERE a.label = a.prelabel_shown) AS kept,
                count(*) FILTER (WHERE a.label <> a.prelabel_shown AND a.label <> ?) AS changed,
                count(*) FILTER (WHERE a.label = ?) AS skipped
            FROM batch_answers a JOIN batch_items bi ON bi.batch_id = a.batch_id AND bi.item_id = a.item_id
            WHERE a.prelabel_shown IS NOT NULL {where} GROUP BY ALL""",
            [SKIP, SKIP] + ([batch_id] if batch_id is not None else []))
        counts = {who: {"shown": 0, "kept": 0, "changed": 0, "skipped": 0} for who in SUGGESTERS}
        for row in frame.to_dict("records"):
            counts.setdefault(row["prelabel_by"], {})
            counts[row["prelabel_by"]] = {k: int(row[k]) for k in ("shown", "kept", "changed", "skipped")}
        return counts
