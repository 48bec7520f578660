"""Labels: the append-only answers, and the effective label each item counts as.

Nothing here updates or deletes a label. A correction is a new row; the effective label is
derived by the ``effective_labels`` view (latest answer per annotator, then majority).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import pandas as pd

from alflow.config import SKIP
from alflow.tasks.store.batches import BatchStore
from alflow.tasks.store.database import StoreError, utcnow
from alflow.tasks.store.pool import DOC_SQL, holdout_sql

ORIGINS = ("ui", "cli", "import", "simulated")


@dataclass
class LabelWrite:
    """What a label write did.

    ``kept``: answers already given in this batch that stay, because the Resume form came
    back with its untouched default for them. Of the rows written (``new`` +
    ``corrections``) shown with a pre-label: ``accepted_prelabel`` kept it,
    ``changed_prelabel`` chose another class, ``skipped_prelabel`` skipped the item.
    """

    new: int = 0
    duplicates: int = 0
    corrections: int = 0
    kept: int = 0
    kept_items: list[str] = field(default_factory=list)
    accepted_prelabel: int = 0
    changed_prelabel: int = 0
    skipped_prelabel: int = 0

    def summary(self) -> str:
        """'20 new (18 kept the pre-label, 2 changed it)', then corrections, duplicates, kept."""
        written = f"{self.new} new"
        if self.corrections:
            written += f", {self.corrections} corrections"
        written += prelabel_note(self.accepted_prelabel, self.changed_prelabel, self.skipped_prelabel)
        parts = [written]
        if self.duplicates:
            parts.append(f"{self.duplicates} already recorded")
        if self.kept:
            parts.append(f"{self.kept} already answered in this batch (kept)")
        return ", ".join(parts)


def prelabel_note(accepted: int, changed: int, skipped: int = 0) -> str:
    """' (18 kept the pre-label, 2 changed it)', or '' when no pre-label was shown."""
    if not (accepted or changed or skipped):
        return ""
    note = f" ({accepted} kept the pre-label, {changed} changed it"
    return note + (f", {skipped} skipped)" if skipped else ")")


@dataclass(frozen=True)
class Answer:
    """One reviewer's answer for one item: a class name or 'skip'.

    ``prelabel_shown``: the pre-label the reviewer saw with the item (None: none was shown).
    """

    item_id: str
    label: str
    prelabel_shown: str | None = None


class LabelStore(BatchStore):
    """Answers and effective labels (mixed into :class:`alflow.tasks.store.Store`)."""

    def record_labels(self, answers: Iterable[Answer], *, annotator: str, origin: str,
                      batch_id: str | None = None, flow_run_id: str | None = None,
                      form_defaults: Mapping[str, str | None] | None = None,
                      close_batch: str | None = None) -> LabelWrite:
        """Append answers to ``labels`` in one transaction; nothing is overwritten.

        * The same answer again from the same annotator in the same batch is a duplicate
          and is not written twice (re-importing a file is harmless).
        * A different answer from the same annotator is a correction: a new row, the
          latest of which is that annotator's answer.
        * ``form_defaults`` (the Resume form: item_id -> the value its field was preset to
          when the form was built, None for a field with no default): an item already
          answered in this batch (by anyone, e.g. `alflow label` while the run waited)
          whose form value is still that default keeps its stored answer, and the form's
          value is not recorded. A value the reviewer changed is recorded like any answer
          (a correction if this annotator had answered otherwise, else a new answer).
        * Each row keeps the answer's ``prelabel_shown``.
        * ``close_batch``: also set the batch's status (e.g. 'labeled') in the same
          transaction, so a batch is never closed without its answers or vice versa.
        """
        if origin not in ORIGINS:
            raise StoreError(f"label origin must be one of {ORIGINS}, not {origin!r}")
        answers = list(answers)
        result = LabelWrite()
        if close_batch is not None and batch_id is None:
            raise StoreError("close_batch needs a batch_id")
        if form_defaults is not None and batch_id is None:
            raise StoreError("form_defaults needs a batch_id")
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
                untouched = form_defaults is not None and answer.label == form_defaults.get(answer.item_id)
                if untouched and in_batch:
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
                shown = answer.prelabel_shown if isinstance(answer.prelabel_shown, str) and answer.prelabel_shown else None
                if shown is not None:
                    if answer.label == shown:
                        result.accepted_prelabel += 1
                    elif answer.label == SKIP:
                        result.skipped_prelabel += 1
                    else:
                        result.changed_prelabel += 1
                rows.append((answer.item_id, answer.label, annotator, origin, batch_id, flow_run_id, now, shown))
            if rows:
                con.executemany(
                    """INSERT INTO labels (item_id, label, annotator, origin, batch_id, flow_run_id, created_at,
                                           prelabel_shown)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                    rows,
                )
            if close_batch:
                self._close_batch(con, batch_id, close_batch)
            con.unregister("incoming")
        return result

    def prelabel_agreement(self, batch_id: str) -> dict:
        """How a batch's answers relate to the pre-labels shown with them.

        Counts each annotator's latest answer per item in the batch: ``answers``; ``shown``
        (a pre-label was shown); of those, ``kept`` (answered the pre-label), ``changed``
        (another class) and ``skipped``; ``not_shown`` (cold start, simulated annotator,
        `alflow resume --skip-rest`, a file without a prelabel column).
        """
        row = self.query_df(
            """WITH latest AS (
                SELECT label, prelabel_shown AS shown FROM labels WHERE batch_id = ?
                QUALIFY row_number() OVER (PARTITION BY item_id, annotator ORDER BY label_id DESC) = 1
            )
            SELECT count(*) AS answers, count(shown) AS shown,
                count(*) FILTER (WHERE label = shown) AS kept,
                count(*) FILTER (WHERE label <> shown AND label <> ?) AS changed,
                count(*) FILTER (WHERE shown IS NOT NULL AND label = ?) AS skipped
            FROM latest""",
            [batch_id, SKIP, SKIP],
        ).iloc[0]
        counts = {name: int(row[name]) for name in ("answers", "shown", "kept", "changed", "skipped")}
        counts["not_shown"] = counts["answers"] - counts["shown"]
        return counts

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
