"""How a person answers a multi-label batch (issue 25): the Resume form's multi-selects, the
terminal's tag toggles, CSV/JSONL/Label Studio files both ways, and `alflow show`.

The batch is built through the store API (no flow run, no Prefect server): 30 items of
tests/data/ag_news_multilabel.csv, 6 of them in an open batch with tag-set pre-labels, one
a blind control item, one whose pre-label is the empty set."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import DATA
from pydantic import ValidationError
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app
from alflow.tasks.ingest import ingest_source
from alflow.tasks.store import CONTROL, Store

runner = CliRunner()
TAGS = ["business", "scitech", "sports", "world"]
# rank -> (pre-label text form, picked_by); rank 3 is blind (control), rank 4's model says no tag applies
PICKS = {1: ("business;world", "uncertainty"), 2: ("sports", "uncertainty"), 3: ("scitech", CONTROL),
         4: ("", "uncertainty"), 5: ("scitech;world", "exploration"), 6: ("world", "uncertainty")}


@pytest.fixture
def waiting(tmp_path: Path):
    """(config, store, batch_id, batch): an open multi-label batch of 6 items, as a query with
    model v1 records it, v1's per-tag probabilities stored in ``predictions``."""
    with (DATA / "ag_news_multilabel.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))[:30]
    source = tmp_path / "tags.csv"
    with source.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    config = tmp_path / "alflow.toml"
    config.write_text(textwrap.dedent(f"""
        task = "multi_label"
        labels = {json.dumps(TAGS)}
        database = "state/alflow.duckdb"
        models_dir = "state/models"

        [[sources]]
        type = "files"
        name = "news"
        path = "{source.as_posix()}"
        text_column = "text"
        label_column = "labels"
        """), encoding="utf-8")
    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    ingest_source(settings, "news", "ingest-1")
    ids = store.query_df("SELECT item_id FROM items ORDER BY item_id LIMIT 6")["item_id"].tolist()
    proba = [[0.9, 0.1, 0.2, 0.7], [0.1, 0.2, 0.8, 0.3], [0.3, 0.6, 0.1, 0.2],
             [0.2, 0.3, 0.1, 0.4], [0.1, 0.7, 0.2, 0.6], [0.2, 0.1, 0.1, 0.9]]
    store.write_predictions(pd.DataFrame({"item_id": ids, "label": [PICKS[r][0] for r in range(1, 7)],
                                          "proba": proba, "least_confidence": 0.5, "margin": 0.5, "entropy": 0.5}), 1)
    picks = pd.DataFrame({"item_id": ids, "rank": range(1, 7), "score": 0.5,
                          "prelabel": [PICKS[r][0] for r in range(1, 7)], "confidence": 0.4,
                          "picked_by": [PICKS[r][1] for r in range(1, 7)]})
    batch_id = store.create_batch(None, "mean_margin", 1, picks)
    return config, store, batch_id, store.batch_items(batch_id)


def answers_of(store: Store, batch_id: str, annotator: str | None = None) -> dict[str, str]:
    """item_id -> latest label of ``annotator`` (any, if None) in the batch."""
    frame = store.query_df("SELECT item_id, label, annotator FROM labels WHERE batch_id = ? ORDER BY label_id",
                           [batch_id])
    if annotator is not None:
        frame = frame[frame["annotator"] == annotator]
    return dict(zip(frame["item_id"], frame["label"]))


def test_resume_form_preselects_offered_tags_and_records_sets(waiting):
    """One multi-select per item (array of the tags + skip, unique, skip only alone), the
    offered pre-label's tags preselected, nothing for the blind item, per-tag probabilities
    in the description except for the blind item. Accepting every default stores exactly
    the preselected sets ("" for an untouched empty selection); a toggled tag and skip are
    recorded; skip with a tag is refused in one line, by the schema the server checks too."""
    from prefect.utilities.schema_tools import ValidationError as SchemaError
    from prefect.utilities.schema_tools import validate

    from alflow.tasks.review import (
        answers_from_form,
        build_review_form,
        field_name,
        form_defaults,
        form_description,
        record_review_form,
    )
    from alflow.tasks.review.items import review_round_items

    _, store, batch_id, _ = waiting
    batch = review_round_items(store, batch_id, 1)
    form = build_review_form(batch, TAGS, 300, "ana", task="multi_label",
                             description=form_description(batch_id, batch, False, task="multi_label"))
    schema = form.model_json_schema()
    field = schema["properties"]["#1"]
    assert field["type"] == "array" and field["uniqueItems"] is True
    assert field["items"]["enum"] == TAGS + ["skip"]
    defaults = {rank: schema["properties"][field_name(rank)]["default"] for rank in PICKS}
    assert defaults == {1: ["business", "world"], 2: ["sports"], 3: [], 4: [], 5: ["scitech", "world"],
                        6: ["world"]}
    assert r"Model: business 90\% · scitech 10\%" in field["description"]
    assert "Model:" not in schema["properties"]["#3"]["description"]
    assert "business + world" in field["title"] and "no pre-label" in schema["properties"]["#3"]["title"]
    assert "none selected" in form._description

    values = {field_name(r): defaults[r] for r in PICKS} | {"annotator": "ana"}
    with pytest.raises(SchemaError, match="too long"):  # the server's check of a submitted form
        validate(values | {"#2": ["skip", "sports"]}, schema, raise_on_error=True)
    with pytest.raises(ValidationError, match="'skip' must be chosen alone"):
        form(**(values | {"#2": ["skip", "sports"]}))

    # Accept everything as shown: exactly the preselected sets, "" (none apply) for the blind item.
    submitted = form(**values).model_dump()
    record_review_form(store, form, submitted, batch, batch_id, None)
    ids = dict(zip(batch["rank"], batch["item_id"]))
    got = answers_of(store, batch_id, "ana")
    assert {r: got[ids[r]] for r in PICKS} == {1: "business;world", 2: "sports", 3: "", 4: "", 5: "scitech;world",
                                               6: "world"}
    shown = store.query_df("SELECT item_id, prelabel_shown FROM labels WHERE batch_id = ?", [batch_id])
    shown = dict(zip(shown["item_id"], shown["prelabel_shown"]))
    assert pd.isna(shown[ids[3]]) and shown[ids[1]] == "business;world"
    assert shown[ids[4]] == ""  # the model's empty set was shown ("none of these"): a pre-label, kept

    # Toggling world off on #1 and skipping #2: those two are the changed values, as recorded.
    changed = form(**(values | {"#1": ["business"], "#2": ["skip"]})).model_dump()
    answers = {a.item_id: a.label for a in answers_from_form(changed, batch)}
    assert [answers[ids[r]] for r in PICKS] == ["business", "skip", "", "", "scitech;world", "world"]
    untouched = form_defaults(form, changed, batch)
    assert [r for r in PICKS if answers[ids[r]] != untouched[ids[r]]] == [1, 2]


def test_terminal_toggles_tags_by_number(waiting):
    """`alflow label`: the selection starts at the offered pre-label (none for the blind
    item), a number toggles its tag, Enter records the set (empty: none apply, said on
    screen), s skips, b goes back and Enter keeps the answer given."""
    config, store, batch_id, batch = waiting
    ids = batch["item_id"].tolist()
    # #1: toggle world off, sports on -> business;sports. #2: Enter keeps sports. #3 (blind): Enter -> none
    # apply. #4: s. Back to #4, Enter keeps the skip. #5: 2 toggles scitech off -> world. Then quit.
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"],
                           input="43\r\r\rsb\r2\rq")
    assert result.exit_code == 0, result.output
    assert "Enter records: no tag (none apply)" in result.output
    assert "[x] 1 business" in result.output and "[ ] 2 scitech" in result.output
    assert "-> business + sports" in result.output
    got = answers_of(store, batch_id, "ana")
    assert [got.get(i) for i in ids] == ["business;sports", "sports", "", "skip", "world", None]
    shown = store.query_df("SELECT prelabel_shown FROM labels WHERE batch_id = ? ORDER BY label_id", [batch_id])
    assert shown["prelabel_shown"].tolist()[:2] == ["business;world", "sports"]
    assert pd.isna(shown["prelabel_shown"].iloc[2])  # the blind item: no pre-label shown

    report = runner.invoke(app, ["show", "latest", "--config", str(config)])
    assert report.exit_code == 0, report.output
    assert "ana: business + sports" in report.output and "ana: no tag (none apply)" in report.output
    assert "pre-label business + world" in report.output


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_edit_import_round_trip(waiting, tmp_path, fmt):
    """`alflow export` writes a labels column (CSV: ';'-joined, 'none' for none apply, empty
    left for later; JSONL: lists, [] for none apply, null left for later); edited and
    imported, the sets, none-apply, skip and the unanswered rows come back as meant."""
    config, store, batch_id, batch = waiting
    ids = batch["item_id"].tolist()
    out = tmp_path / f"batch.{fmt}"
    result = runner.invoke(app, ["export", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    if fmt == "csv":
        rows = list(csv.DictReader(out.open(encoding="utf-8", newline="")))
        assert [r["labels"] for r in rows] == ["business;world", "sports", "", "none", "scitech;world", "world"]
        assert "none for \"none of these tags apply\"" in result.output
        edits = {0: "world; business", 1: "skip", 2: "none", 3: "", 4: "sports;scitech", 5: "world"}
        for i, value in edits.items():
            rows[i]["labels"] = value
        with out.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [r["labels"] for r in rows] == [["business", "world"], ["sports"], None, [], ["scitech", "world"],
                                               ["world"]]
        assert rows[3]["prelabel"] == [] and rows[2]["prelabel"] is None  # the blind item shows no pre-label
        edits = {0: ["world", "business"], 1: "skip", 2: [], 3: None, 4: ["sports", "scitech"], 5: ["world"]}
        for i, value in edits.items():
            rows[i]["labels"] = value
        out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = runner.invoke(app, ["import", str(out), "--config", str(config), "-a", "cy"])
    assert result.exit_code == 0, result.output
    assert "1 rows had no label and wait" in result.output
    got = answers_of(store, batch_id)
    assert [got.get(i) for i in ids] == ["business;world", "skip", "", None, "scitech;sports", "world"]

    # A tag outside labels: one line naming the row and the tag, nothing stored.
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"item_id": [ids[3]], "labels": ["world;politics"]}).to_csv(bad, index=False)
    result = runner.invoke(app, ["import", str(bad), "--config", str(config), "-a", "cy", "--batch", batch_id])
    assert result.exit_code != 0 and "line 2: tag 'politics' is not one of" in result.output
    assert ids[3] not in answers_of(store, batch_id)
    pd.DataFrame({"item_id": [ids[3]], "labels": ["skip;world"]}).to_csv(bad, index=False)
    result = runner.invoke(app, ["import", str(bad), "--config", str(config), "-a", "cy", "--batch", batch_id])
    assert result.exit_code != 0 and "line 2: 'skip' is an answer of its own" in result.output


def test_label_studio_multiple_choices_round_trip(waiting, tmp_path):
    """Label Studio: the config is <Choices choice="multiple">, the offered pre-label a
    prediction with every tag (none for the blind item), and annotations choosing several
    tags, none (none apply) or cancelled (skip) are imported as such; a task without an
    annotation waits."""
    config, store, batch_id, batch = waiting
    ids = batch["item_id"].tolist()
    out = tmp_path / "tasks.json"
    result = runner.invoke(app, ["export", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert 'choice="multiple"' in result.output
    tasks = json.loads(out.read_text(encoding="utf-8"))
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["business", "world"]
    assert tasks[2]["predictions"] == [] and tasks[3]["predictions"][0]["result"] == []

    def annotation(choices, cancelled=False):
        result = [] if choices is None else [{"from_name": "label", "to_name": "text", "type": "choices",
                                               "value": {"choices": choices}}]
        return {"result": result, "was_cancelled": cancelled, "created_username": "dee, 4", "lead_time": 3.5}

    tasks[0]["annotations"] = [annotation(["world", "sports"])]
    tasks[1]["annotations"] = [annotation(None)]                 # submitted with nothing chosen: none apply
    tasks[2]["annotations"] = [annotation(None, cancelled=True)]  # skipped
    tasks[3]["annotations"] = [annotation(["business"])]
    out.write_text(json.dumps(tasks), encoding="utf-8")
    result = runner.invoke(app, ["import", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    got = answers_of(store, batch_id, "dee")
    assert [got.get(i) for i in ids] == ["sports;world", "", "skip", "business", None, None]

    # Exported again, the answers are annotations choosing the same tags.
    runner.invoke(app, ["export", str(out), "--config", str(config)])
    again = json.loads(out.read_text(encoding="utf-8"))
    assert again[0]["annotations"][0]["result"][0]["value"]["choices"] == ["sports", "world"]
    assert again[1]["annotations"][0]["result"] == [] and not again[1]["annotations"][0]["was_cancelled"]
    assert again[2]["annotations"][0]["was_cancelled"]
