"""A model-based test of the label rules (issue 20): what a team does, in any order, against
a plain-Python model of the rules.

Steps: open a batch (active picks with a pre-label, blind control picks, adjudications of
tied items, rechecks of labeled items); show its Resume form and, later, submit it with some
fields left at their defaults; replay a submitted round (a suspended run resumed twice);
import a file (into a closed batch too, with and without ``--late``); answer in the
terminal; expire a batch; skip the rest (``alflow resume --skip-rest``). After every step:

* no answer row ever given is gone or changed, and none is written that the rules do not write;
* every item's effective label is the model's;
* every item is in exactly one state (pool, open batch, labeled, skipped, awaiting
  adjudication) and it is the model's;
* the control estimate's answers are exactly the eligible control answers (each item once).

Examples: 25 in CI; ``ALFLOW_MODEL_TEST_EXAMPLES=500`` for a longer hunt.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import SMS_CSV, write_config
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from alflow.config import SKIP, load_config
from alflow.connectors import Record, to_row
from alflow.tasks.review import (
    ADJUDICATION,
    ReviewError,
    build_review_form,
    field_name,
    import_answers,
    record_answer,
    record_review_form,
    review_round_items,
    skip_unanswered,
)
from alflow.tasks.store import BatchClosedError, Store

CLASSES = ["ham", "spam"]  # two classes and few items: ties, adjudications and rechecks come often
ANNOTATORS = ["ana", "bo", "cy"]
ANSWERS = CLASSES + [SKIP]
N_ITEMS = 5
THRESHOLD = 0.5
REASKED = ("adjudication", "recheck")
EXAMPLES = int(os.environ.get("ALFLOW_MODEL_TEST_EXAMPLES", "25"))

_ROOT = Path(tempfile.mkdtemp(prefix="alflow-model-"))
_CONFIG = write_config(_ROOT, labels=CLASSES, source_path=SMS_CSV)
SETTINGS = load_config(_CONFIG)
_TEMPLATE = _ROOT / "template.duckdb"
_template = Store(_TEMPLATE)
_template.migrate()
_template.upsert_items(pd.DataFrame([to_row(Record(text=f"message number {k}"), "t") for k in range(N_ITEMS)]), "i1")
ITEM_IDS = sorted(_template.query_df("SELECT item_id FROM items")["item_id"])


class Model:
    """The rules, in plain Python, over the answers given so far."""

    def __init__(self):
        self.rows: list[dict] = []  # in label_id order: item, annotator, label, batch, origin
        self.batches: dict[str, dict] = {}  # batch_id -> {status, items: {item: picked_by}}

    # -- what an answer row is ---------------------------------------------------------
    def picked_by(self, batch, item):
        return self.batches.get(batch, {}).get("items", {}).get(item) if batch else None

    def decisive(self, row) -> bool:
        return row["origin"] == "adjudication" or self.picked_by(row["batch"], row["item"]) in REASKED

    def own(self, batch, item, annotator):
        mine = [r for r in self.rows if r["batch"] == batch and r["item"] == item and r["annotator"] == annotator]
        return mine[-1]["label"] if mine else None

    def in_batch(self, batch, item) -> bool:
        return any(r["batch"] == batch and r["item"] == item for r in self.rows)

    # -- writes (Store.record_labels) --------------------------------------------------
    def write(self, batch, answers, defaults=None, late=False) -> list[str]:
        """answers: (item, annotator, label, origin); returns the items written."""
        written = []
        for item, annotator, label, origin in answers:
            if defaults is not None and label == defaults.get(item) and self.in_batch(batch, item):
                continue  # an untouched default keeps what is stored
            if self.own(batch, item, annotator) == label:
                continue  # a duplicate
            self.rows.append({"item": item, "annotator": annotator, "label": label, "batch": batch, "origin": origin})
            written.append(item)
        if late and written:
            for other, b in self.batches.items():
                if other != batch and b["status"] == "open":
                    for item in written:
                        if item in b["items"] and not self.in_batch(other, item):
                            del b["items"][item]
        return written

    # -- the derived views -------------------------------------------------------------
    def votes(self, item) -> dict[str, str]:
        latest = {}
        for r in self.rows:
            if r["item"] == item and not self.decisive(r):
                latest[r["annotator"]] = r["label"]
        return {a: v for a, v in latest.items() if v != SKIP}

    def tally(self, item) -> list[tuple[str, int]]:
        counts: dict[str, int] = {}
        for v in self.votes(item).values():
            counts[v] = counts.get(v, 0) + 1
        return sorted(counts.items(), key=lambda kv: -kv[1])

    def decision(self, item):
        decided = [r for r in self.rows if r["item"] == item and self.decisive(r) and r["label"] != SKIP]
        return decided[-1]["label"] if decided else None

    def effective(self, item):
        decided = self.decision(item)
        if decided is not None:
            return decided
        tally = self.tally(item)
        if tally and (len(tally) == 1 or tally[0][1] > tally[1][1]):
            return tally[0][0]
        return None

    def in_open_batch(self, item) -> bool:
        return any(b["status"] == "open" and item in b["items"] for b in self.batches.values())

    def awaiting(self, item) -> bool:
        tally = self.tally(item)
        n = sum(c for _, c in tally)
        if n < 2 or self.decision(item) is not None or self.in_open_batch(item):
            return False
        tie = len(tally) > 1 and tally[0][1] == tally[1][1]
        return tie or 1 - tally[0][1] / n > THRESHOLD

    def state(self, item) -> str:
        if self.in_open_batch(item):
            return "open_batch"
        if self.awaiting(item):
            return "awaiting_adjudication"
        if self.effective(item) is not None:
            return "labeled"
        if any(r["item"] == item for r in self.rows):
            return "skipped"
        return "pool"

    def control_items(self) -> set[str]:
        return {r["item"] for r in self.rows
                if r["label"] != SKIP and self.batches.get(r["batch"], {}).get("status", "expired") != "expired"
                and self.picked_by(r["batch"], r["item"]) == "control"}


class LabelRules(RuleBasedStateMachine):
    """What a team does to batches, in any order."""

    @initialize()
    def start(self):
        self.folder = Path(tempfile.mkdtemp(prefix="case-", dir=_ROOT))
        shutil.copy(_TEMPLATE, self.folder / "alflow.duckdb")
        self.store = Store(self.folder / "alflow.duckdb", lock_timeout=10)
        self.held = self.store.held()  # one open database per example: each step's reads cost ~1 ms
        self.held.__enter__()
        self.model = Model()
        self.shown: dict[str, tuple] = {}  # batch -> (form, frame) shown and not submitted yet
        self.submitted: dict[str, tuple] = {}  # batch -> (form, values, frame) of its recorded round 1
        self.files = 0

    def teardown(self):
        if hasattr(self, "held"):
            self.held.__exit__(None, None, None)
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------
    # Batches in the order they were opened (their ids are random: drawing from a sorted
    # list of them would make the same example draw differently).
    def open_ids(self) -> list[str]:
        return [b for b, v in self.model.batches.items() if v["status"] == "open"]

    def origin_of(self, batch, item, default):
        return ADJUDICATION if self.model.picked_by(batch, item) == ADJUDICATION else default

    # -- steps ---------------------------------------------------------------------------
    @rule(data=st.data())
    def open_batch(self, data):
        m = self.model
        pool = [i for i in ITEM_IDS if m.state(i) == "pool"]
        waiting = [i for i in ITEM_IDS if m.state(i) == "awaiting_adjudication"]
        labeled = [i for i in ITEM_IDS if m.state(i) == "labeled"]
        picks = []
        for item in data.draw(st.lists(st.sampled_from(pool), max_size=3, unique=True) if pool else st.just([])):
            control = data.draw(st.booleans())
            picks.append((item, "control" if control else "margin",
                          None if control else data.draw(st.sampled_from(CLASSES))))
        for item in waiting[:2]:
            picks.append((item, "adjudication", None))
        if labeled and data.draw(st.booleans()):
            picks.append((data.draw(st.sampled_from(labeled)), "recheck", data.draw(st.sampled_from(CLASSES))))
        if not picks:
            return
        frame = pd.DataFrame({"item_id": [p[0] for p in picks], "rank": range(1, len(picks) + 1), "score": 0.5,
                              "prelabel": [p[2] for p in picks], "confidence": [0.7 if p[2] else None for p in picks],
                              "picked_by": [p[1] for p in picks]})
        batch_id = self.store.create_batch(None, "margin", 1, frame)
        m.batches[batch_id] = {"status": "open", "items": {p[0]: p[1] for p in picks}}

    @precondition(lambda self: any(b not in self.shown and b not in self.submitted for b in self.open_ids()))
    @rule(data=st.data())
    def show_form(self, data):
        """The run stops for review: its form is built from what the store holds now."""
        batch_id = data.draw(st.sampled_from([b for b in self.open_ids()
                                              if b not in self.shown and b not in self.submitted]))
        frame = review_round_items(self.store, batch_id, 1)
        given = self.store.answers_given(frame.loc[frame["picked_by"].isin(REASKED), "item_id"].tolist())
        form = build_review_form(frame, CLASSES, 200, "ana", given=given)
        for row in frame.itertuples(index=False):
            field = form.model_fields[field_name(row.rank)]
            answered = isinstance(row.answer, str)
            if row.picked_by in ("control",) + REASKED and not answered:
                assert field.is_required(), (row.picked_by, field)  # blind / no default: the reviewer chooses
            elif not answered:
                assert field.default == row.prelabel  # an active pick offers its pre-label
        self.shown[batch_id] = (form, frame)

    @precondition(lambda self: bool(self.shown))
    @rule(data=st.data(), accept=st.floats(0.0, 1.0))
    def submit_form(self, data, accept):
        """Resume pressed: fields with a default are left at it with probability ``accept``."""
        batch_id = data.draw(st.sampled_from([b for b in self.model.batches if b in self.shown]))
        form, frame = self.shown.pop(batch_id)
        who = data.draw(st.sampled_from(ANNOTATORS))
        values, defaults = {"annotator": who}, {}
        for row in frame.itertuples(index=False):
            field = form.model_fields[field_name(row.rank)]
            default = None if field.is_required() else field.default
            defaults[row.item_id] = default
            keep = default is not None and data.draw(st.floats(0.0, 1.0)) < accept
            values[field_name(row.rank)] = default if keep else data.draw(st.sampled_from(ANSWERS))
        expect_closed = self.model.batches[batch_id]["status"] != "open"
        still = [r for r in frame.itertuples(index=False) if r.item_id in self.model.batches[batch_id]["items"]]
        try:
            written = record_review_form(self.store, form, values, frame, batch_id, "run-1", 1, form_seconds=30.0)
        except BatchClosedError:
            assert expect_closed and still
            return
        assert not written.replayed
        answers = [(r.item_id, who, values[field_name(r.rank)], self.origin_of(batch_id, r.item_id, "ui"))
                   for r in still]
        self.model.write(batch_id, answers, defaults=defaults)
        b = self.model.batches[batch_id]
        if b["status"] == "open" and all(self.model.in_batch(batch_id, i) for i in b["items"]):
            b["status"] = "labeled"
        self.submitted[batch_id] = (form, values, frame)

    @precondition(lambda self: bool(self.submitted))
    @rule(data=st.data())
    def replay_round(self, data):
        """A suspended run resumed again replays its recorded round: nothing is recorded twice,
        and answers given since (a correction by import) stay."""
        batch_id = data.draw(st.sampled_from([b for b in self.model.batches if b in self.submitted]))
        form, values, frame = self.submitted[batch_id]
        written = record_review_form(self.store, form, values, frame, batch_id, "run-1", 1)
        assert written.replayed and written.new == written.corrections == 0

    @precondition(lambda self: bool(self.model.batches))
    @rule(data=st.data(), late=st.booleans())
    def import_file(self, data, late):
        batch_id = data.draw(st.sampled_from(list(self.model.batches)))
        members = list(self.model.batches[batch_id]["items"])
        if not members:
            return
        chosen = data.draw(st.lists(st.sampled_from(members), min_size=1, max_size=3, unique=True))
        rows = [(i, data.draw(st.sampled_from(ANSWERS)), data.draw(st.sampled_from(ANNOTATORS))) for i in chosen]
        self.files += 1
        path = self.folder / f"answers-{self.files}.csv"
        pd.DataFrame(rows, columns=["item_id", "label", "annotator"]).to_csv(path, index=False)
        closed = self.model.batches[batch_id]["status"] != "open"
        try:
            import_answers(self.store, SETTINGS, path, annotator="nobody", batch_id=batch_id, late=late)
        except ReviewError as exc:
            assert closed and not late and "pass --late" in str(exc)
            return
        assert late or not closed
        self.model.write(batch_id, [(i, who, label, self.origin_of(batch_id, i, "import")) for i, label, who in rows],
                         late=late)

    @precondition(lambda self: bool(self.model.batches))
    @rule(data=st.data(), late=st.booleans())
    def terminal_answer(self, data, late):
        batch_id = data.draw(st.sampled_from(list(self.model.batches)))
        members = list(self.model.batches[batch_id]["items"])
        if not members:
            return
        item = data.draw(st.sampled_from(members))
        who, label = data.draw(st.sampled_from(ANNOTATORS)), data.draw(st.sampled_from(ANSWERS))
        closed = self.model.batches[batch_id]["status"] != "open"
        origin = self.origin_of(batch_id, item, "cli")
        try:
            record_answer(self.store, SETTINGS, batch_id, item, label, who, origin=origin, late=late)
        except BatchClosedError:
            assert closed and not late
            return
        assert late or not closed
        self.model.write(batch_id, [(item, who, label, origin)], late=late)

    @precondition(lambda self: bool(self.open_ids()))
    @rule(data=st.data())
    def expire(self, data):
        batch_id = data.draw(st.sampled_from(self.open_ids()))
        self.store.close_batch(batch_id, "expired")
        self.model.batches[batch_id]["status"] = "expired"

    @precondition(lambda self: bool(self.open_ids()))
    @rule(data=st.data())
    def skip_rest(self, data):
        """`alflow resume --skip-rest`, then the resumed run closes the batch."""
        batch_id = data.draw(st.sampled_from(self.open_ids()))
        who = data.draw(st.sampled_from(ANNOTATORS))
        skip_unanswered(self.store, batch_id, who)
        self.store.close_batch(batch_id, "labeled")
        b = self.model.batches[batch_id]
        self.model.write(batch_id, [(i, who, SKIP, self.origin_of(batch_id, i, "cli"))
                                    for i in b["items"] if not self.model.in_batch(batch_id, i)])
        b["status"] = "labeled"

    # -- what must hold after every step ---------------------------------------------------
    @invariant()
    def answers_are_never_lost_changed_or_invented(self):
        if not hasattr(self, "store"):
            return
        stored = self.store.labels()[["item_id", "annotator", "label", "batch_id"]]
        expected = [(r["item"], r["annotator"], r["label"], r["batch"]) for r in self.model.rows]
        assert list(stored.itertuples(index=False, name=None)) == expected

    @invariant()
    def effective_labels_follow_the_rules(self):
        if not hasattr(self, "store"):
            return
        frame = self.store.query_df("SELECT item_id, label FROM effective_labels")
        got = dict(zip(frame["item_id"], frame["label"]))
        assert len(frame) == len(got)  # one effective label per item
        assert got == {i: self.model.effective(i) for i in ITEM_IDS if self.model.effective(i) is not None}

    @invariant()
    def every_item_is_in_exactly_one_state(self):
        if not hasattr(self, "store"):
            return
        states = self.store.item_states(THRESHOLD)
        assert sorted(states["item_id"]) == ITEM_IDS  # each item once
        assert dict(zip(states["item_id"], states["state"])) == {i: self.model.state(i) for i in ITEM_IDS}

    @invariant()
    def the_control_estimate_counts_each_eligible_answer_once(self):
        if not hasattr(self, "store"):
            return
        control = self.store.query_df("SELECT item_id FROM control_answers")["item_id"]
        assert control.is_unique and set(control) == self.model.control_items()


LabelRules.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=20, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
TestLabelRules = pytest.mark.slow(LabelRules.TestCase)
