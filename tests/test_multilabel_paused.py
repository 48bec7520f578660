"""A multi-label project paused for review and finished the ways people finish it (issue 25).

One `alflow run --cycles 3` process over a copy of the bundled example
(examples/multi_label.toml: 60 items of data/ag_news_multilabel.csv, batches of 7; in a
folder whose name has a space) on the session's Prefect test server, without --auto:
cycle 1's cold-start batch is answered through the Resume form's input, cycle 2's batch
(model pre-labels) through a CSV file, cycle 3's in the terminal, each with the commands
the run printed for it, pasted as they are."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
from conftest import REPO
from test_flows import paused_form_parts, store_for, wait_until_paused
from typer.testing import CliRunner

from alflow.flows.cli import app
from alflow.tasks.multilabel.tags import format_tags, parse_tags
from alflow.tasks.review import field_name, shown_prelabel
from alflow.tasks.store import CONTROL, Store

runner = CliRunner()
TAGS = ["business", "scitech", "sports", "world"]
BATCH = 7


def example_copy(directory: Path, rows: int = 60) -> Path:
    """examples/multi_label.toml with its database, models and source in ``directory``, the
    source its first ``rows`` rows, batches of :data:`BATCH` and a 1 s review poll."""
    with (REPO / "data" / "ag_news_multilabel.csv").open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        sample = [row for _, row in zip(range(rows), reader)]
    source = directory / "news.csv"
    with source.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "labels"])
        writer.writeheader()
        writer.writerows(sample)
    text = (REPO / "examples" / "multi_label.toml").read_text(encoding="utf-8")
    for old, new in [('"../.alflow/multi_label/alflow.duckdb"', '"state/alflow.duckdb"'),
                     ('"../.alflow/multi_label/models"', '"state/models"'),
                     ('"../data/ag_news_multilabel.csv"', '"news.csv"'),
                     ("batch_size = 20", f"batch_size = {BATCH}")]:
        assert old in text, old
        text = text.replace(old, new)
    path = directory / "multi_label.toml"
    path.write_text(text + "\n[review]\npoll_interval_seconds = 1\n", encoding="utf-8")
    return path


def wait_for_next(store: Store, after: set[str], timeout: float = 120) -> dict:
    """The open batch that is not one of ``after``, once its run is paused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = wait_until_paused(store, timeout=deadline - time.monotonic())
        if batch["batch_id"] not in after:
            return batch
        time.sleep(0.3)
    raise AssertionError("no new batch paused in time")


def printed_commands(out: Path, batch_id: str) -> dict[str, list[str]]:
    """The `alflow` commands the run printed to label ``batch_id`` ('in a terminal:', 'with
    files:'), split as a shell splits them: {'label': [...], 'export': [...], ...}, each
    without the program."""
    text = out.read_text(encoding="utf-8")
    lines = text[text.index(f"Batch {batch_id} "):].splitlines()
    terminal = next(line for line in lines if "in a terminal:" in line).split(":", 1)[1]
    files = next(line for line in lines if "with files:" in line).split(":", 1)[1]
    commands = [shlex.split(terminal)] + [shlex.split(part.strip().removeprefix("then "))
                                          for part in files.split(", ") if part.strip() != "edit"]
    assert all(Path(args[0]).name == "alflow" for args in commands), commands
    return {args[1]: args[1:] for args in commands}


def labels_of(store: Store, batch_id: str) -> pd.DataFrame:
    return store.query_df("SELECT item_id, label, prelabel_shown, origin, annotator FROM labels "
                          "WHERE batch_id = ? ORDER BY label_id", [batch_id])


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_api):
    """(config, store, the `alflow run` process, its stdout file): the run, paused on its
    cold-start batch; killed at the end if a test left it running."""
    from prefect.settings import get_current_settings

    directory = tmp_path_factory.mktemp("multi label paused")
    config = example_copy(directory)
    env = dict(os.environ, PREFECT_API_URL=str(get_current_settings().api.url), PREFECT_LOGGING_LEVEL="INFO",
               PYTHONUNBUFFERED="1")  # INFO: what a person sees, the commands to label each batch included
    out = directory / "run.out"
    with out.open("w", encoding="utf-8") as handle:
        process = subprocess.Popen([sys.executable, "-m", "alflow.flows.cli", "run", "--config", str(config),
                                    "--cycles", "3", "--no-progress"], cwd=REPO, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
    try:
        yield config, store_for(config), process, out
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)


def test_cold_start_answered_through_the_resume_form(run):
    """The cold start pauses with nothing preselected; the form's input (each item's gold
    set, one skipped, one "none of these tags apply") is what is stored, and the next cycle
    pauses with the model's pre-labels."""
    from prefect.flow_runs import resume_flow_run

    config, store, process, out = run
    batch = wait_until_paused(store, timeout=120)
    items = store.batch_items(batch["batch_id"])
    assert len(items) == BATCH and items["prelabel"].isna().all()
    gold = store.gold_labels(items["item_id"].tolist())
    values = {field_name(r.rank): sorted(parse_tags(gold[r.item_id])) for r in items.itertuples()}
    values[field_name(2)] = ["skip"]
    values[field_name(3)] = []
    resume_flow_run(UUID(batch["flow_run_id"]), run_input=values | {"annotator": "ana"})

    second = wait_for_next(store, {batch["batch_id"]})
    stored = labels_of(store, batch["batch_id"])
    by_rank = dict(zip(items["item_id"], items["rank"]))
    expected = {r.item_id: format_tags(values[field_name(r.rank)]) if r.rank != 2 else "skip"
                for r in items.itertuples()}
    assert dict(zip(stored["item_id"], stored["label"])) == expected
    assert stored["prelabel_shown"].isna().all() and set(stored["annotator"]) == {"ana"}
    assert {by_rank[i] for i, label in zip(stored["item_id"], stored["label"]) if label == ""} == {3}
    # The next form preselects the model's pre-labels' tags (the empty set and the blind
    # control item: nothing), as the Prefect UI reads the paused run's form.
    upcoming = store.batch_items(second["batch_id"])
    offered = {r.rank: shown_prelabel(r) for r in upcoming.itertuples()}
    assert list(offered.values()).count(None) == 1, offered  # the control item, blind
    schema, _ = paused_form_parts(second["flow_run_id"])
    assert {rank: schema["properties"][field_name(rank)]["default"] for rank in offered} == \
        {rank: sorted(parse_tags(pre)) for rank, pre in offered.items()}
    assert process.poll() is None


def test_a_batch_finished_from_a_csv_file(run, tmp_path):
    """Export (the labels cells pre-filled with the pre-labels, `none` for the empty set), keep
    a tag set and an empty set as exported, change one, `none` one, `skip` one, leave one
    empty; a bad tag first stops the import in one line with nothing stored; `alflow resume`
    refuses while one waits, `--skip-rest` skips it; the run trains on exactly those answers,
    and the closed batch takes no late file."""
    config, store, process, out = run
    batch = store.batches("open").iloc[0].to_dict()
    items = store.batch_items(batch["batch_id"])
    path = tmp_path / "batch.csv"
    printed = {name: [str(path) if arg == "batch.csv" else arg for arg in args]
               for name, args in printed_commands(out, batch["batch_id"]).items()}
    result = runner.invoke(app, printed["export"])
    assert result.exit_code == 0, result.output
    assert "none for \"none of these tags apply\"" in result.output
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    offered = {r.item_id: shown_prelabel(r) for r in items.itertuples()}
    spelled = {i: ("none" if p == "" else p) if p is not None else "" for i, p in offered.items()}
    assert dict(zip(frame["item_id"], frame["labels"])) == spelled
    assert dict(zip(frame["item_id"], frame["prelabel"])) == spelled

    gold = store.gold_labels(items["item_id"].tolist())
    prefilled = [i for i in frame["item_id"] if offered[i] is not None]
    tagged = [i for i in prefilled if offered[i]]
    untagged = [i for i in prefilled if not offered[i]]  # the model's "none of these tags apply"
    assert len(prefilled) == BATCH - 1 and tagged and untagged, offered
    kept = [tagged[0], untagged[0]]  # accepted as exported: a tag set and the empty set ("none")
    rest = sorted(set(prefilled) - set(kept), key=lambda i: (offered[i] == "", prefilled.index(i)))
    changed, none, skipped, empty = rest
    edits = {changed: "scitech ; world" if offered[changed] != "scitech;world" else "business",
             none: "none", skipped: "skip", empty: ""}
    blind = [i for i in frame["item_id"] if offered[i] is None]  # the control item: typed in
    edits |= {i: gold[i] or "none" for i in blind}

    # Saved as a spreadsheet saves "CSV UTF-8": a byte order mark first, CRLF line ends.
    frame["labels"] = [edits.get(i, cell) for i, cell in zip(frame["item_id"], frame["labels"])]
    typo = tmp_path / "typo.csv"  # first a sheet cut down to two columns, with a tag not in labels
    frame[["item_id", "labels"]].replace({edits[changed]: "scitech;politics"}).to_csv(
        typo, index=False, encoding="utf-8-sig", lineterminator="\r\n")
    bad = runner.invoke(app, ["import", str(typo), "--config", str(config), "--annotator", "bo"])
    assert bad.exit_code == 1 and bad.output.strip().splitlines() == [
        f"error: typo.csv line {frame.index[frame['item_id'] == changed][0] + 2}: tag 'politics' is not one of "
        f"{TAGS}"], bad.output
    assert labels_of(store, batch["batch_id"]).empty
    frame.to_csv(path, index=False, encoding="utf-8-sig", lineterminator="\r\n")

    result = runner.invoke(app, printed["import"] + ["--annotator", "bo"])
    assert result.exit_code == 0, result.output
    expected = {i: offered[i] for i in kept} | {changed: format_tags(parse_tags(edits[changed])), none: "",
                                                 skipped: "skip"} | {i: gold[i] for i in blind}
    accepted = sum(expected[i] == offered[i] for i in expected)
    assert f"Batch {batch['batch_id']}: {BATCH - 1} new ({accepted} kept the pre-label, {4 - accepted} changed " \
           "it, 1 skipped); 1 rows had no label and wait." in " ".join(result.output.split()), result.output
    early = runner.invoke(app, printed["resume"] + ["--annotator", "bo"])
    assert early.exit_code == 1 and f"1 of {BATCH} items" in early.output and "--skip-rest" in early.output
    result = runner.invoke(app, printed["resume"] + ["--skip-rest", "--annotator", "bo"])
    assert result.exit_code == 0, result.output

    third = wait_for_next(store, {batch["batch_id"]})
    stored = labels_of(store, batch["batch_id"])
    answers = dict(zip(stored["item_id"], stored["label"]))
    assert answers == expected | {empty: "skip"} and answers[kept[1]] == ""  # the accepted empty set is an answer
    shown = dict(zip(stored["item_id"], stored["prelabel_shown"]))
    from_file = [i for i in prefilled if i != empty]
    assert {i: shown[i] for i in from_file} == {i: offered[i] for i in from_file}
    assert pd.isna(shown[empty]) and all(pd.isna(shown[i]) for i in blind)  # --skip-rest: nobody looked at it
    origins = dict(zip(stored["item_id"], stored["origin"]))
    assert origins[empty] == "cli" and {origins[i] for i in from_file + blind} == {"import"}
    assert empty not in set(store.batch_items(third["batch_id"])["item_id"])  # a skip is not asked again
    assert store.batch(batch["batch_id"])["status"] == "labeled"

    # The model trained after this batch: on every answer so far but skips and control answers.
    model = store.query_df("SELECT * FROM models ORDER BY model_version DESC LIMIT 1").iloc[0]
    control = set(store.query_df("SELECT item_id FROM batch_items WHERE picked_by = ?", [CONTROL])["item_id"])
    every = store.query_df("SELECT item_id, label, label_id FROM labels")
    trained = every[(every["label"] != "skip") & ~every["item_id"].isin(control)]
    assert int(model["model_version"]) == 2 and model["task"] == "multi_label" and len(model["thresholds"]) == 4
    assert int(model["n_labels"]) == trained["item_id"].nunique()
    assert int(model["label_watermark"]) == int(every["label_id"].max())

    late = runner.invoke(app, ["import", str(path), "--config", str(config), "--batch", batch["batch_id"]])
    assert late.exit_code == 1 and len(late.output.strip().splitlines()) == 1 and "--late" in late.output
    assert len(labels_of(store, batch["batch_id"])) == len(stored)
    shown_batch = runner.invoke(app, ["show", batch["batch_id"], "--config", str(config)], terminal_width=200)
    assert shown_batch.exit_code == 0, shown_batch.output
    assert "bo: no tag (none apply), from a file" in shown_batch.output
    assert "shown the pre-label no tag (none apply)" in shown_batch.output


def test_a_batch_finished_in_the_terminal(run):
    """`alflow label`: Enter accepts the preselected tags, numbers toggle tags, b goes back
    (Enter then keeps the answer), s skips; the last answer resumes the run, which ends
    after its third cycle. Each run says in its log how its batch was answered."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    config, store, process, out = run
    batch = store.batches("open").iloc[0].to_dict()
    items = store.batch_items(batch["batch_id"])
    offered = [shown_prelabel(r) for r in items.itertuples()]
    keys, expected = [], []
    for position, (row, pre) in enumerate(zip(items.itertuples(), offered)):
        selection = set(parse_tags(pre))
        if position == 1:  # world toggled twice, sports once, then back to it and Enter keeps it
            keys.append("434\r" + "b\r")
            selection ^= {"sports"}
        elif position == 2:
            keys.append("s")
            expected.append((row.item_id, "skip", pre))
            continue
        else:
            keys.append("\r")
        expected.append((row.item_id, format_tags(selection), pre))
    typed = printed_commands(out, batch["batch_id"])["label"] + ["--annotator", "cy"]
    result = runner.invoke(app, typed, input="".join(keys), terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "(unchanged)" in result.output and "Resumed run" in result.output
    assert "Model: business " in result.output and "[x] " in result.output
    assert process.wait(120) == 0, out.read_text()
    stored = labels_of(store, batch["batch_id"])
    got = [(i, label, None if pd.isna(shown) else shown)
           for i, label, shown in zip(stored["item_id"], stored["label"], stored["prelabel_shown"])]
    assert got == expected  # one row per item: going back and keeping wrote nothing again
    assert set(stored["origin"]) == {"cli"} and store.batch(batch["batch_id"])["status"] == "labeled"
    assert int(store.scalar("SELECT count(*) FROM models")) == 3
    again = runner.invoke(app, typed)  # nothing waits any more: one line
    assert again.exit_code == 1 and len(again.output.strip().splitlines()) == 1, again.output
    assert [line.split(":")[0] for line in out.read_text().splitlines() if line.startswith("cycle ")] == \
        ["cycle 1", "cycle 2", "cycle 3"]

    cycles = store.query_df("SELECT c.batch_id, c.flow_run_id FROM cycles c ORDER BY cycle")
    with get_client(sync_client=True) as client:
        logged = {b: [log.message for log in client.read_logs(LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[UUID(run_id)])))] for b, run_id in cycles.values}
    by_file, by_terminal = cycles["batch_id"].iloc[1], batch["batch_id"]
    agreement = store.prelabel_agreement(by_file)
    assert (f"batch {by_file}: {BATCH} answers, {agreement['kept']} kept the pre-label, {agreement['changed']} "
            f"changed it, 1 skipped, 2 given without a pre-label ({BATCH - 1} from a file, 1 from the terminal)"
            ) in logged[by_file], logged[by_file]
    kept = sum(label == pre for _, label, pre in expected)
    assert (f"batch {by_terminal}: {BATCH} answers, {kept} kept the pre-label, {BATCH - 2 - kept} changed it, "
            "1 skipped, 1 given without a pre-label (from the terminal)") in logged[by_terminal]
