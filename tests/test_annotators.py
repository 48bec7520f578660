"""Several annotators (issue 15): agreement figures, overlap, adjudication, Label Studio files,
labeling time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_config
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app
from alflow.tasks.agreement import agreement_of, cohen_kappa, krippendorff_alpha
from alflow.tasks.store import Store

runner = CliRunner()
N = None


# -- the figures, against hand-computed cases ----------------------------------------------
def test_cohen_kappa_by_hand():
    # p_o = 4/5; p_e = 3/5 * 2/5 + 2/5 * 3/5 = 0.48; kappa = (0.8 - 0.48) / 0.52
    assert cohen_kappa(list("yynny"), list("ynnny")) == pytest.approx(0.32 / 0.52)
    # missing answers drop the pair: the same figure with two half-answered items added
    assert cohen_kappa(list("yynny") + ["y", N], list("ynnny") + [N, "n"]) == pytest.approx(0.32 / 0.52)
    assert cohen_kappa(list("ab"), list("ab")) == 1.0
    # systematic disagreement: p_o = 0, p_e = 0.5
    assert cohen_kappa(list("abab"), list("baba")) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa(list("aa"), list("aa")))  # no variation: undefined
    assert math.isnan(cohen_kappa(["a", N], [N, "b"]))  # no item answered by both
    with pytest.raises(ValueError):
        cohen_kappa(["a"], ["a", "b"])


def test_krippendorff_alpha_by_hand_with_missing_answers():
    # Two coders, four items: coincidences o_xx = 2, o_xy = o_yx = 1, o_yy = 4; n_x = 3,
    # n_y = 5, n = 8. alpha = 1 - (n - 1) * 2 / (n^2 - 3^2 - 5^2) = 1 - 7 * 2 / 30.
    two = [["x", "x", "y", "y"], ["x", "y", "y", "y"]]
    assert krippendorff_alpha(two) == pytest.approx(1 - 14 / 30)
    # A third coder answering nothing, and a fifth item only one coder answered: no change.
    padded = [["x", "x", "y", "y", "x"], ["x", "y", "y", "y", N], [N, N, N, N, float("nan")]]
    assert krippendorff_alpha(padded) == pytest.approx(1 - 14 / 30)
    # Krippendorff's own example (Computing Krippendorff's alpha-reliability, 2011): four
    # coders, twelve items, many answers missing; nominal alpha = 0.743.
    reliability = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, N, N, N],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, N, 3],
        [N, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, N],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, N],
    ]
    assert krippendorff_alpha(reliability) == pytest.approx(0.7434, abs=1e-4)
    assert krippendorff_alpha([["a", "b"], ["a", "b"]]) == 1.0
    assert math.isnan(krippendorff_alpha([["a", "a"], ["a", "a"]]))
    # Two coders, no missing: alpha is close to kappa (it corrects for the sample size)
    a, b = list("yynny"), list("ynnny")
    assert krippendorff_alpha([a, b]) == pytest.approx(1 - 9 * 2 / (100 - 25 - 25), abs=1e-9)


def test_krippendorff_alpha_matches_the_krippendorff_package():
    krippendorff = pytest.importorskip("krippendorff")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 3, size=(3, 40)).astype(float)
    data[rng.random(data.shape) < 0.2] = np.nan
    expected = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal")
    assert krippendorff_alpha(data.tolist()) == pytest.approx(expected)


def test_agreement_of_answers_per_annotator_and_prelabel():
    frame = pd.DataFrame({
        "item_id": ["i1", "i1", "i2", "i2", "i3", "i3", "i4"],
        "annotator": ["ann", "bo", "ann", "bo", "ann", "bo", "ann"],
        "label": ["x", "x", "x", "y", "y", "skip", "y"],
        "prelabel_shown": ["x", "x", "x", "x", None, None, "x"],
        "effective": ["x", "x", "x", "x", "y", "y", "y"],
    })
    report = agreement_of(frame)
    assert report["items_overlapping"] == 2  # i3's skip is no answer, i4 has one
    assert report["kappa"] == pytest.approx(cohen_kappa(["x", "x"], ["x", "y"]))
    assert report["alpha"] == pytest.approx(round(krippendorff_alpha([["x", "x"], ["x", "y"]]), 4))
    # each against the other's answer (the majority of the others), never against a
    # consensus that counts their own vote
    assert report["per_annotator"]["ann"] == {"answers": 4, "compared": 2, "agreement": 0.5}
    assert report["per_annotator"]["bo"] == {"answers": 2, "compared": 2, "agreement": 0.5}
    assert report["prelabel"] == {"shown": 5, "kept": 3, "agreement": 0.6}


def test_agreement_with_the_others_counts_ties_as_disagreement():
    """Finding 7: two annotators who agree on 1 item of 4 are reported 0.25 each (they were
    reported 1.0: ties dropped, and each one's own vote counted in the consensus)."""
    two = pd.DataFrame({"item_id": [f"i{k}" for k in (1, 1, 2, 2, 3, 3, 4, 4)],
                        "annotator": ["ann", "bo"] * 4,
                        "label": ["x", "x", "x", "y", "y", "x", "y", "x"],
                        "prelabel_shown": None, "effective": None})
    report = agreement_of(two)
    assert report["per_annotator"]["ann"]["agreement"] == 0.25
    assert report["per_annotator"]["bo"]["agreement"] == 0.25
    # three annotators: cy's others tie (x vs y) on i1, so cy cannot agree there
    three = pd.DataFrame({"item_id": ["i1", "i1", "i1", "i2", "i2", "i2"],
                          "annotator": ["ann", "bo", "cy"] * 2,
                          "label": ["x", "y", "x", "x", "x", "x"],
                          "prelabel_shown": None, "effective": None})
    report = agreement_of(three)
    assert report["per_annotator"]["cy"] == {"answers": 2, "compared": 2, "agreement": 0.5}
    assert report["per_annotator"]["bo"] == {"answers": 2, "compared": 2, "agreement": 0.5}  # i1: ann+cy say x
    assert report["per_annotator"]["ann"] == {"answers": 2, "compared": 2, "agreement": 0.5}  # i1: bo y vs cy x



# -- overlap, ties and adjudication from the terminal and files -------------------------------
@pytest.fixture
def overlap_project(tmp_path: Path, small_csv: Path, monkeypatch):
    """A project whose batches of 6 ask two annotators about half of each (review.overlap)."""
    monkeypatch.setenv("ALFLOW_REVIEW__OVERLAP", "2")
    monkeypatch.setenv("ALFLOW_REVIEW__OVERLAP_SHARE", "0.5")
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=small_csv, batch_size=6)
    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    from alflow.tasks.ingest import ingest_source

    ingest_source(settings, "corpus", "ingest-1")
    return config, settings, store


def key_for(label: str) -> str:
    return {"ham": "1", "spam": "2"}[label]


def other(label: str) -> str:
    return "spam" if label == "ham" else "ham"


def test_overlap_tie_goes_to_adjudication_and_is_resolved(overlap_project, tmp_path):
    """Ana answers a batch from a file; `alflow label --annotator bo` asks Bo only the overlap
    items he has not answered; agreement shows in `alflow status --json`; the item they tie
    on is asked first in the next batch, with both answers, and Cy's answer decides it."""
    from alflow.tasks.query import query_batch

    config, settings, store = overlap_project
    batch_id = query_batch(store, settings, None, flow_run_id=None)
    items = store.batch_items(batch_id)
    assert len(items) == 6 and sorted(items["overlap"]) == [1, 1, 1, 2, 2, 2]
    gold = store.gold_labels(items["item_id"].tolist())

    path = tmp_path / "ana.csv"
    assert runner.invoke(app, ["export", str(path), "--config", str(config)]).exit_code == 0
    frame = pd.read_csv(path, keep_default_na=False)
    assert {"answers", "annotator", "overlap"} <= set(frame.columns)
    frame["label"] = [gold[i] for i in frame["item_id"]]
    frame["annotator"] = "ana"  # the column names who answered, over --annotator
    frame.to_csv(path, index=False)
    result = runner.invoke(app, ["import", str(path), "--config", str(config), "--annotator", "nobody"])
    assert result.exit_code == 0 and "6 new" in result.output, result.output
    assert store.batch_needs(batch_id)["item_id"].tolist() == items.loc[items["overlap"] == 2, "item_id"].tolist()

    # Bo is asked the three overlap items only; he agrees on the first two, not the third.
    overlap = items[items["overlap"] == 2]
    keys = "".join(key_for(gold[i]) for i in overlap["item_id"][:2]) + key_for(other(gold[overlap["item_id"].iloc[2]]))
    result = runner.invoke(app, ["label", "--config", str(config), "--annotator", "bo", "--no-resume"], input=keys)
    assert result.exit_code == 0, result.output
    assert "3 of 6 items to answer" in result.output and "All items answered" in result.output
    bo = store.query_df("SELECT * FROM labels WHERE annotator = 'bo'")
    assert len(bo) == 3 and bo["seconds"].notna().all() and (bo["seconds"] >= 0).all()
    again = runner.invoke(app, ["label", "--config", str(config), "--annotator", "bo", "--no-resume"], input="q")
    assert "0 of 6 items to answer" in again.output

    tied = overlap["item_id"].iloc[2]
    assert tied not in set(store.query_df("SELECT item_id FROM effective_labels")["item_id"])
    report = json.loads(runner.invoke(app, ["status", "--config", str(config), "--json"]).output)["agreement"]
    ana = [gold[i] for i in overlap["item_id"]]
    bos = ana[:2] + [other(ana[2])]
    assert report["items_overlapping"] == 3 and report["annotators"] == ["ana", "bo"]
    expected = cohen_kappa(ana, bos)
    assert report["kappa"] == (None if math.isnan(expected) else pytest.approx(expected, abs=1e-4))
    # against the other annotator's answer on all three, the tie a disagreement
    assert report["per_annotator"]["bo"]["compared"] == 3
    assert report["per_annotator"]["bo"]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert report["batches"][0]["batch_id"] == batch_id and report["batches"][0]["items_overlapping"] == 3
    assert report["adjudication_pending"] == 0  # not while its batch is still open
    store.close_batch(batch_id, "labeled")  # what the resumed run does
    status = runner.invoke(app, ["status", "--config", str(config)])
    assert "on 3 items answered by 2+ annotators" in status.output and "1 item waiting for adjudication" in status.output

    # The next batch asks about the tie first, showing both answers and who gave them.
    second = query_batch(store, settings, None, flow_run_id=None)
    asked = store.batch_items(second)
    assert asked.iloc[0]["item_id"] == tied and asked.iloc[0]["picked_by"] == "adjudication"
    assert asked.iloc[0]["overlap"] == 1 and not (asked["item_id"].iloc[1:] == tied).any()
    path2 = tmp_path / "second.csv"
    assert runner.invoke(app, ["export", str(path2), "--config", str(config)]).exit_code == 0
    exported = pd.read_csv(path2, keep_default_na=False)
    assert exported.loc[0, "answers"] == f"Answers disagree, your answer decides. Given: ana: {ana[2]}, bo: {bos[2]}"
    assert exported.loc[0, "label"] == "" and exported.loc[0, "picked_by"] == "adjudication"
    result = runner.invoke(app, ["label", "--config", str(config), "--annotator", "cy", "--no-resume"],
                           input=key_for(bos[2]) + "q")
    assert result.exit_code == 0, result.output
    assert "Answers disagree" in result.output and f"ana: {ana[2]}, bo: {bos[2]}" in result.output
    history = store.query_df("SELECT annotator, label, origin FROM labels WHERE item_id = ? ORDER BY label_id", [tied])
    assert history.values.tolist() == [["ana", ana[2], "import"], ["bo", bos[2], "cli"],
                                       ["cy", bos[2], "adjudication"]]  # nothing overwritten
    effective = store.query_df("SELECT label FROM effective_labels WHERE item_id = ?", [tied])
    assert effective["label"].item() == bos[2]
    assert store.needs_adjudication(settings.review.adjudication_threshold).empty


def test_label_studio_export_import_round_trip(overlap_project, tmp_path):
    """`alflow export --format label-studio`: tasks with the pre-label as a prediction and the
    answers as annotations; answers given in Label Studio (several annotators, a skip, the
    time spent) come back with `alflow import FILE.json`, and the file as exported adds nothing."""
    config, _, store = overlap_project
    ids = store.query_df("SELECT item_id FROM items ORDER BY item_id LIMIT 4")["item_id"].tolist()
    picks = pd.DataFrame({"item_id": ids, "rank": range(1, 5), "score": 0.5, "prelabel": ["ham", "spam"] * 2,
                          "confidence": 0.7, "picked_by": "uncertainty", "overlap": [2, 1, 1, 1]})
    batch_id = store.create_batch(None, "margin", 3, picks)
    runner.invoke(app, ["label", "--config", str(config), "-a", "ana", "--no-resume"], input="\rq")

    path = tmp_path / "tasks.json"
    result = runner.invoke(app, ["export", str(path), "--config", str(config)])
    assert result.exit_code == 0 and '<Choices name="label" toName="text"' in result.output, result.output
    tasks = json.loads(path.read_text())
    assert [t["data"]["item_id"] for t in tasks] == ids
    first = tasks[0]
    assert first["predictions"] == [{"model_version": "alflow-v3", "score": 0.7, "result": [
        {"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["ham"]}}]}]
    assert len(first["annotations"]) == 1 and first["annotations"][0]["created_username"] == "ana"
    assert first["annotations"][0]["result"][0]["value"]["choices"] == ["ham"]
    assert first["annotations"][0]["lead_time"] >= 0
    assert tasks[1]["annotations"] == []

    unchanged = runner.invoke(app, ["import", str(path), "--config", str(config)])
    assert unchanged.exit_code == 0 and "0 new, 1 already recorded" in unchanged.output, unchanged.output

    def annotation(choice: str | None, **extra) -> dict:
        result = [] if choice is None else [{"from_name": "label", "to_name": "text", "type": "choices",
                                             "value": {"choices": [choice]}}]
        return {"result": result, "was_cancelled": choice is None, **extra}

    first["annotations"].append(annotation("spam", completed_by=7, lead_time=4.5))
    tasks[1]["annotations"] = [annotation("ham", created_username="bo@example.org, 2", lead_time=2.0)]
    tasks[2]["annotations"] = [annotation(None, completed_by={"id": 3, "email": "cy@example.org"})]
    path.write_text(json.dumps(tasks))
    result = runner.invoke(app, ["import", str(path), "--config", str(config), "--format", "label-studio"])
    assert result.exit_code == 0 and "3 new" in result.output and "1 rows had no label" in result.output, result.output
    rows = store.query_df("SELECT item_id, annotator, label, origin, prelabel_shown, seconds FROM labels "
                          "WHERE batch_id = ? AND origin = 'import' ORDER BY label_id", [batch_id])
    assert rows[["item_id", "annotator", "label", "prelabel_shown"]].values.tolist() == [
        [ids[0], "ls-user-7", "spam", "ham"],
        [ids[1], "bo@example.org", "ham", "spam"],
        [ids[2], "cy@example.org", "skip", "ham"],
    ]
    assert rows["seconds"].iloc[:2].tolist() == [4.5, 2.0] and pd.isna(rows["seconds"].iloc[2])
    # the tie between ana and ls-user-7 on item 1 now waits for adjudication
    assert store.needs_adjudication(0.5)["item_id"].tolist() == []  # (it is still in the open batch)
    store.close_batch(batch_id, "labeled")
    assert store.needs_adjudication(0.5)["item_id"].tolist() == [ids[0]]

    tasks[3]["annotations"] = [annotation("eggs")]
    path.write_text(json.dumps(tasks))
    closed = runner.invoke(app, ["import", str(path), "--config", str(config), "--batch", batch_id])
    assert closed.exit_code == 1 and f"batch {batch_id} is labeled since" in closed.output
    assert "pass --late" in closed.output and len(closed.output.strip().splitlines()) == 1
    line = runner.invoke(app, ["import", str(path), "--config", str(config), "--batch", batch_id, "--late"])
    assert line.exit_code == 1 and "tasks.json task 4" in line.output and "'eggs'" in line.output


# -- the Resume form: overlap rounds, then adjudication, through pause/resume ----------------
def paused_form(flow_run_id: str, key: str, timeout: float = 60, part: str = "schema") -> dict | str:
    """The schema (or with ``part="description"`` the text shown above it) of the form a run
    waits with once it is paused under pause key ``key``."""
    import time
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.input.actions import read_flow_run_input

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(UUID(flow_run_id)).state
            if state.is_paused() and state.state_details.pause_key == key:
                return read_flow_run_input(state.state_details.run_input_keyset[part], flow_run_id=UUID(flow_run_id))
            assert time.monotonic() < deadline, f"run {flow_run_id} did not pause for {key} ({state.name})"
            time.sleep(0.3)


@pytest.mark.usefixtures("prefect_api")
def test_overlap_rounds_and_adjudication_through_pause_and_resume(tmp_path, small_csv, monkeypatch):
    """Cycle 1 asks two annotators about 2 of its 5 items: Ana's form, then the run stops
    again (review-2) with a form of those 2 items for someone new; Bo answers them with
    `alflow label`, which resumes the run, and disagrees on one: a tie. Cycle 2's form asks about it first, showing both answers, and Cy's answer decides."""
    from prefect.flow_runs import resume_flow_run
    from test_flows import FlowThread, wait_until_paused

    from alflow.flows.cycle import active_learning_cycle
    from alflow.tasks.review import field_name, field_rank

    monkeypatch.setenv("ALFLOW_REVIEW__OVERLAP", "2")
    monkeypatch.setenv("ALFLOW_REVIEW__OVERLAP_SHARE", "0.4")
    monkeypatch.setenv("ALFLOW_QUERY__CONTROL_TRAINS", "true")  # every answer trains (the tie may be a control item)
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=small_csv, batch_size=5)
    store = Store(load_config(config).database)
    flow = FlowThread(active_learning_cycle, str(config))
    batch = wait_until_paused(store)
    run_id = batch["flow_run_id"]
    items = store.batch_items(batch["batch_id"])
    gold = store.gold_labels(items["item_id"].tolist())
    values = {field_name(r.rank): gold[r.item_id] for r in items.itertuples()}
    resume_flow_run(__import__("uuid").UUID(run_id), run_input=dict(values, annotator="ana"))

    schema = paused_form(run_id, "review-2")
    overlap = items[items["overlap"] == 2]
    assert len(overlap) == 2
    fields = [name for name in schema["properties"] if field_rank(name) is not None]
    assert fields == [field_name(r) for r in overlap["rank"]]  # '#3', '#5': as the reviewer numbers them
    assert paused_form(run_id, "review-2", part="description").startswith(
        f"**Batch {batch['batch_id']}: 2 items.**\n\n2 items of this batch still need an independent answer")
    assert "default" not in schema["properties"]["annotator"]  # someone new must name themselves
    assert store.batch(batch["batch_id"])["status"] == "open"
    waiting = json.loads(runner.invoke(app, ["status", "--config", str(config), "--json"]).output)["waiting"]
    assert [(w["answered"], w["size"]) for w in waiting] == [(3, 5)]  # two items wait for a second answer
    early = runner.invoke(app, ["resume", "--config", str(config)])
    assert early.exit_code == 1 and "2 items in batch" in early.output and "another annotator" in early.output
    first, tied = overlap["item_id"]
    # Bo answers in the terminal instead: asked those two items only, then it resumes the run
    # with the fields of the form it waits with.
    keys = key_for(gold[first]) + key_for(other(gold[tied]))
    result = runner.invoke(app, ["label", "--config", str(config), "--annotator", "bo"], input=keys)
    assert result.exit_code == 0, result.output
    assert "2 of 5 items to answer" in result.output and "Resumed run" in result.output
    flow.join()
    assert flow.error is None, flow.error
    assert store.batch(batch["batch_id"])["status"] == "labeled"
    rows = store.query_df("SELECT annotator, origin, seconds, form_seconds FROM labels WHERE batch_id = ?",
                          [batch["batch_id"]])
    assert (rows["annotator"] == "ana").sum() == 5 and (rows["annotator"] == "bo").sum() == 2
    assert set(rows["origin"]) == {"ui", "cli"}
    # measured time (the terminal) in seconds; the form's wait apart, never labeling time
    form, terminal = rows[rows["origin"] == "ui"], rows[rows["origin"] == "cli"]
    assert form["seconds"].isna().all() and form["form_seconds"].notna().all()
    assert terminal["seconds"].notna().all() and terminal["form_seconds"].isna().all()
    agreement = flow.result["agreement"]
    assert agreement["batch"]["items_overlapping"] == 2 and agreement["adjudication_pending"] == 1
    assert flow.result["n_labels"] == 4  # the tie has no label yet
    from test_flows import run_artifacts

    summary = run_artifacts(run_id)["cycle-summary"].data.replace("\\", "")  # as rendered
    assert "on 2 items answered by 2+ annotators" in summary and "1 item waiting for adjudication" in summary

    monkeypatch.setenv("ALFLOW_REVIEW__OVERLAP", "1")
    second = FlowThread(active_learning_cycle, str(config), ingest_sources=False)
    batch2 = wait_until_paused(store)
    schema = paused_form(batch2["flow_run_id"], "review")
    asked = store.batch_items(batch2["batch_id"])
    assert asked.iloc[0]["item_id"] == tied and asked.iloc[0]["picked_by"] == "adjudication"
    field = schema["properties"][field_name(1)]
    assert field["title"].startswith("ADJUDICATE #1") and "default" not in field
    # the adjudication comes on top of query.batch_size, and the form says so
    assert paused_form(batch2["flow_run_id"], "review", part="description").startswith(
        f"**Batch {batch2['batch_id']}: {len(asked) - 1} items + 1 adjudication.**")
    assert f"Given: ana: {gold[tied]}, bo: {other(gold[tied])}" in field["description"].replace("\\", "")
    gold.update(store.gold_labels(asked["item_id"].tolist()))
    values = {field_name(r.rank): other(gold[tied]) if r.rank == 1 else gold[r.item_id] for r in asked.itertuples()}
    resume_flow_run(__import__("uuid").UUID(batch2["flow_run_id"]), run_input=dict(values, annotator="cy"))
    second.join()
    assert second.error is None, second.error
    history = store.query_df("SELECT annotator, origin FROM labels WHERE item_id = ? ORDER BY label_id", [tied])
    assert history.values.tolist() == [["ana", "ui"], ["bo", "cli"], ["cy", "adjudication"]]
    assert store.query_df("SELECT label FROM effective_labels WHERE item_id = ?", [tied])["label"].item() == \
        other(gold[tied])
    assert second.result["labels_written"]["adjudicated"] == 1
    assert second.result["n_labels"] == 4 + len(asked)  # the resolved tie trains now
