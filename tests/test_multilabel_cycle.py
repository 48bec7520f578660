"""A multi-label project end to end (issue 25): `alflow run --auto` with task = "multi_label"
ingests gold tag sets, trains one-vs-rest, pre-labels with per-tag probabilities, queries
by mean margin and records the simulated annotator's tag-set answers; a store of the other
task is refused in one line.

One module-scoped run of two cycles over ~100 items of tests/data/ag_news_multilabel.csv
(~6 s on a loaded 2-core machine); the tests read what it left."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, REPO
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app
from alflow.tasks import modeling
from alflow.tasks.multilabel.model import model_thresholds
from alflow.tasks.multilabel.tags import UNKNOWN_TAG, format_tags, parse_tags
from alflow.tasks.store import Store
from alflow.tasks.train import model_file

runner = CliRunner()
TAGS = ["business", "scitech", "sports", "world"]
SAMPLE = DATA / "ag_news_multilabel.csv"
EXAMPLE = REPO / "examples" / "multi_label.toml"


def sample_csv(path: Path) -> Path:
    """100 sample rows: every third one's cell emptied (no tag applies: gold ""), one naming a
    tag outside labels (a reject), one's tags written unsorted with spaces."""
    with SAMPLE.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:100]
    for i, row in enumerate(rows):
        if i % 3 == 2:
            row["labels"] = ""
    rows[0]["labels"] = "world ; business"
    rows[1]["labels"] = "politics;world"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def project_config(directory: Path, source: Path, *, task: str = "multi_label", database: str = "state/alflow.duckdb",
                   labels=TAGS, self_training: str = "0", query: str = "") -> Path:
    text = textwrap.dedent(f"""
        task = "{task}"
        labels = {json.dumps(labels)}
        database = "{database}"
        models_dir = "state/models"
        seed = 3

        [model]
        self_training = {self_training}

        [query]
        batch_size = 10
        near_duplicate = 0.9
        {query}

        [evaluation]
        method = "holdout"
        holdout_fraction = 0.2

        [runner]
        type = "threads"

        [[sources]]
        type = "files"
        name = "news"
        path = "{source.as_posix()}"
        text_column = "text"
        label_column = "labels"
        """)
    path = directory / "alflow.toml"
    path.write_text(text, encoding="utf-8")
    return path


def stored_gold(store: Store, key: str = "text") -> dict:
    """``key`` -> items.gold_label, NULL as None."""
    with store.connect() as con:
        return dict(con.execute(f"SELECT {key}, gold_label FROM items").fetchall())


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api):
    """Two `alflow run --auto` cycles of a multi-label config, and what they stored."""
    directory = tmp_path_factory.mktemp("multilabel")
    config = project_config(directory, sample_csv(directory / "news.csv"))
    result = runner.invoke(app, ["run", "--config", str(config), "--auto", "--cycles", "2"])
    settings = load_config(config)
    status = runner.invoke(app, ["status", "--config", str(config), "--json"])
    return {"config": config, "settings": settings, "store": Store(settings.database), "run": result,
            "status": status, "directory": directory}


def test_a_multi_label_cycle_stores_tag_sets_end_to_end(project):
    run, store, settings = project["run"], project["store"], project["settings"]
    assert run.exit_code == 0, run.output
    assert settings.query.strategy == "mean_margin" and settings.evaluation.metric == "micro_f1"  # the defaults

    # ingest: the empty cell is the empty set, tags are mapped to their text form, the unknown tag a reject
    gold = stored_gold(store)
    assert len(gold) == 99 and sum(g == "" for g in gold.values()) == 33 and None not in gold.values()
    assert all(parse_tags(g) <= set(TAGS) and format_tags(parse_tags(g)) == g for g in gold.values())
    assert "business;world" in gold.values()
    ingest = store.query_df("SELECT n_read, n_bad, bad_reasons FROM ingests").iloc[0]
    assert (ingest.n_read, ingest.n_bad, json.loads(ingest.bad_reasons)) == (99, 1, {UNKNOWN_TAG: 1})

    # answers: the simulated annotator's are the gold sets' text forms, "" (no tag applies) included
    labels = store.query_df("SELECT l.label, i.gold_label FROM labels l JOIN items i USING (item_id)")
    assert len(labels) == 20 and (labels["label"] == labels["gold_label"]).all()
    assert (labels["label"] == "").any() and labels["label"].str.contains(";").any()

    # models: one-vs-rest with their thresholds, in the row and in the file
    models = store.query_df("SELECT * FROM models ORDER BY model_version")
    assert list(models["task"]) == ["multi_label", "multi_label"]
    assert all(list(t) == [0.5] * 4 for t in models["thresholds"])  # model.tag_thresholds = "fixed"
    row = models.iloc[-1].to_dict()
    model = modeling.load_model(model_file(settings, row), modeling.trusted_types(settings.model, settings.labels, settings.task))
    assert model_thresholds(model).tolist() == list(row["thresholds"])
    metrics = json.loads(row["metrics"])
    assert {"micro_f1", "macro_f1", "hamming_loss", "subset_accuracy"} <= set(metrics)
    assert metrics["method"] == "holdout" and metrics["promotion"]["reason"]

    # predictions: per-tag probabilities (not a distribution) and the set at or above 0.5
    predictions = store.query_df("SELECT * FROM predictions WHERE model_version = 1")
    proba = np.stack(predictions["proba"].to_numpy())
    assert proba.shape == (len(predictions), 4) and not np.allclose(proba.sum(axis=1), 1.0)
    expected = [format_tags(t for t, p in zip(TAGS, row) if p >= 0.5) for row in proba]
    assert predictions["label"].tolist() == expected
    confidence = np.where(proba >= 0.5, proba, 1 - proba).prod(axis=1)
    assert np.allclose(predictions["least_confidence"], 1 - confidence)
    assert predictions[["margin", "entropy"]].notna().all().all()

    # the second batch: pre-labeled with the predicted set and its probability, mean margin's picks
    batch = store.query_df("""SELECT bi.*, b.strategy FROM batch_items bi JOIN batches b USING (batch_id)
                              WHERE b.model_version = 1""")
    assert batch["strategy"].iloc[0] == "mean_margin+exploration(0.1)"
    merged = batch.merge(predictions, on="item_id", suffixes=("", "_p"))
    shown, control = merged[merged["picked_by"] != "control"], merged[merged["picked_by"] == "control"]
    assert len(merged) == 10 and len(shown) >= 8 and (shown["prelabel"] == shown["label"]).all()
    assert np.allclose(shown["confidence"], 1 - shown["least_confidence"])
    assert control["prelabel"].isna().all()  # as in a single-label batch: no default shown

    # the summary and `alflow status` name the multi-label metrics
    assert "micro_f1" in run.output
    from alflow.tasks.report import curve_table

    assert "micro F1" in curve_table(store.cycles())[0]  # the summary artifact's learning curve
    from alflow.tasks.plots import learning_curve_figure
    from alflow.tasks.report import LEARNING_CURVE_PNG, curve_image, with_tag_metrics

    assert (settings.database.parent / LEARNING_CURVE_PNG).is_file()  # the picture each cycle redraws
    drawn = {line.get_gid(): line for line in learning_curve_figure(with_tag_metrics(store.cycles()),
                                                                     "micro_f1").axes[0].lines}
    assert list(drawn["micro_f1"].get_ydata()) == pytest.approx(
        [json.loads(m)["micro_f1"] for m in store.cycles()["metrics"]])
    assert "micro F1 and macro F1" in curve_image("data:,", store.cycles())
    cycles = json.loads(project["status"].output)["cycles"]
    assert project["status"].exit_code == 0 and [c["cycle"] for c in cycles] == [1, 2]
    assert cycles[-1]["micro_f1"] == pytest.approx(json.loads(store.cycles()["metrics"].iloc[-1])["micro_f1"])


def test_python_reader_gives_the_same_gold_tags(project, monkeypatch):
    """The same file through Python's reader (DuckDB's refused): the same gold sets and reject."""
    from alflow.connectors.files import FilesConnector
    from alflow.tasks.ingest import ingest_source

    directory = project["directory"] / "python"
    directory.mkdir()
    config = project_config(directory, project["settings"].sources[0].path)
    settings = load_config(config)
    Store(settings.database).migrate()
    monkeypatch.setattr(FilesConnector, "record_scan", lambda self, looked=True: None)
    report = ingest_source(settings, "news", "python-ingest")
    assert (report.read, report.bad_reasons) == (99, {UNKNOWN_TAG: 1})
    assert stored_gold(Store(settings.database), "item_id") == stored_gold(project["store"], "item_id")


def test_a_store_of_the_other_task_is_refused_in_one_line(project, tmp_path):
    """A single-label store opened with a multi-label config (and the reverse): one line naming task."""
    single = project_config(tmp_path, project["settings"].sources[0].path, task="single_label",
                            labels=["world", "sports", "business", "scitech"])
    single.write_text(single.read_text().replace('label_column = "labels"', ""))
    assert runner.invoke(app, ["ingest", "--config", str(single)]).exit_code == 0
    database = Store(load_config(single).database).path
    other = tmp_path / "multi"
    other.mkdir()
    multi = project_config(other, project["settings"].sources[0].path, database=database.as_posix())
    result = runner.invoke(app, ["run", "--config", str(multi), "--auto", "--no-ingest"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert "task = 'multi_label'" in lines[0] and "single_label" in lines[0]
    # and the reverse: the multi-label project's store under a single-label config
    (tmp_path / "reverse").mkdir()
    reverse = project_config(tmp_path / "reverse", project["settings"].sources[0].path, task="single_label",
                             database=project["store"].path.as_posix(), labels=TAGS)
    result = runner.invoke(app, ["run", "--config", str(reverse), "--auto", "--no-ingest"])
    assert result.exit_code == 1 and "task = 'single_label'" in result.output and "multi_label" in result.output


@pytest.mark.parametrize("lines, key, words", [
    ('[query]\nstrategy = "margin"', "query.strategy", "mean_margin"),
    ('[evaluation]\nmetric = "accuracy"', "evaluation.metric", "micro_f1"),
    ('[model]\ntag_thresholds = "best"', "model.tag_thresholds", "out_of_fold"),
])
def test_multi_label_settings_name_multi_label_choices(tmp_path, lines, key, words):
    config = tmp_path / "alflow.toml"
    config.write_text(f'task = "multi_label"\nlabels = {json.dumps(TAGS)}\n{lines}\n', encoding="utf-8")
    result = runner.invoke(app, ["status", "--config", str(config)])
    out = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(out) == 1 and key in out[0] and words in out[0], result.output


def test_the_bundled_example_config_loads_as_multi_label():
    settings = load_config(EXAMPLE)
    assert settings.task == "multi_label" and settings.labels == TAGS
    assert settings.sources[0].path.is_file() and settings.evaluation.metric == "micro_f1"
    # the bundled copy is the shipped sample (tests/test_multilabel.py rebuilds that one)
    assert settings.sources[0].path.read_bytes() == SAMPLE.read_bytes()


def test_cv_evaluation_and_a_lower_is_better_metric(project, tmp_path):
    """A retrain of the project's answers scored by cross-validation on hamming_loss: the
    out-of-fold tag-set metrics, and promotion turned around for a loss."""
    import shutil

    from alflow.tasks.train import retrain

    settings = project["settings"]
    database = tmp_path / "copy.duckdb"
    shutil.copy(settings.database, database)
    shutil.copytree(settings.models_dir, tmp_path / "models")  # the current model must load to be compared with
    evaluation = settings.evaluation.model_copy(update={"method": "cv", "metric": "hamming_loss"})
    settings = settings.model_copy(update={"evaluation": evaluation, "database": database,
                                           "models_dir": tmp_path / "models"})
    store = Store(database)
    with store.transaction() as con:  # one more answer, so the retrain is not the one already done
        item = con.execute("SELECT item_id, gold_label FROM items WHERE item_id NOT IN (SELECT item_id FROM labels) "
                           "AND gold_label IS NOT NULL LIMIT 1").fetchone()
    from alflow.tasks.store import Answer

    store.record_labels([Answer(item[0], item[1])], annotator="tester", origin="cli")
    result = retrain(store, settings)
    # 21 answers, the control slice's kept out of training (query.control_trains = false)
    control = store.scalar("SELECT count(*) FROM control_answers")
    assert result.metrics["method"] == "cv" and result.metrics["n_eval"] == result.n_labels == 21 - control
    assert 0.0 <= result.metrics["hamming_loss"] <= 1.0
    assert "hamming_loss" in result.reason and ("<=" in result.reason or ">" in result.reason)


def test_the_default_self_trains_a_committee_queries_and_a_tag_no_answer_carries_still_loads(tmp_path, prefect_api):
    """Two cycles with the shipped self_training = "auto", query.strategy = "committee" and a
    fifth tag no item carries: every retrain adds pseudo-labels from the pool, the model
    whose "health" column is scikit-learn's constant stand-in loads again in the next cycle
    (query, stopping, train), and the second batch (the first with a model) is picked by the
    bagged members' disagreement, composed with exploration as any strategy."""
    config = project_config(tmp_path, sample_csv(tmp_path / "news.csv"), labels=TAGS + ["health"],
                            self_training='"auto"', query='strategy = "committee"')
    result = runner.invoke(app, ["run", "--config", str(config), "--auto", "--cycles", "2"])
    assert result.exit_code == 0, result.output
    settings = load_config(config)
    store = Store(settings.database)
    models = store.query_df("SELECT * FROM models ORDER BY model_version")
    assert len(models) == 2 and store.scalar("SELECT count(*) FROM batches") == 2
    batch = store.query_df("""SELECT bi.picked_by, bi.score, b.strategy FROM batch_items bi
                              JOIN batches b USING (batch_id) WHERE b.model_version = 1""")
    assert batch["strategy"].iloc[0] == "committee+exploration(0.1)"
    picked = batch["picked_by"].value_counts()
    assert picked["committee"] >= 7 and set(picked.index) <= {"committee", "exploration", "control"}
    # a committee pick's score is its mean vote entropy over tags, in [0, log 2], plus the tie-break
    assert batch.loc[batch["picked_by"] == "committee", "score"].between(0, np.log(2) + 1e-3).all()
    for row in models.to_dict("records"):
        used = json.loads(row["metrics"])["self_training"]
        assert used["used"] and used["mode"] == "auto" and used["pool_sample"] > 0
        model = modeling.load_model(model_file(settings, row), modeling.trusted_types(settings.model, settings.labels, settings.task))
        assert model.predict_proba(["a ferry company strike"]).shape == (1, 5)
    assert "health" not in ";".join(store.query_df("SELECT label FROM labels")["label"])


def test_jsonl_null_or_missing_tags_are_no_gold(tmp_path):
    """In JSONL a null or absent labels field is no gold, ";" the empty set, tags map through label_map."""
    from alflow.tasks.ingest import ingest_source

    source = tmp_path / "news.jsonl"
    rows = [{"text": "one", "labels": None}, {"text": "two"}, {"text": "three", "labels": ";"},
            {"text": "four", "labels": "World;Sports"}, {"text": "five", "labels": "politics"}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = project_config(tmp_path, source)
    config.write_text(config.read_text() + 'label_map = { World = "world", Sports = "sports" }\n')
    settings = load_config(config)
    Store(settings.database).migrate()
    report = ingest_source(settings, "news", "jsonl-ingest")
    assert (report.read, report.bad_reasons) == (4, {UNKNOWN_TAG: 1})
    assert stored_gold(Store(settings.database)) == {"one": None, "two": None, "three": "", "four": "sports;world"}
