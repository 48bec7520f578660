"""The review step's answers: what the Resume form's untouched defaults mean, which pre-label
each answer was shown, and item text shown in the UI exactly as typed (issue 10, 6-8)."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
from conftest import SMS_CSV, write_config
from markdown_it import MarkdownIt
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app
from alflow.tasks.ingest import ingest_source
from alflow.tasks.store import Answer, LabelWrite, Store

runner = CliRunner()
CLASSES = ["ham", "spam"]

# Markup a message may contain; the UI must show each as typed.
NASTY = [
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "`code` and ``double``",
    "a | b | c",
    "*stars* and **bold**",
    "_under_ and __dunder__",
    "# heading",
    "&amp; &lt; &#65; & alone",
    "line one\n# line two\n\n- item\n    indented\r\n> quote",
    "back\\slash \\* and a trailing \\",
    "<https://example.com> www.example.com a@b.org",
    "~~strike~~ ![img](x.png) <b>bold</b> <!-- c -->",
    "1. first\n2) second",
]


def render(markdown: str) -> str:
    """Markdown to HTML as a CommonMark renderer with GFM tables and strikethrough does
    (the Prefect UI uses marked with GFM)."""
    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown)


def shown_text(markdown: str) -> str:
    """The text a reader sees: the rendered HTML with its one paragraph tag removed."""
    rendered = render(markdown).strip()
    assert rendered.startswith("<p>") and rendered.endswith("</p>"), rendered
    inner = rendered[3:-4]
    assert "<" not in inner, f"markup was rendered: {rendered}"
    return html.unescape(inner)


def as_typed(text: str, limit: int = 10_000) -> str:
    """What the UI should show for ``text``: as typed, whitespace runs as one space."""
    from alflow.tasks.review import trim

    return trim(text, limit)


# -- 8: escaping -------------------------------------------------------------------------------
@pytest.mark.parametrize("text", NASTY)
def test_markdown_text_shows_markup_as_typed(text):
    from alflow.tasks.report import markdown_text

    escaped = markdown_text(text)
    assert shown_text(escaped) == " ".join(text.split())
    assert "\n" not in escaped


def test_form_descriptions_and_table_cells_show_item_text_as_typed():
    """Everything rendered as Markdown (form descriptions, table artifact cells) shows the
    text as typed; field titles are plain text in the UI and stay unescaped."""
    from alflow.tasks.report import batch_rows
    from alflow.tasks.review import build_review_form

    batch = pd.DataFrame({
        "rank": range(1, len(NASTY) + 1), "item_id": [f"{i:064x}" for i in range(len(NASTY))],
        "score": 0.5, "prelabel": "spam", "confidence": 0.6, "picked_by": "uncertainty",
        "source": "my_source*", "title": None, "text": NASTY, "url": None, "external_id": None,
        "answer": None, "answered_by": None,
    })
    form = build_review_form(batch, CLASSES, 600, "annotator")
    schema = form.model_json_schema()
    for rank, text in enumerate(NASTY, start=1):
        prop = schema["properties"][f"#{rank}"]
        assert shown_text(prop["description"]) == as_typed(text), prop["description"]
        assert prop["title"] == f"#{rank} · my_source* · pre-label spam (60%)"
    for row, text in zip(batch_rows(batch), NASTY):
        assert shown_text(row["text"]) == as_typed(text, 160), row["text"]
        assert shown_text(row["source"]) == "my_source*"


def test_the_form_names_items_as_numbered_and_says_what_the_batch_is():
    """The Resume form's fields are '#1', '#2', ... so that the messages of the Prefect UI's
    own validation (the server's schema check, as its /ui/schemas/validate runs it) name
    the item by its number; the text above the fields says the batch's size beyond
    batch_size and why nothing is preselected on a cold start. A submission with the
    legacy field names (a run suspended before) is still read."""
    from prefect.utilities.schema_tools.validation import build_error_obj, validate

    from alflow.tasks.review import build_review_form, form_description

    batch = pd.DataFrame({
        "rank": [1, 2, 3], "item_id": ["a" * 64, "b" * 64, "c" * 64], "score": 0.5,
        "prelabel": [None, None, None], "confidence": None, "picked_by": ["adjudication", "coverage", "coverage"],
        "source": "sms", "title": None, "text": ["one", "two", "three"], "url": None, "external_id": None,
        "answer": None, "answered_by": None,
    })
    cold = form_description("b4tch", batch, cold_start=True)
    assert cold.startswith("**Batch b4tch: 2 items + 1 adjudication.**") and "No model yet (cold start)" in cold
    assert "1 item marked ADJUDICATE or RECHECK is asked again" in cold
    warm = form_description("b4tch", batch.assign(picked_by="uncertainty"), cold_start=False)
    assert warm.startswith("**Batch b4tch: 3 items.**") and "pre-label is preselected" in warm
    assert "cold start" not in warm and "ADJUDICATE" not in warm

    form = build_review_form(batch, CLASSES, 600, "annotator", description=cold)
    assert form._description == cold  # what Prefect saves with the form and the UI shows above it
    schema = form.model_json_schema()
    assert [name for name in schema["properties"] if name != "annotator"] == ["#1", "#2", "#3"]
    assert schema["required"] == ["#1", "#2", "#3", "annotator"]
    errors = build_error_obj(validate({"#1": "ham", "annotator": "ana"}, schema))["errors"]
    assert errors == [{"property": "#2", "errors": ["'#2' is a required property"]},
                      {"property": "#3", "errors": ["'#3' is a required property"]}]
    assert form(**{"#1": "ham", "#2": "spam", "#3": "skip", "annotator": "ana"}).model_dump()["#2"] == "spam"
    legacy = form(**{"item_001": "ham", "item_002": "spam", "item_003": "skip", "annotator": "ana"})
    assert {k: v for k, v in legacy.model_dump().items() if k.startswith("#")} == {"#1": "ham", "#2": "spam",
                                                                                 "#3": "skip"}


# -- fixtures for the store and file tests --------------------------------------------------
@pytest.fixture
def waiting(tmp_path: Path, small_csv: Path):
    """(config, store, batch_id, batch): 6 ingested SMS items in an open batch whose
    pre-labels alternate ham/spam, as a query with a model would record them."""
    config = write_config(tmp_path, labels=CLASSES, source_path=small_csv)
    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    ingest_source(settings, "corpus", "ingest-1")  # the plain step: `alflow ingest` needs a Prefect API
    ids = store.query_df("SELECT item_id FROM items ORDER BY item_id LIMIT 6")["item_id"].tolist()
    picks = pd.DataFrame({"item_id": ids, "rank": range(1, 7), "score": 0.5,
                          "prelabel": ["ham", "spam"] * 3, "confidence": 0.7, "picked_by": "uncertainty"})
    batch_id = store.create_batch(None, "margin", 1, picks)
    return config, store, batch_id, store.batch_items(batch_id)


def rows_of(store: Store, batch_id: str) -> pd.DataFrame:
    return store.query_df("SELECT * FROM labels WHERE batch_id = ? ORDER BY label_id", [batch_id])


def other(label: str) -> str:
    return "spam" if label == "ham" else "ham"


# -- 6: form answers over stored answers ----------------------------------------------------
def test_form_value_changed_from_its_default_is_recorded(waiting):
    """An item answered while the run waited keeps its answer when the form value is the
    field's untouched default; a value changed in the form is recorded: a correction by
    the same annotator, a second annotator's answer by another."""
    _, store, batch_id, batch = waiting
    ids = batch["item_id"].tolist()
    pre = dict(zip(batch["item_id"], batch["prelabel"]))
    defaults = dict(pre)
    # While the run waited, 'ana' answered items 0-2 in the terminal, 'cy' item 3.
    store.record_labels([Answer(ids[0], other(pre[ids[0]])), Answer(ids[1], pre[ids[1]]),
                         Answer(ids[2], pre[ids[2]])], annotator="ana", origin="cli", batch_id=batch_id)
    store.record_labels([Answer(ids[3], pre[ids[3]])], annotator="cy", origin="cli", batch_id=batch_id)

    form = [
        Answer(ids[0], pre[ids[0]], pre[ids[0]]),         # untouched default: ana's answer stays
        Answer(ids[1], other(pre[ids[1]]), pre[ids[1]]),  # changed in the form: a correction
        Answer(ids[2], pre[ids[2]], pre[ids[2]]),         # untouched, same as stored: nothing new
        Answer(ids[3], "skip", pre[ids[3]]),              # changed; cy answered, ana did not: new
        Answer(ids[4], pre[ids[4]], pre[ids[4]]),         # unanswered, default accepted: new
        Answer(ids[5], other(pre[ids[5]]), pre[ids[5]]),  # unanswered, changed: new
    ]
    written = store.record_labels(form, annotator="ana", origin="ui", batch_id=batch_id, form_defaults=defaults)
    assert (written.new, written.corrections, written.duplicates, written.kept) == (3, 1, 1, 1)
    assert written.kept_items == [ids[0]]
    ui = rows_of(store, batch_id).query("origin == 'ui'")
    assert dict(zip(ui["item_id"], ui["label"])) == {
        ids[1]: other(pre[ids[1]]), ids[3]: "skip", ids[4]: pre[ids[4]], ids[5]: other(pre[ids[5]])}
    answers = store.batch_items(batch_id).set_index("item_id")["answer"]
    assert answers[ids[0]] == other(pre[ids[0]]) and answers[ids[1]] == other(pre[ids[1]])
    assert "1 corrections" in written.summary()

    # A second annotator's deliberate answer for an item 'ana' answered is their own row.
    second = store.record_labels([Answer(ids[0], pre[ids[0]], pre[ids[0]]), Answer(ids[2], other(pre[ids[2]]))],
                                 annotator="bo", origin="ui", batch_id=batch_id,
                                 form_defaults={ids[0]: pre[ids[0]], ids[2]: pre[ids[2]]})
    assert (second.new, second.corrections, second.kept) == (1, 0, 1)
    bo = rows_of(store, batch_id).query("annotator == 'bo'")
    assert bo[["item_id", "label"]].values.tolist() == [[ids[2], other(pre[ids[2]])]]


# -- 7: the pre-label shown -----------------------------------------------------------------
def test_prelabel_shown_from_the_terminal_and_files(waiting, tmp_path):
    """`alflow label` stores the pre-label its heading showed; `alflow import` the file's
    prelabel column (also of a --blank export), NULL without one; the batch reports how many
    answers changed the pre-label."""
    config, store, batch_id, batch = waiting
    ids, pre = batch["item_id"].tolist(), batch["prelabel"].tolist()

    # Terminal: Enter accepts item 1's pre-label, '2' (spam) answers item 2 (pre-label spam),
    # '2' (spam) changes item 3's pre-label ham; then quit.
    assert pre[:3] == ["ham", "spam", "ham"]
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"], input="\r22q")
    assert result.exit_code == 0, result.output
    cli = rows_of(store, batch_id)
    assert cli["label"].tolist() == ["ham", "spam", "spam"]
    assert cli["prelabel_shown"].tolist() == pre[:3]

    # A --blank export keeps the prelabel column: its value is what the reviewer saw.
    out = tmp_path / "blank.jsonl"
    assert runner.invoke(app, ["export", str(out), "--config", str(config), "--blank"]).exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prelabel"] for r in rows] == pre
    rows[3]["label"], rows[4]["label"] = pre[3], other(pre[4])
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[3:5]))
    result = runner.invoke(app, ["import", str(out), "--config", str(config), "-a", "bo"])
    assert result.exit_code == 0, result.output
    assert "2 new (1 kept the pre-label, 1 changed it)" in result.output

    # A file without a prelabel column: nothing is known to have been shown.
    bare = tmp_path / "bare.csv"
    pd.DataFrame({"item_id": [ids[5]], "label": ["skip"]}).to_csv(bare, index=False)
    result = runner.invoke(app, ["import", str(bare), "--config", str(config), "-a", "bo", "--batch", batch_id])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("1 new.")

    labels = rows_of(store, batch_id)
    shown = dict(zip(zip(labels["item_id"], labels["origin"]), labels["prelabel_shown"]))
    assert shown[(ids[3], "import")] == pre[3] and shown[(ids[4], "import")] == pre[4]
    assert pd.isna(shown[(ids[5], "import")])
    assert store.prelabel_agreement(batch_id) == {
        "answers": 6, "shown": 5, "kept": 3, "changed": 2, "skipped": 0, "not_shown": 1}
    assert LabelWrite(new=20, accepted_prelabel=18, changed_prelabel=2).summary() == \
        "20 new (18 kept the pre-label, 2 changed it)"


# -- paused cycles (Prefect test server) ------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_api) -> Path:
    """A project folder after one simulated cycle over 600 SMS rows: model v1 promoted."""
    from alflow.flows.cycle import active_learning_cycle

    folder = tmp_path_factory.mktemp("trained")
    corpus = folder / "sms_600.csv"
    corpus.write_text("".join(SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:601]), encoding="utf-8")
    config = write_config(folder, labels=CLASSES, source_path=corpus, batch_size=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ALFLOW_QUERY__BATCH_SIZE", "30")
        first = active_learning_cycle(str(config), auto=True)
    assert first["model_version"] == 1 and first["promoted"], first
    return folder


def project(trained: Path, tmp_path: Path) -> tuple[Path, Store]:
    folder = tmp_path / "project"
    shutil.copytree(trained, folder)
    config = folder / "alflow.toml"
    settings = load_config(config)
    return config, Store(settings.database, settings.store.lock_timeout_seconds)


def run_log_messages(caplog) -> list[str]:
    """The flow runs' log lines this test saw (what the run's page in the UI lists)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("prefect.flow_runs")]


@pytest.mark.slow
def test_resume_form_keeps_untouched_defaults_and_records_changes(trained, tmp_path, caplog):
    """While the run waits, 'ana' answers items 1-2 in the terminal; the Resume form, as
    'ana', comes back with item 1 untouched (its pre-label) and item 2 changed: item 1
    keeps the terminal answer, item 2 gets a correction, every row has its pre-label.
    The summary lines say it in plain English, and the batch's artifact says it is labeled."""
    import logging

    from prefect.flow_runs import resume_flow_run
    from test_flows import FlowThread, run_artifacts, wait_until_paused

    from alflow.flows.cycle import active_learning_cycle
    from alflow.tasks.review import field_name

    caplog.set_level(logging.INFO, logger="prefect.flow_runs")
    config, store = project(trained, tmp_path)
    flow = FlowThread(active_learning_cycle, str(config), ingest_sources=False)
    batch = wait_until_paused(store)
    batch_id = batch["batch_id"]
    items = store.batch_items(batch_id)
    # the last item is the control slice's: blind, so it has no pre-label and no default
    assert len(items) == 8 and items["prelabel"].iloc[:7].isin(CLASSES).all()
    assert items["picked_by"].iloc[7] == "control" and items["prelabel"].isna().iloc[7]
    pre = items["prelabel"].tolist()
    ids = items["item_id"].tolist()
    digit = {c: str(i) for i, c in enumerate(CLASSES, start=1)}

    # Terminal: item 1 answered against its pre-label, item 2 accepted (Enter).
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"],
                           input=digit[other(pre[0])] + "\rq")
    assert result.exit_code == 0, result.output

    values = {field_name(r.rank): r.prelabel for r in items.itertuples()}  # the form's defaults
    values[field_name(2)] = other(pre[1])  # deliberately changed: a correction of ana's answer
    values[field_name(3)] = "skip"
    values[field_name(8)] = CLASSES[0]  # the control item has no default: ana chooses
    values["annotator"] = "ana"
    resume_flow_run(UUID(batch["flow_run_id"]), run_input=values)
    flow.join()
    assert flow.error is None, flow.error

    labels = rows_of(store, batch_id)
    history = {i: labels[labels["item_id"] == i][["label", "origin"]].values.tolist() for i in ids}
    assert history[ids[0]] == [[other(pre[0]), "cli"]]  # the untouched default is not recorded
    assert history[ids[1]] == [[pre[1], "cli"], [other(pre[1]), "ui"]]  # the change is
    assert history[ids[2]] == [["skip", "ui"]]
    for i, p in zip(ids[3:7], pre[3:7]):
        assert history[i] == [[p, "ui"]]
    assert history[ids[7]] == [[CLASSES[0], "ui"]]
    assert set(labels["annotator"]) == {"ana"}
    # every row, terminal or form, keeps the pre-label its item was shown with
    shown = [None if not isinstance(v, str) else v for v in labels["prelabel_shown"]]
    assert shown == [pre[ids.index(i)] if isinstance(pre[ids.index(i)], str) else None for i in labels["item_id"]]
    assert store.batch(batch_id)["status"] == "labeled"
    effective = store.query_df("SELECT item_id, label FROM effective_labels WHERE item_id IN (?, ?)", ids[:2])
    assert dict(effective.values.tolist()) == {ids[0]: other(pre[0]), ids[1]: other(pre[1])}

    written = flow.result["labels_written"]
    assert (written["new"], written["corrections"], written["kept"]) == (6, 1, 1)
    assert LabelWrite(**written).summary() == \
        "6 new, 1 corrections (4 kept the pre-label, 1 changed it, 1 skipped), 1 already answered in this batch (kept)"
    assert store.prelabel_agreement(batch_id) == {
        "answers": 8, "shown": 7, "kept": 4, "changed": 2, "skipped": 1, "not_shown": 1}
    from alflow.tasks.report import markdown_text

    line = ("8 answers, 4 kept the pre-label, 2 changed it, 1 skipped, 1 given without a pre-label "
            "(7 from the Resume form, 1 from the terminal)")
    artifacts = run_artifacts(batch["flow_run_id"])
    assert f"- batch `{batch_id}`: {markdown_text(line)}" in artifacts["cycle-summary"].data
    logged = run_log_messages(caplog)
    assert f"batch {batch_id}: {line}" in logged
    assert (f"batch {batch_id}: the form changed 1 answer given while the run waited; 1 answer given while the "
            "run waited kept, its field left at the default") in logged
    # the batch's artifact, once waiting for review, now says it is finished and what came back
    review = artifacts["review-batch"]
    assert review.description == f"Batch {batch_id}: 8 items, labeled: {line}."
    answers = store.batch_items(batch_id)["answer"].tolist()
    assert [row["answer"] for row in json.loads(review.data)] == [markdown_text(a) for a in answers]
    assert artifacts["review-form"].description.startswith(f"Batch {batch_id}: labeled; its review is over")


@pytest.mark.slow
def test_resume_with_stored_answers_records_none_again(trained, tmp_path, caplog):
    """`alflow resume --skip-rest` by another annotator: the terminal answers are not
    re-recorded under that name; the skips were shown nothing (prelabel_shown NULL). The
    run says the answers came from the terminal, not that a form changed none."""
    import logging

    from test_flows import FlowThread, wait_until_paused

    from alflow.flows.cycle import active_learning_cycle

    caplog.set_level(logging.INFO, logger="prefect.flow_runs")
    config, store = project(trained, tmp_path)
    flow = FlowThread(active_learning_cycle, str(config), ingest_sources=False)
    batch = wait_until_paused(store)
    batch_id = batch["batch_id"]
    items = store.batch_items(batch_id)
    pre = items["prelabel"].tolist()
    digit = {c: str(i) for i, c in enumerate(CLASSES, start=1)}
    result = runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"],
                           input=digit[other(pre[0])] + "\rq")
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["resume", "--config", str(config), "--skip-rest", "-a", "bo"])
    assert result.exit_code == 0, result.output
    flow.join()
    assert flow.error is None, flow.error
    assert flow.result["labels_written"]["new"] == 0  # the run re-recorded nothing

    labels = rows_of(store, batch_id)
    assert len(labels) == len(items)
    ana, bo = labels[labels["annotator"] == "ana"], labels[labels["annotator"] == "bo"]
    assert ana["label"].tolist() == [other(pre[0]), pre[1]] and ana["prelabel_shown"].tolist() == pre[:2]
    assert set(bo["label"]) == {"skip"} and bo["prelabel_shown"].isna().all()
    assert set(bo["item_id"]) == set(items["item_id"][2:])
    assert store.prelabel_agreement(batch_id) == {
        "answers": 8, "shown": 2, "kept": 1, "changed": 1, "skipped": 0, "not_shown": 6}
    logged = run_log_messages(caplog)
    assert f"batch {batch_id}: resumed with the answers already stored (from the terminal); none recorded again" \
        in logged
    assert f"batch {batch_id}: 8 answers, 1 kept the pre-label, 1 changed it, 6 given without a pre-label " \
        "(from the terminal)" in logged
    assert not any("the form changed" in line for line in logged)
