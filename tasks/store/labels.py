"""Labels: the append-only answers, and the effective label each item counts as.

Nothing here updates or deletes a label. A correction is a new row; the effective label is
derived by the ``effective_labels`` view (latest answer per annotator, then majority).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

from alflow.config import SKIP
from alflow.tasks.store.batches import BatchStore
from alflow.tasks.store.database import StoreError, utcnow
from alflow.tasks.store.pool import DOC_SQL, holdout_sql

if TYPE_CHECKING:
    # imported where used: `alflow ingest` never loads pandas (0.2-0.4 s of its start-up)
    import pandas as pd

ORIGINS = ("ui", "cli", "import", "simulated", "adjudication")


class BatchClosedError(StoreError):
    """Answers for a batch that is no longer open (labeled or expired), given without ``late``."""


def closed_batch_line(batch_id: str, status: str, closed_at) -> str:
    """The one line that refuses answers for a batch that is no longer open."""
    import pandas as pd

    since = f" since {str(closed_at)[:19]} UTC" if closed_at is not None and not pd.isna(closed_at) else ""
    return f"batch {batch_id} is {status}{since}: nothing waits for these answers; pass --late to record them anyway"


@dataclass
class LabelWrite:
    """What a label write did.

    ``kept``: answers already given in this batch that stay, because the Resume form came
    back with its untouched default for them. Of the rows written (``new`` +
    ``corrections``) shown with a pre-label: ``accepted_prelabel`` kept it,
    ``changed_prelabel`` chose another class, ``skipped_prelabel`` skipped the item.
    """

    new: int = 0
    adjudicated: int = 0
    duplicates: int = 0
    corrections: int = 0
    kept: int = 0
    kept_items: list[str] = field(default_factory=list)
    accepted_prelabel: int = 0
    changed_prelabel: int = 0
    skipped_prelabel: int = 0
    dropped: int = 0
    replayed: bool = False

    def add(self, other: LabelWrite) -> LabelWrite:
        """This write plus ``other`` (a review in several rounds), as a new LabelWrite."""
        merged = LabelWrite()
        for name in ("new", "adjudicated", "duplicates", "corrections", "kept", "accepted_prelabel",
                     "changed_prelabel", "skipped_prelabel", "dropped"):
            setattr(merged, name, getattr(self, name) + getattr(other, name))
        merged.kept_items = self.kept_items + other.kept_items
        merged.replayed = self.replayed or other.replayed
        return merged

    def summary(self) -> str:
        """'20 new (18 kept the pre-label, 2 changed it)', then corrections, duplicates, kept."""
        if self.replayed and not (self.new or self.adjudicated or self.corrections or self.duplicates or self.kept):
            return "recorded before, by an earlier run of this cycle (nothing recorded again)"
        written = f"{self.new} new"
        if self.adjudicated:
            written += f", {self.adjudicated} adjudicated"
        if self.corrections:
            written += f", {self.corrections} corrections"
        written += prelabel_note(self.accepted_prelabel, self.changed_prelabel, self.skipped_prelabel)
        parts = [written]
        if self.duplicates:
            parts.append(f"{self.duplicates} already recorded")
        if self.kept:
            parts.append(f"{self.kept} already answered in this batch (kept)")
        if self.dropped:
            parts.append(f"{self.dropped} taken out of an open batch (answered late)")
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
    ``annotator`` / ``origin``: this answer's own, when they differ from the write's (a file
    with an annotator column; an adjudication in a batch of ordinary answers).
    ``seconds``: labeling time spent on it, measured per item (the terminal, Label Studio's
    ``lead_time``, an import ``seconds`` column; None: not measured). ``form_seconds``: its
    share of a Resume form's wall-clock wait (capped; never labeling time).
    """

    item_id: str
    label: str
    prelabel_shown: str | None = None
    annotator: str | None = None
    origin: str | None = None
    seconds: float | None = None
    form_seconds: float | None = None


def _seconds(value: float | None) -> float | None:
    return value if value is not None and value >= 0 else None


def _has(names, name: str) -> bool:
    """True if ``name`` is in a DuckDB list cell (a list, an array, or NULL for none)."""
    import pandas as pd

    return names is not None and not isinstance(names, float) and names is not pd.NA and name in list(names)


class LabelStore(BatchStore):
    """Answers and effective labels (mixed into :class:`alflow.tasks.store.Store`)."""

    def record_labels(self, answers: Iterable[Answer], *, annotator: str, origin: str,
                      batch_id: str | None = None, flow_run_id: str | None = None,
                      form_defaults: Mapping[str, str | None] | None = None,
                      close_batch: str | None = None, close_if_complete: bool = False,
                      review_round: int | None = None, late: bool = False) -> LabelWrite:
        """Append answers to ``labels`` in one transaction; nothing is overwritten.

        * ``annotator`` / ``origin`` are each answer's unless it names its own
          (:class:`Answer`); one annotator answers an item once per write.
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
        * Each row keeps the answer's ``prelabel_shown``, ``seconds`` and ``form_seconds``.
        * ``batch_id``: answers for a batch that is no longer open (labeled or expired) are
          refused with :class:`BatchClosedError`, unless ``late``: then they are recorded,
          and any open batch holding the same items drops them (``dropped``), so nobody is
          asked about them again.
        * ``review_round``: the answers are review round N of the batch, recorded once: the
          round's ``review_rounds`` row is written in this transaction, and a round already
          recorded (a replayed run, a second process) writes nothing (``replayed``).
        * ``close_batch``: also set the batch's status (e.g. 'labeled') in the same
          transaction, so a batch is never closed without its answers or vice versa;
          ``close_if_complete``: mark it 'labeled' in the same transaction only if every
          item now has the answers it needs (:meth:`batch_needs`).
        """
        import pandas as pd

        answers = list(answers)
        for answer in answers:
            if (answer.origin or origin) not in ORIGINS:
                raise StoreError(f"label origin must be one of {ORIGINS}, not {answer.origin or origin!r}")
        result = LabelWrite()
        if (close_batch is not None or close_if_complete or review_round is not None or late) and batch_id is None:
            raise StoreError("close_batch, review_round and late need a batch_id")
        if form_defaults is not None and batch_id is None:
            raise StoreError("form_defaults needs a batch_id")
        frame = pd.DataFrame({"item_id": [a.item_id for a in answers],
                              "annotator": [a.annotator or annotator for a in answers]}, dtype=object)
        repeated = frame.duplicated()
        if repeated.any():
            dup = frame.loc[repeated].iloc[0]
            raise StoreError(f"item {dup['item_id']} is answered twice by {dup['annotator']} in one write")
        now = utcnow()
        with self.transaction() as con:
            if review_round is not None and con.execute(
                    "SELECT 1 FROM review_rounds WHERE batch_id = ? AND round = ?", [batch_id, review_round]).fetchall():
                result.replayed = True
                return result
            if batch_id is not None and answers:
                self._check_open(con, batch_id, late)
            con.register("incoming", frame)
            missing = con.execute(
                "SELECT item_id FROM incoming WHERE item_id NOT IN (SELECT item_id FROM items) LIMIT 1"
            ).fetchone()
            if missing:
                raise StoreError(f"item {missing[0]} is not in the store")
            previous = con.execute(
                """SELECT n.item_id, n.annotator,
                    (SELECT a.label FROM batch_answers a WHERE a.item_id = n.item_id
                       AND a.annotator = n.annotator AND a.batch_id IS NOT DISTINCT FROM ?) AS own,
                    (SELECT count(*) FROM labels l WHERE l.item_id = n.item_id
                       AND l.batch_id IS NOT DISTINCT FROM ?) AS in_batch
                FROM incoming n""",
                [batch_id, batch_id],
            ).df().set_index(["item_id", "annotator"])
            rows = []
            for answer in answers:
                who = answer.annotator or annotator
                own, in_batch = previous.loc[(answer.item_id, who), ["own", "in_batch"]]
                untouched = form_defaults is not None and answer.label == form_defaults.get(answer.item_id)
                if untouched and in_batch:
                    if own == answer.label:
                        result.duplicates += 1
                    else:
                        result.kept += 1
                        result.kept_items.append(answer.item_id)
                    continue
                how = answer.origin or origin
                if isinstance(own, str):
                    if own == answer.label:
                        result.duplicates += 1
                        continue
                    result.corrections += 1
                elif how == "adjudication":
                    result.adjudicated += 1
                else:
                    result.new += 1
                # "" is a pre-label too: a multi-label model's empty tag set, shown as "none of these"
                shown = answer.prelabel_shown if isinstance(answer.prelabel_shown, str) else None
                if shown is not None:
                    if answer.label == shown:
                        result.accepted_prelabel += 1
                    elif answer.label == SKIP:
                        result.skipped_prelabel += 1
                    else:
                        result.changed_prelabel += 1
                rows.append((answer.item_id, answer.label, who, how, batch_id, flow_run_id, now, shown,
                             _seconds(answer.seconds), _seconds(answer.form_seconds)))
            if rows:
                con.executemany(
                    """INSERT INTO labels (item_id, label, annotator, origin, batch_id, flow_run_id, created_at,
                                           prelabel_shown, seconds, form_seconds)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    rows,
                )
                if late:
                    result.dropped = self._drop_from_open_batches(con, batch_id, [r[0] for r in rows])
            if review_round is not None:
                con.execute("INSERT INTO review_rounds VALUES (?, ?, ?, ?, ?)",
                            [batch_id, review_round, flow_run_id, annotator, now])
            if close_batch:
                self._close_batch(con, batch_id, close_batch)
            elif close_if_complete:
                self._close_if_complete(con, batch_id)
            con.unregister("incoming")
        return result

    @staticmethod
    def _check_open(con, batch_id: str, late: bool) -> None:
        """Raise :class:`BatchClosedError` when ``batch_id`` is not open (unless ``late``),
        :class:`StoreError` when it does not exist."""
        rows = con.execute("SELECT status, closed_at FROM batches WHERE batch_id = ?", [batch_id]).fetchall()
        if not rows:
            raise StoreError(f"batch {batch_id} does not exist")
        status, closed_at = rows[0]
        if status != "open" and not late:
            raise BatchClosedError(closed_batch_line(batch_id, status, closed_at))

    @staticmethod
    def _drop_from_open_batches(con, batch_id: str, item_ids: list[str]) -> int:
        """Take items answered late (in ``batch_id``) out of the other open batches that have
        not asked them yet (no answer there), so they are not asked again; the count taken out."""
        dropped = con.execute(
            """DELETE FROM batch_items WHERE batch_id <> ? AND item_id IN (SELECT unnest(?::VARCHAR[]))
            AND batch_id IN (SELECT batch_id FROM batches WHERE status = 'open')
            AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.batch_id = batch_items.batch_id
                            AND l.item_id = batch_items.item_id) RETURNING item_id""",
            [batch_id, item_ids],
        ).fetchall()
        return len(dropped)

    def round_recorded(self, batch_id: str, review_round: int) -> bool:
        """True when review round ``review_round`` of the batch has been recorded."""
        return bool(self.scalar("SELECT count(*) FROM review_rounds WHERE batch_id = ? AND round = ?",
                                [batch_id, review_round]))

    # -- overlap and adjudication ------------------------------------------------------------
    BATCH_NEEDS_SQL = """
        SELECT bi.rank, bi.item_id, coalesce(bi.overlap, 1) AS overlap,
               count(DISTINCT l.annotator) AS answered_by,
               list(DISTINCT l.annotator) FILTER (WHERE l.annotator IS NOT NULL) AS annotators
        FROM batch_items bi LEFT JOIN labels l ON l.batch_id = bi.batch_id AND l.item_id = bi.item_id
        WHERE bi.batch_id = ?
        GROUP BY bi.rank, bi.item_id, bi.overlap
        HAVING count(DISTINCT l.annotator) < coalesce(bi.overlap, 1)
        ORDER BY bi.rank"""

    def batch_needs(self, batch_id: str, annotator: str | None = None) -> pd.DataFrame:
        """The items of a batch still short of answers, in rank order: (rank, item_id,
        overlap, answered_by, annotators). An item needs ``overlap`` distinct annotators'
        answers (a skip is an answer); with ``annotator``, only the items that annotator has
        not answered yet (what they are asked next)."""
        frame = self.query_df(self.BATCH_NEEDS_SQL, [batch_id])
        if annotator is not None and len(frame):
            frame = frame[[not _has(names, annotator) for names in frame["annotators"]]]
        return frame.reset_index(drop=True)

    def _close_if_complete(self, con, batch_id: str) -> None:
        if not con.execute(self.BATCH_NEEDS_SQL, [batch_id]).fetchall():
            self._close_batch(con, batch_id, "labeled")

    def needs_adjudication(self, threshold: float, distance: float | None = None) -> pd.DataFrame:
        """Items whose votes need an adjudicator, oldest vote first: at least two annotators
        voted (``votes``: their latest answers that do not decide, skips left out), and the
        votes tie, or the share disagreeing with the majority is above ``threshold``; no
        deciding answer that is not a skip (a skipped adjudication comes back here) and not
        in an open batch. Columns: item_id, answers, disagreement (0..1), tie. ``distance``
        (multi-label, review.adjudication_distance): tag sets are compared by MASI distance
        instead (:meth:`tag_adjudication`)."""
        if distance is not None:
            return self.tag_adjudication(distance)
        return self.query_df(
            """WITH counted AS (
                SELECT item_id, label, count(*) AS votes, min(label_id) AS first_id,
                       max(count(*)) OVER (PARTITION BY item_id) AS top
                FROM votes WHERE label <> ? GROUP BY item_id, label
            ), per_item AS (
                SELECT item_id, sum(votes) AS answers, max(top) AS top, min(first_id) AS first_id,
                       count(*) FILTER (WHERE votes = top) AS n_top
                FROM counted GROUP BY item_id
            )
            SELECT p.item_id, p.answers::INTEGER AS answers, 1 - p.top / p.answers AS disagreement,
                   p.n_top > 1 AS tie
            FROM per_item p
            WHERE p.answers >= 2 AND (p.n_top > 1 OR 1 - p.top / p.answers > ?)
              AND p.item_id NOT IN (SELECT item_id FROM decisions)
              AND p.item_id NOT IN (SELECT bi.item_id FROM batch_items bi JOIN batches b USING (batch_id)
                                    WHERE b.status = 'open')
            ORDER BY p.first_id, p.item_id""",
            [SKIP, float(threshold)],
        )

    def answers_given(self, item_ids: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
        """item_id -> [(annotator, label), ...]: every annotator's vote (skips too), oldest
        first, then the deciding answer that holds, as '<annotator> (decided)'; what an
        adjudicator or a recheck is shown."""
        import pandas as pd

        ids = pd.DataFrame({"item_id": list(item_ids)}, dtype=object)
        if ids.empty:
            return {}
        with self.connect() as con:
            con.register("wanted", ids)
            frame = con.execute(
                """SELECT item_id, annotator, label, label_id, false AS decided FROM votes
                WHERE item_id IN (SELECT item_id FROM wanted)
                UNION ALL
                SELECT item_id, annotator, label, label_id, true AS decided FROM decisions
                WHERE item_id IN (SELECT item_id FROM wanted)
                ORDER BY item_id, decided, label_id"""
            ).df()
        given: dict[str, list[tuple[str, str]]] = {i: [] for i in ids["item_id"]}
        for row in frame.itertuples(index=False):
            given[row.item_id].append((f"{row.annotator} (decided)" if row.decided else row.annotator, row.label))
        return given

    def answer_table(self, batch_id: str | None = None, per_batch: bool = False) -> pd.DataFrame:
        """Each annotator's vote per item (``votes``: deciding answers left out, they are not
        independent), with the pre-label they were shown and the item's effective label:
        columns batch_id, item_id, annotator, label, prelabel_shown, effective. ``batch_id``:
        only votes given in that batch; ``per_batch``: each annotator's answer per batch
        (``batch_answers``: an item asked again in a later batch counts in each). Skips are
        answers here; agreement treats them as missing."""
        source = "batch_answers" if per_batch or batch_id else "votes"
        where = "AND a.batch_id = ?" if batch_id else ""
        return self.query_df(
            f"""SELECT a.batch_id, a.item_id, a.annotator, a.label, a.prelabel_shown, e.label AS effective
            FROM {source} a LEFT JOIN effective_labels e USING (item_id)
            WHERE NOT a.decisive {where}
            ORDER BY a.item_id, a.annotator""",
            [batch_id] if batch_id else [],
        )

    def prelabel_agreement(self, batch_id: str) -> dict:
        """How a batch's answers relate to the pre-labels shown with them.

        Counts each annotator's latest answer per item in the batch: ``answers``; ``shown``
        (a pre-label was shown); of those, ``kept`` (answered the pre-label), ``changed``
        (another class) and ``skipped``; ``not_shown`` (cold start, simulated annotator,
        `alflow resume --skip-rest`, a file without a prelabel column).
        """
        row = self.query_df(
            """WITH latest AS (SELECT label, prelabel_shown AS shown FROM batch_answers WHERE batch_id = ?)
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

    def batch_answer_history(self, batch_id: str) -> pd.DataFrame:
        """Every answer given in a batch, by item rank then oldest first, with one row of
        NULL answer columns for an item nobody answered there: rank, item_id, effective
        (the item's effective label now, from ``effective_labels``: NULL while it has none),
        label_id, annotator, label, origin, created_at, prelabel_shown, seconds,
        form_seconds, decisive (from ``answers``) and current (the annotator's answer that
        holds in this batch, from ``batch_answers``; false for one they replaced)."""
        return self.query_df(
            """SELECT bi.rank, bi.item_id, e.label AS effective, a.label_id, a.annotator, a.label, a.origin,
                      a.created_at, a.prelabel_shown, a.seconds, a.form_seconds, a.decisive,
                      coalesce(a.label_id IN (SELECT label_id FROM batch_answers WHERE batch_id = ?), false)
                          AS current
            FROM batch_items bi
            LEFT JOIN answers a ON a.batch_id = bi.batch_id AND a.item_id = bi.item_id
            LEFT JOIN effective_labels e ON e.item_id = bi.item_id
            WHERE bi.batch_id = ?
            ORDER BY bi.rank, a.label_id""",
            [batch_id, batch_id],
        )

    def labels(self) -> pd.DataFrame:
        """Every label row, oldest first (the append-only history)."""
        return self.query_df("SELECT * FROM labels ORDER BY label_id")

    def training_set(self, holdout_fraction: float | None = None,
                     control_trains: bool = True) -> tuple[pd.DataFrame, int]:
        """Effective labels joined to item text: (frame[item_id, doc, label], label_watermark).

        The watermark is the highest label_id the set was derived from, so a model row can
        say exactly which labels trained it. ``control_trains=False`` leaves the control
        slice's items out (``control_answers``): they stay a test set no model trained on.
        """
        control = "" if control_trains else "AND e.item_id NOT IN (SELECT item_id FROM control_answers)"
        with self.connect() as con:
            watermark = con.execute("SELECT coalesce(max(label_id), 0) FROM labels").fetchone()[0]
            frame = con.execute(
                f"""SELECT e.item_id, {DOC_SQL} AS doc, e.label FROM effective_labels e
                JOIN items i USING (item_id) WHERE NOT {holdout_sql(holdout_fraction)} {control}
                ORDER BY e.item_id"""
            ).df()
        return frame, int(watermark)

    def item_states(self, adjudication_threshold: float, holdout_fraction: float | None = None,
                    adjudication_distance: float | None = None) -> pd.DataFrame:
        """Where each stored item is, exactly one state each: ``open_batch`` (asked in an
        open batch), ``held_out`` (the gold holdout), ``awaiting_adjudication`` (its votes
        tie or disagree above ``adjudication_threshold``, or ``adjudication_distance`` for tag
        sets, no decision yet), ``labeled`` (it
        has an effective label), ``skipped`` (answered, but only skips), else ``pool``.
        Columns item_id, state."""
        pending = self.needs_adjudication(adjudication_threshold, adjudication_distance)[["item_id"]]
        with self.connect() as con:
            con.register("pending", pending)
            return con.execute(
                f"""SELECT i.item_id, CASE
                    WHEN i.item_id IN (SELECT bi.item_id FROM batch_items bi JOIN batches b USING (batch_id)
                                       WHERE b.status = 'open') THEN 'open_batch'
                    WHEN {holdout_sql(holdout_fraction)} THEN 'held_out'
                    WHEN i.item_id IN (SELECT item_id FROM pending) THEN 'awaiting_adjudication'
                    WHEN i.item_id IN (SELECT item_id FROM effective_labels) THEN 'labeled'
                    WHEN i.item_id IN (SELECT item_id FROM labels) THEN 'skipped'
                    ELSE 'pool' END AS state
                FROM items i ORDER BY i.item_id"""
            ).df()
