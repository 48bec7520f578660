"""Issue 20: labels mean what a person chose.

Each numbered finding of the issue has a test here that fails on the code before the fix
(the model-based test of the rules is tests/test_label_rules_model.py), and the last test
is a reviewer who accepts whatever the form preselects, through the real Prefect form, for
several cycles.
"""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
from conftest import AG_NEWS_CSV, write_config
from typer.testing import CliRunner

from alflow.config import SKIP, load_config
from alflow.flows.cli import app
from alflow.tasks.query import query_batch
from alflow.tasks.review import (
    build_review_form,
    field_name,
    form_seconds_per_item,
    label_studio_tasks,
    record_review_form,
    review_round_items,
)
from alflow.tasks.store import Answer, Store

runner = CliRunner()
CLASSES = ["ham", "spam"]


@pytest.fixture
def project(tmp_path: Path, small_csv: Path, monkeypatch):
    """300 SMS rows, batches of 6 with two control items each; no Prefect run needed."""
    monkeypatch.setenv("ALFLOW_QUERY__CONTROL_SHARE", "0.34")
    config = write_config(tmp_path, labels=CLASSES, source_path=small_csv, batch_size=6)
    settings = load_config(config)
    store = Store(settings.database)
    assert runner.invoke(app, ["ingest", "--config", str(config), "--no-progress"]).exit_code == 0
    return config, settings, store


def other(label: str) -> str:
    return "spam" if label == "ham" else "ham"


def key_for(label: str) -> str:
    return str(CLASSES.index(label) + 1)


def picks(item_ids, picked_by, prelabels=None) -> pd.DataFrame:
    n = len(item_ids)
    prelabels = prelabels if prelabels is not None else [None] * n
    return pd.DataFrame({"item_id": list(item_ids), "rank": range(1, n + 1), "score": 0.5, "prelabel": prelabels,
                         "confidence": [0.9 if p else np.nan for p in prelabels], "picked_by": picked_by})


def pool_ids(store: Store, n: int, offset: int = 0) -> list[str]:
    return store.query_df(f"SELECT item_id FROM items i WHERE {store._pool_where(None)} ORDER BY item_id "
                          "LIMIT ? OFFSET ?", [n, offset])["item_id"].tolist()


def status(config) -> dict:
    result = runner.invoke(app, ["status", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- 1. the control slice is blind ----------------------------------------------------------
def test_1_control_items_show_no_prelabel_anywhere(project, tmp_path):
    """A control item carries no pre-label in the store; its form field has no default and
    no model figure in its title; its export cell is blank with or without --blank, and so
    is its picked_by; Label Studio gets no prediction for it; Enter does not answer it."""
    config, settings, store = project
    active_learning = query_batch(store, settings, None, flow_run_id=None)  # a cold start: a model next
    store.record_labels([Answer(i, g if g in CLASSES else SKIP) for i, g in
                         store.gold_labels(store.batch_items(active_learning)["item_id"].tolist()).items()],
                        annotator="ana", origin="cli", batch_id=active_learning, close_batch="labeled")
    # a batch queried with a model: give its active picks pre-labels by hand (model v1's)
    batch_id = store.create_batch(None, "margin", 1, pd.concat([
        picks(pool_ids(store, 3), "margin", ["spam", "ham", "spam"]),
        picks(pool_ids(store, 2, offset=3), "control"),
    ], ignore_index=True).assign(rank=range(1, 6)))
    items = store.batch_items(batch_id)
    control = items[items["picked_by"] == "control"]
    assert len(control) == 2 and control["prelabel"].isna().all() and control["confidence"].isna().all()

    form = build_review_form(items, CLASSES, 200, "ana")
    schema = form.model_json_schema()
    for row in items.itertuples(index=False):
        spec = schema["properties"][field_name(row.rank)]
        if row.picked_by == "control":
            assert "default" not in spec and field_name(row.rank) in schema["required"]
            assert spec["title"] == f"#{row.rank} · {row.source} · no pre-label"  # like a cold start's
        else:
            assert spec["default"] == row.prelabel and "%" in spec["title"]

    for blank in (False, True):
        path = tmp_path / f"export-{blank}.csv"
        args = ["export", str(path), "--config", str(config)] + (["--blank"] if blank else [])
        assert runner.invoke(app, args).exit_code == 0
        frame = pd.read_csv(path, keep_default_na=False).set_index("item_id")
        for item in control["item_id"]:
            assert frame.loc[item, ["label", "prelabel", "confidence", "picked_by"]].tolist() == ["", "", "", ""]
        assert set(frame["picked_by"]) == {""}  # margin and control look alike
    tasks = label_studio_tasks(store, batch_id, items)
    by_item = {t["data"]["item_id"]: t for t in tasks}
    assert all(by_item[i]["predictions"] == [] for i in control["item_id"])
    assert all(by_item[i]["predictions"] for i in items.loc[items["picked_by"] == "margin", "item_id"])
    assert {t["data"]["picked_by"] for t in tasks} == {""}

    # the terminal: Enter accepts the three pre-labels, then does nothing on a control item
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "bo", "--no-resume"], input="\r\r\r\r\rq")
    assert result.exit_code == 0, result.output
    assert "this item has no pre-label" in result.output and "Stopped; 3 answers saved." in result.output
    answered = store.query_df("SELECT item_id FROM labels WHERE batch_id = ?", [batch_id])["item_id"]
    assert not set(answered) & set(control["item_id"])


# -- 2. rechecks (and adjudications) have no default -----------------------------------------
def test_2_a_recheck_shows_the_answers_and_the_suggestion_and_preselects_nothing(project, tmp_path):
    """An untouched Resume cannot flip a human label to the model's guess: the recheck's
    field is required, its description shows who answered what and the model's suggestion;
    export and Label Studio pre-fill nothing; Enter does not accept the suggestion; a
    changed answer is a correction and decides."""
    config, settings, store = project
    [item] = pool_ids(store, 1)
    first = store.create_batch(None, "margin", 1, picks([item], "margin", ["ham"]))
    store.record_labels([Answer(item, "ham", "ham")], annotator="ana", origin="cli", batch_id=first,
                        close_batch="labeled")
    recheck = store.create_batch(None, "margin", 1, picks([item], "recheck", ["spam"]))
    items = store.batch_items(recheck)
    form = build_review_form(items, CLASSES, 200, "ana", given=store.answers_given([item]))
    spec = form.model_json_schema()["properties"][field_name(1)]
    assert "default" not in spec and spec["title"] == f"RECHECK #1 · {items['source'].iloc[0]}"
    described = spec["description"].replace("\\", "")  # as the UI renders its Markdown
    assert "Given: ana: ham" in described and "the model suggests spam" in described

    path = tmp_path / "recheck.csv"
    assert runner.invoke(app, ["export", str(path), "--config", str(config)]).exit_code == 0
    row = pd.read_csv(path, keep_default_na=False).iloc[0]
    assert row["label"] == "" and row["picked_by"] == "recheck" and "the model suggests spam" in row["answers"]
    assert label_studio_tasks(store, recheck, items)[0]["predictions"] == []

    result = runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"], input="\rq")
    assert "this item has no pre-label" in result.output and "Stopped; 0 answers saved." in result.output
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"],
                           input=key_for("spam"))
    assert result.exit_code == 0 and "Asked again: the label check doubts" in result.output, result.output
    history = store.query_df("SELECT label, prelabel_shown FROM labels WHERE item_id = ? ORDER BY label_id", [item])
    assert history.values.tolist() == [["ham", "ham"], ["spam", "spam"]]  # a correction, nothing overwritten
    assert store.query_df("SELECT label FROM effective_labels WHERE item_id = ?", [item])["label"].item() == "spam"


# -- 3. a replayed round is recorded once ----------------------------------------------------
def test_3_a_replayed_round_does_not_undo_a_correction_made_between_rounds(project, tmp_path):
    config, settings, store = project
    batch_id = store.create_batch("run-1", "margin", 1, picks(pool_ids(store, 3), "margin", ["ham", "ham", "spam"]))
    items = review_round_items(store, batch_id, 1)
    form = build_review_form(items, CLASSES, 200, "ana")
    values = {field_name(r.rank): r.prelabel for r in items.itertuples()} | {"annotator": "ana"}
    assert record_review_form(store, form, values, items, batch_id, "run-1", 1).new == 3
    # ana corrects item 1 from a file after the run recorded her form (--late: the batch closed)
    path = tmp_path / "fix.csv"
    pd.DataFrame({"item_id": [items["item_id"][0]], "label": ["spam"], "annotator": ["ana"]}).to_csv(path, index=False)
    fixed = runner.invoke(app, ["import", str(path), "--config", str(config), "--batch", batch_id, "--late"])
    assert fixed.exit_code == 0 and "1 corrections" in fixed.output, fixed.output
    before = store.labels()
    replay = record_review_form(store, form, values, items, batch_id, "run-1", 1)  # the run replayed
    assert replay.replayed and replay.summary().startswith("recorded before")
    assert store.labels().equals(before)
    assert store.query_df("SELECT label FROM effective_labels WHERE item_id = ?",
                          [items["item_id"][0]])["label"].item() == "spam"
    assert store.scalar("SELECT count(*) FROM review_rounds WHERE batch_id = ?", [batch_id]) == 1


# -- 4. each control item counts once -------------------------------------------------------
def test_4_the_control_estimate_counts_each_item_once_from_live_batches_only(project):
    config, settings, store = project
    x, y = pool_ids(store, 2)
    expired = store.create_batch(None, "margin", 1, picks([x], "control"))
    store.close_batch(expired, "expired")  # x drawn, never answered: back to the pool
    live = store.create_batch(None, "margin", 1, picks([x], "control"))
    store.record_labels([Answer(x, SKIP)], annotator="ana", origin="cli", batch_id=live)   # a skip does not count
    store.record_labels([Answer(x, "ham")], annotator="bo", origin="cli", batch_id=live)   # the first answer does
    store.record_labels([Answer(x, "spam")], annotator="cy", origin="cli", batch_id=live)  # later ones do not,
    store.record_labels([Answer(x, "spam")], annotator="dd", origin="cli", batch_id=live)  # though they win the vote
    store.close_batch(live, "labeled")
    dead = store.create_batch(None, "margin", 1, picks([y], "control"))
    store.record_labels([Answer(y, "ham")], annotator="ana", origin="cli", batch_id=dead)
    store.close_batch(dead, "expired")  # its answer is kept (it trains) but estimates nothing
    control = store.query_df("SELECT item_id, batch_id, label, annotator FROM control_answers")
    assert control.values.tolist() == [[x, live, "ham", "bo"]]
    assert store.query_df("SELECT label FROM effective_labels WHERE item_id = ?", [x])["label"].item() == "spam"
    trained, _ = store.training_set(None, control_trains=False)
    assert y in set(trained["item_id"]) and x not in set(trained["item_id"])  # a control item never trains


# -- 5, 6, 10. adjudications: a skip sends the item back; a later recheck decides ------------
def test_5_6_10_a_skipped_adjudication_goes_back_and_a_recheck_after_one_decides(project, tmp_path):
    config, settings, store = project
    [item] = pool_ids(store, 1)
    first = store.create_batch(None, "margin", 1, picks([item], "margin", ["ham"]))
    store.record_labels([Answer(item, "ham")], annotator="ana", origin="cli", batch_id=first)
    store.record_labels([Answer(item, "spam")], annotator="bo", origin="cli", batch_id=first, close_batch="labeled")
    report = status(config)
    assert (report["labeled"], report["tied"], report["skipped"], report["adjudicated"]) == (0, 1, 0, 0)

    adjudicate = query_batch(store, settings, None, flow_run_id=None)
    asked = store.batch_items(adjudicate)
    assert asked["picked_by"].iloc[0] == "adjudication" and asked["item_id"].iloc[0] == item
    store.close_batch(adjudicate, "expired")  # nobody reviewed it
    skipped = store.create_batch(None, "margin", None, picks([item], "adjudication"))
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "cy", "--no-resume"], input="s")
    assert result.exit_code == 0, result.output
    store.close_batch(skipped, "labeled")
    assert store.needs_adjudication(settings.review.adjudication_threshold)["item_id"].tolist() == [item]
    assert status(config)["tied"] == 1  # still waiting for a decision, not lost
    states = store.item_states(settings.review.adjudication_threshold)
    assert states.set_index("item_id")["state"][item] == "awaiting_adjudication"

    decided = store.create_batch(None, "margin", None, picks([item], "adjudication"))
    runner.invoke(app, ["label", "--config", str(config), "-a", "cy", "--no-resume"], input=key_for("ham"))
    store.close_batch(decided, "labeled")
    report = status(config)
    assert (report["labeled"], report["tied"], report["adjudicated"]) == (1, 0, 1)
    # a recheck, by the adjudicator herself, changes the decision
    store.create_batch(None, "margin", 2, picks([item], "recheck", ["spam"]))
    runner.invoke(app, ["label", "--config", str(config), "-a", "cy", "--no-resume"], input=key_for("spam"))
    assert store.query_df("SELECT label FROM effective_labels WHERE item_id = ?", [item])["label"].item() == "spam"


# -- 8. a form's wait is not labeling time ---------------------------------------------------
def test_8_a_form_left_open_over_a_weekend_spends_no_labeling_budget(project, monkeypatch):
    config, settings, store = project
    config.write_text(config.read_text().replace("[evaluation]", "[stopping]\nbudget_minutes = 1\n\n[evaluation]"))
    batch_id = store.create_batch("run-1", "margin", 1, picks(pool_ids(store, 20), "margin", ["ham"] * 20))
    items = review_round_items(store, batch_id, 1)
    form = build_review_form(items, CLASSES, 200, "ana")
    values = {field_name(r.rank): r.prelabel for r in items.itertuples()} | {"annotator": "ana"}
    share = form_seconds_per_item(60 * 3600, len(items), settings.review.max_form_seconds_per_item)
    assert share == 120.0  # 60 hours over 20 items, capped
    record_review_form(store, form, values, items, batch_id, "run-1", 1, form_seconds=share)
    rows = store.query_df("SELECT seconds, form_seconds FROM labels")
    assert rows["seconds"].isna().all() and (rows["form_seconds"] == 120.0).all()
    rules = {r["rule"]: r for r in status(config)["stopping"]["rules"]}
    assert not rules["budget_minutes"]["fired"] and rules["budget_minutes"]["value"] is None


# -- 9. late answers -------------------------------------------------------------------------
def test_9_answers_for_an_expired_batch_need_late_and_take_the_item_out_of_an_open_batch(project, tmp_path):
    config, settings, store = project
    x, y = pool_ids(store, 2)
    old = store.create_batch(None, "margin", 1, picks([x, y], "margin", ["ham", "ham"]))
    store.close_batch(old, "expired")
    new = store.create_batch(None, "margin", 1, picks([x, y], "margin", ["ham", "ham"]))
    path = tmp_path / "late.csv"
    pd.DataFrame({"item_id": [x], "label": ["spam"]}).to_csv(path, index=False)
    refused = runner.invoke(app, ["import", str(path), "--config", str(config), "--batch", old])
    assert refused.exit_code == 1 and f"batch {old} is expired since" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and store.labels().empty
    terminal = runner.invoke(app, ["label", "--config", str(config), "--batch", old, "--no-resume"], input="q")
    assert terminal.exit_code == 1 and "pass --late" in terminal.output
    late = runner.invoke(app, ["import", str(path), "--config", str(config), "--batch", old, "--late"])
    assert late.exit_code == 0 and "1 taken out of an open batch (answered late)" in late.output, late.output
    assert store.batch_items(new)["item_id"].tolist() == [y]  # x is not asked again


# -- 11. one cycles row per batch ------------------------------------------------------------
def test_11_a_rerun_cycle_records_no_second_cycles_row(project):
    config, settings, store = project
    batch_id = store.create_batch("run-1", "margin", None, picks(pool_ids(store, 1), "margin", ["ham"]))
    first = store.record_cycle("run-1", batch_id, None, "margin", 0, None, False)
    again = store.record_cycle("run-2", batch_id, None, "margin", 0, None, False)
    assert first == again and len(store.cycles()) == 1


# -- 12. promotion under CV and pool-fitted features ------------------------------------------
def test_12_promotion_compares_on_items_first_labeled_after_the_incumbent(project, monkeypatch):
    from alflow.tasks.train import retrain

    monkeypatch.setenv("ALFLOW_EVALUATION__METHOD", "cv")
    monkeypatch.setenv("ALFLOW_MODEL__SELF_TRAINING", "0")
    config, _, store = project
    settings = load_config(config)
    gold = store.query_df("SELECT item_id, gold_label FROM items ORDER BY item_id")
    ham, spam = gold[gold["gold_label"] == "ham"], gold[gold["gold_label"] == "spam"]
    first = pd.concat([ham.iloc[:12], spam.iloc[:8]])
    store.record_labels([Answer(i, g) for i, g in first.values], annotator="ana", origin="cli")
    v1 = retrain(store, settings)
    assert v1.model_version == 1
    fresh = pd.concat([ham.iloc[12:18], spam.iloc[8:12]])
    store.record_labels([Answer(i, g) for i, g in fresh.values], annotator="ana", origin="cli")
    reasked = first["item_id"].iloc[0]  # a recheck of an item v1 trained on
    recheck = store.create_batch(None, "margin", 1, picks([reasked], "recheck", ["spam"]))
    store.record_labels([Answer(reasked, "spam")], annotator="bo", origin="cli", batch_id=recheck)
    v2 = retrain(store, settings)
    assert v2.metrics["promotion"]["compared_on"] == len(fresh)  # not the re-asked item


def test_12_cross_validation_with_pool_features_refits_them_per_fold():
    """No fold is scored with features that have read its test items."""
    from sklearn.model_selection import StratifiedKFold

    from alflow.config import ModelSettings
    from alflow.tasks import modeling

    settings = ModelSettings(vectorizer_fit="pool", self_training=0)
    frame = pd.read_csv(AG_NEWS_CSV).head(120)
    docs, labels = frame["text"].tolist(), frame["label"].tolist()
    vocabulary = pd.read_csv(AG_NEWS_CSV)["text"].iloc[400:600].tolist()
    splitter = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    got = modeling.out_of_fold(settings, docs, labels, splitter, 0, vocabulary)
    expected = np.empty(len(docs), dtype=object)
    for train, test in splitter.split(docs, labels):
        features = modeling.fit_features(settings, vocabulary + [docs[i] for i in train], 0)
        model = modeling.fit(settings, [docs[i] for i in train], [labels[i] for i in train], features=features)
        expected[test] = model.predict([docs[i] for i in test])
    assert list(got) == list(expected)


# -- the target rule reads the interval's lower bound ----------------------------------------
def test_the_target_rule_fires_on_the_lower_bound_unless_told_the_point(project):
    from alflow.tasks.stopping import evaluate_rules

    config, settings, store = project
    counts = store.counts(None)
    control = {"model_version": 3, "n": 60, "correct": 58, "accuracy": 0.967, "low": 0.886, "high": 0.991,
               "metric": "accuracy", "value": 0.967, "value_low": 0.886, "value_high": 0.991, "note": None}
    for bound, fired in (("lower", False), ("point", True)):
        s = settings.model_copy(update={"stopping": settings.stopping.model_copy(
            update={"target": 0.95, "target_min_control": 30, "target_bound": bound})})
        [target] = [r for r in evaluate_rules(s, counts, None, control, [], None) if r["rule"] == "target"]
        assert target["fired"] is fired and target["value"] == (0.886 if bound == "lower" else 0.967)
        assert ("lower bound 0.886" if bound == "lower" else "point estimate 0.967") in target["detail"]
        assert "model v3" in target["detail"]


# -- the path real reviewers take: accept what is preselected -------------------------------
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_a_reviewer_who_accepts_defaults_cannot_inflate_the_control_estimate(tmp_path, monkeypatch):
    """Through the real Resume form of paused runs, four cycles on AG News (4 classes):
    the reviewer leaves a preselected field as it is with probability 0.8 and otherwise
    answers the gold label; a field with nothing preselected gets the gold label. The
    control estimate's 95% interval holds the newest model's true accuracy on the items it
    never trained on, though a fifth of the training labels are wrong; rechecks and
    adjudications are answered with the gold label wherever the reviewer answered."""
    from prefect.flow_runs import resume_flow_run
    from test_annotators import paused_form
    from test_flows import FlowThread, wait_until_paused
    from test_label_quality import model_accuracy_off_training

    from alflow.flows.cycle import active_learning_cycle

    monkeypatch.setenv("ALFLOW_QUERY__CONTROL_SHARE", "0.5")
    config = write_config(tmp_path, labels=["world", "sports", "business", "scitech"], source_path=AG_NEWS_CSV,
                          title_column="title", batch_size=20, evaluation="cv")
    store = Store(load_config(config).database)
    rng = np.random.default_rng(20)
    accepted = wrong = 0
    for cycle in range(4):
        flow = FlowThread(active_learning_cycle, str(config), ingest_sources=cycle == 0)
        batch = wait_until_paused(store)
        schema = paused_form(batch["flow_run_id"], "review")
        items = store.batch_items(batch["batch_id"])
        gold = store.gold_labels(items["item_id"].tolist())
        values = {"annotator": "ana"}
        for row in items.itertuples(index=False):
            spec = schema["properties"][field_name(row.rank)]
            if row.picked_by in ("control", "recheck", "adjudication"):
                assert "default" not in spec, (row.picked_by, spec)  # blind, or asked again: nothing preselected
            if "default" in spec and rng.random() < 0.8:
                values[field_name(row.rank)] = spec["default"]
                accepted += 1
                wrong += spec["default"] != gold[row.item_id]
            else:
                values[field_name(row.rank)] = gold[row.item_id]
        if cycle == 1:  # the exported file of the real paused run: control cells blank, with or without --blank
            path = tmp_path / "paused.csv"
            assert runner.invoke(app, ["export", str(path), "--config", str(config)]).exit_code == 0
            exported = pd.read_csv(path, keep_default_na=False).set_index("item_id")
            blind = items.loc[items["picked_by"] == "control", "item_id"]
            assert len(blind) >= 5 and (exported.loc[blind, ["label", "prelabel", "picked_by"]] == "").all().all()
        resume_flow_run(UUID(batch["flow_run_id"]), run_input=values)
        flow.join()
        assert flow.error is None, flow.error
    assert accepted >= 15 and wrong >= 5  # automation bias did reach the training labels

    estimate = status(config)["control"]
    newest = int(store.scalar("SELECT max(model_version) FROM models"))
    assert estimate["model_version"] == newest and estimate["n"] >= 35
    trained, _ = store.training_set(None, control_trains=False)
    truth = model_accuracy_off_training(store, config, newest, set(trained["item_id"]))
    print(f"control estimate {estimate['accuracy']:.3f} [{estimate['low']:.3f}, {estimate['high']:.3f}] "
          f"on {estimate['n']}; truth {truth:.3f}; {wrong} of {accepted} accepted defaults wrong")
    assert estimate["low"] <= truth <= estimate["high"], (estimate, truth)
    reasked = store.query_df(
        """SELECT l.item_id, l.label, i.gold_label FROM labels l JOIN batch_items bi USING (batch_id, item_id)
        JOIN items i USING (item_id) WHERE bi.picked_by IN ('recheck', 'adjudication')""")
    assert (reasked["label"] == reasked["gold_label"]).all()
