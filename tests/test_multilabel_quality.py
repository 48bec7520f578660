"""Label quality of a multi-label project (issue 25): agreement over tag sets (alpha with MASI,
per-tag kappa), adjudication of tag sets farther apart than review.adjudication_distance,
the multi-label label check (cleanlab), the control slice's per-tag and micro F1 with
bootstrap intervals, and the stopping rules on tag sets.

Pure functions on small arrays, checked against scikit-learn / cleanlab / a plain loop; then
ONE module-scoped `alflow run --auto --cycles 2` over 60 sample items, with three annotators'
votes stored before it, read through `alflow status --json` and the store."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DATA
from sklearn.metrics import cohen_kappa_score, f1_score
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app
from alflow.tasks.agreement import agreement_of, krippendorff_alpha_sets
from alflow.tasks.control import bootstrap_interval, tag_metric_rows
from alflow.tasks.label_check import MIN_TAG_CHECK_LABELS, check_tag_labels, find_tag_errors
from alflow.tasks.multilabel.model import out_of_fold_proba
from alflow.tasks.multilabel.tags import format_tags, parse_tags, tag_matrix
from alflow.tasks.stopping import evaluate_rules, stop_set_tag_kappa
from alflow.tasks.store import Answer, Store

runner = CliRunner()
TAGS = ["business", "scitech", "sports", "world"]


# -- pure functions ---------------------------------------------------------------------------
def test_tag_metric_rows_match_scikit_learn_and_bootstrap_a_plain_loop():
    rng = np.random.default_rng(1)
    truth = (rng.random((30, 3)) < 0.4).astype(np.uint8)
    predicted = np.where(rng.random((30, 3)) < 0.8, truth, 1 - truth).astype(np.uint8)
    predicted[:, 2] = 0  # a tag never predicted: its F1 is 0, as scikit-learn's zero_division=0
    one = lambda name, tag=None: float(tag_metric_rows(name, tag)(truth[None], predicted[None])[0])  # noqa: E731
    assert one("micro_f1") == pytest.approx(f1_score(truth, predicted, average="micro", zero_division=0))
    assert one("macro_f1") == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    per_tag = f1_score(truth, predicted, average=None, zero_division=0)
    assert [one("f1", j) for j in range(3)] == pytest.approx(per_tag.tolist())
    assert one("hamming_loss") == pytest.approx((truth != predicted).mean())
    assert one("subset_accuracy") == pytest.approx((truth == predicted).all(axis=1).mean())

    # the batched bootstrap gives what resampling items one by one with scikit-learn gives
    low, high = bootstrap_interval(truth, predicted, tag_metric_rows("micro_f1"), seed=5, resamples=200,
                                   batched=True)
    draws = np.random.default_rng(5).integers(0, 30, size=(200, 30))
    values = [f1_score(truth[d], predicted[d], average="micro", zero_division=0) for d in draws]
    assert (low, high) == pytest.approx((np.quantile(values, 0.025), np.quantile(values, 0.975)))
    assert low < one("micro_f1") < high


def test_find_tag_errors_is_cleanlabs_multi_label_check_and_finds_a_flipped_tag():
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues

    rng = np.random.default_rng(0)
    y = (rng.random((40, 3)) < 0.5).astype(np.uint8)
    proba = np.clip(np.where(y == 1, 0.9, 0.1) + rng.normal(0, 0.03, y.shape), 0.01, 0.99)
    given = y.copy()
    given[[4, 17], [0, 2]] = 1 - given[[4, 17], [0, 2]]  # two wrong tags: the probabilities disagree
    flagged, scores = find_tag_errors(given, proba)
    assert set(flagged.tolist()) == {4, 17}
    lists = [np.flatnonzero(r).tolist() for r in given]
    expected = find_label_issues(lists, proba, filter_by="confident_learning",
                                 return_indices_ranked_by="self_confidence")
    assert flagged.tolist() == list(expected)
    assert scores == pytest.approx(get_label_quality_scores(lists, proba)[flagged])
    with pytest.raises(ValueError, match="y has 2 tag columns, expected 3"):
        find_tag_errors(given[:, :2], proba)


def test_stop_set_tag_kappa_is_the_mean_per_tag_kappa():
    current = ["a;b", "a", "", "b", "a;b", ""]
    before = ["a", "a", "", "b", "b", "a"]
    tags = ["a", "b", "c"]  # c: never predicted by either, no kappa, left out
    has = lambda forms, t: [int(t in parse_tags(v)) for v in forms]  # noqa: E731
    expected = np.mean([cohen_kappa_score(has(current, t), has(before, t)) for t in ("a", "b")])
    assert stop_set_tag_kappa(current, before, tags) == pytest.approx(expected)
    assert stop_set_tag_kappa(["", ""], ["", ""], tags) is None  # no tag has a kappa


def test_the_target_rule_on_hamming_loss_fires_at_or_below_it(tmp_path):
    config = tmp_path / "alflow.toml"
    config.write_text(textwrap.dedent("""
        task = "multi_label"
        labels = ["a", "b"]
        [evaluation]
        metric = "hamming_loss"
        [stopping]
        target = 0.2
        target_min_control = 5
    """))
    settings = load_config(config)
    control = {"n": 10, "model_version": 2, "metric": "hamming_loss", "value": 0.15, "value_low": 0.05,
               "value_high": 0.25, "note": None}
    counts = {"answered": 10}
    target = next(r for r in evaluate_rules(settings, counts, None, control, [], None) if r["rule"] == "target")
    assert not target["fired"] and target["value"] == 0.25 and "upper bound 0.250" in target["detail"]
    control["value_high"] = 0.2
    target = next(r for r in evaluate_rules(settings, counts, None, control, [], None) if r["rule"] == "target")
    assert target["fired"] and "reached the target" in target["detail"]


def test_agreement_of_two_annotators_tag_sets_gives_alpha_masi_and_kappa_per_tag():
    a, b = ["x;y", "x", "", "y", "x;y", "y"], ["x", "x", "", "y", "y", "x;y"]
    answers = pd.DataFrame({"item_id": [f"i{j}" for j in range(6)] * 2, "annotator": ["ana"] * 6 + ["bo"] * 6,
                            "label": a + b, "prelabel_shown": ["x"] * 6 + [None] * 6, "effective": None})
    report = agreement_of(answers, tags=["x", "y", "z"])
    assert report["alpha"] == pytest.approx(krippendorff_alpha_sets([[parse_tags(v) for v in a],
                                                                     [parse_tags(v) for v in b]]), abs=1e-4)
    has = lambda forms, t: [int(t in parse_tags(v)) for v in forms]  # noqa: E731
    assert report["tag_kappa"]["x"] == pytest.approx(cohen_kappa_score(has(a, "x"), has(b, "x")), abs=1e-4)
    assert report["tag_kappa"]["y"] == pytest.approx(cohen_kappa_score(has(a, "y"), has(b, "y")), abs=1e-4)
    assert report["tag_kappa"]["z"] is None  # neither ever gave z
    assert report["kappa"] is None and report["per_annotator"]["ana"]["agreement"] == pytest.approx(3 / 6)
    assert report["prelabel"] == {"shown": 6, "kept": 1, "agreement": round(1 / 6, 4)}  # sets equal to "x"
    from alflow.tasks.agreement import agreement_line

    line = agreement_line(dict(report, adjudication_pending=0))
    assert line.startswith("agreement: alpha (MASI) ") and "per-tag kappa x " in line and "z –" in line


# -- one multi-label project, end to end ------------------------------------------------------
VOTES = {  # item -> three (or two) annotators' tag sets; every tag is in some effective label
    "close": ["business;world", "business;world", "business;scitech;world"],   # MASI 0.56 <= 0.6: stands
    "far": ["sports", "sports", "scitech;sports"],                             # MASI 0.67 > 0.6
    "tie": ["world", "business"],                                              # no majority set
    "same": ["", ""],                                                          # both: no tag applies
    "agree": ["scitech", "scitech"],
}
ANNOTATORS = ["ana", "bo", "cy"]


def project_config(directory: Path) -> Path:
    with (DATA / "ag_news_multilabel.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:60]
    source = directory / "news.csv"
    with source.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    config = directory / "alflow.toml"
    config.write_text(textwrap.dedent(f"""
        task = "multi_label"
        labels = {json.dumps(TAGS)}
        database = "state/alflow.duckdb"
        models_dir = "state/models"
        seed = 11

        [model]
        self_training = 0

        [query]
        batch_size = 12
        control_share = 0.34
        near_duplicate = 0.9

        [evaluation]
        method = "holdout"
        holdout_fraction = 0.2

        [stopping]
        target = 0.99
        target_min_control = 4
        stabilizing_kappa = 0.5
        stabilizing_cycles = 1
        stop_set_size = 30

        [runner]
        type = "threads"

        [[sources]]
        type = "files"
        name = "news"
        path = "{source.as_posix()}"
        text_column = "text"
        label_column = "labels"
    """))
    return config


def store_votes(store: Store, settings) -> dict[str, str]:
    """The VOTES as answers to a closed batch of pool items: name -> item_id."""
    states = store.item_states(settings.review.adjudication_threshold, settings.holdout_fraction)
    ids = dict(zip(VOTES, states.loc[states["state"] == "pool", "item_id"].head(len(VOTES))))
    picks = pd.DataFrame({"item_id": list(ids.values()), "rank": range(1, len(ids) + 1), "score": np.nan,
                          "prelabel": None, "confidence": np.nan, "picked_by": "random", "overlap": 3})
    batch_id = store.create_batch(None, "random", None, picks)
    for i, annotator in enumerate(ANNOTATORS):
        answers = [Answer(ids[name], sets[i]) for name, sets in VOTES.items() if i < len(sets)]
        store.record_labels(answers, annotator=annotator, origin="cli", batch_id=batch_id)
    store.close_batch(batch_id, "labeled")
    return ids


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api):
    directory = tmp_path_factory.mktemp("multilabel_quality")
    config = project_config(directory)
    settings = load_config(config)
    assert runner.invoke(app, ["ingest", "--config", str(config)]).exit_code == 0
    store = Store(settings.database)
    ids = store_votes(store, settings)
    pending = store.needs_adjudication(settings.review.adjudication_threshold, settings.review.adjudication_distance)
    before = runner.invoke(app, ["status", "--config", str(config), "--json"])
    run = runner.invoke(app, ["run", "--config", str(config), "--auto", "--cycles", "2"])
    status = runner.invoke(app, ["status", "--config", str(config), "--json"])
    text = runner.invoke(app, ["status", "--config", str(config)])
    return {"settings": settings, "store": store, "ids": ids, "pending": pending, "before": before, "run": run,
            "status": status, "text": text}


def test_a_multi_label_project_reports_label_quality_on_tag_sets(project):
    store, settings, ids = project["store"], project["settings"], project["ids"]
    assert project["run"].exit_code == 0, project["run"].output
    assert project["status"].exit_code == 0, project["status"].output

    # agreement: alpha over sets with MASI, kappa per tag (two annotators answered every item)
    before = json.loads(project["before"].output)["agreement"]
    matrix = [[parse_tags(votes[i]) if i < len(votes) else None for votes in VOTES.values()]
              for i in range(len(ANNOTATORS))]
    assert before["distance"] == "masi" and before["kappa"] is None and before["items_overlapping"] == 5
    assert before["alpha"] == pytest.approx(krippendorff_alpha_sets(matrix), abs=1e-4)
    assert before["tag_kappa"] == {}  # three annotators: per-tag kappa is of two (test above)
    # adjudication: the tie and the far dissent, not the close one nor the agreement
    assert sorted(project["pending"]["item_id"]) == sorted([ids["far"], ids["tie"]])
    assert project["pending"].set_index("item_id").loc[ids["far"], "disagreement"] == pytest.approx(1 - 0.5 * 2 / 3)
    assert before["adjudication_pending"] == 2

    # the run asked both again as adjudication (no pre-label), like a single-label disagreement
    asked = store.query_df("SELECT item_id, picked_by, prelabel FROM batch_items WHERE picked_by = 'adjudication'")
    assert sorted(asked["item_id"]) == sorted([ids["far"], ids["tie"]]) and asked["prelabel"].isna().all()
    status = json.loads(project["status"].output)
    assert status["agreement"]["adjudication_pending"] == 0
    effective = dict(store.query_df("SELECT item_id, label FROM effective_labels").values.tolist())
    assert effective[ids["close"]] == "business;world" and effective[ids["same"]] == ""
    assert "alpha (MASI)" in project["text"].output

    # the label check: none under MIN_TAG_CHECK_LABELS labels; with the floor lowered, cleanlab's
    # flags on the out-of-fold per-tag probabilities, stored as text forms, most likely wrong first
    quality = store.cycle_quality()
    assert quality["flags"].tolist() == [0, 0] and status["label_flags"]["count"] == 0
    frame, _ = store.training_set(settings.holdout_fraction, settings.query.control_trains)
    assert len(frame) < MIN_TAG_CHECK_LABELS
    assert check_tag_labels(store, settings, 99, min_labels=6) > 0
    y = tag_matrix([parse_tags(v) for v in frame["label"]], TAGS)
    proba = out_of_fold_proba(settings.model, frame["doc"].tolist(), y, settings.evaluation.cv_folds, settings.seed)
    idx, scores = find_tag_errors(y, proba)
    flags = store.query_df("SELECT * FROM label_flags WHERE model_version = 99 ORDER BY rank")
    assert flags["item_id"].tolist() == frame["item_id"].to_numpy()[idx].tolist()
    assert flags["score"].to_numpy() == pytest.approx(scores)
    assert flags["given_label"].tolist() == frame["label"].to_numpy()[idx].tolist()
    suggested = [format_tags(t for t, p in zip(TAGS, row) if p >= 0.5) for row in proba[idx]]
    assert flags["suggested_label"].tolist() == suggested

    # the control slice: per-tag and micro F1 against scikit-learn, on the control answers of model v2
    control = status["control"]
    outcomes = store.control_outcomes(control["model_version"])
    assert control["n"] == len(outcomes) >= 4 and control["metric"] == "micro_f1"
    truth = tag_matrix([parse_tags(v) for v in outcomes["label"]], TAGS)
    predicted = tag_matrix([parse_tags(v) for v in outcomes["predicted"]], TAGS)
    assert control["value"] == pytest.approx(f1_score(truth, predicted, average="micro", zero_division=0))
    per_tag = f1_score(truth, predicted, average=None, zero_division=0)
    assert [control["tags"][t]["f1"] for t in TAGS] == pytest.approx(per_tag.tolist())
    assert all(f["low"] <= f["f1"] <= f["high"] for f in control["tags"].values())
    assert control["value_low"] <= control["value"] <= control["value_high"]
    assert control["accuracy"] == pytest.approx((truth == predicted).all(axis=1).mean())
    assert "per-tag F1 business" in project["text"].output

    # stopping: the target reads control micro F1; stabilizing the stop set's mean per-tag kappa
    rules = {r["rule"]: r for r in status["stopping"]["rules"]}
    assert rules["target"]["estimate"] == "control micro_f1 (lower bound)"
    assert rules["target"]["value"] == pytest.approx(control["value_low"])
    v1, v2 = (store.stop_set_predictions(v) for v in (1, 2))
    kappa = stop_set_tag_kappa(v2.tolist(), v1.loc[v2.index].tolist(), TAGS)
    assert quality["stop_kappa"].iloc[-1] == pytest.approx(kappa)
    assert "mean per-tag kappa" in rules["stabilizing"]["detail"]
    assert rules["stabilizing"]["fired"] == (kappa is not None and kappa >= 0.5)
    assert not math.isnan(quality["control_accuracy"].iloc[-1])
