"""The LLM in the cycle (issue 24): cold-start pre-labels, the second opinion, the cache,
failure that is not fatal, the humans' agreement with the LLM apart from the model's, and a
key that never leaks.

Three cycles share one project (module fixture): a cold start paused for review and
answered through the Resume form, a cycle with a model asking the LLM for a second
opinion, and a cycle with the endpoint down. The fake endpoint is tests/openai_server.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from alflow.config import load_config
from alflow.flows.cli import app
from alflow.flows.cycle import active_learning_cycle
from alflow.tasks import strategies
from alflow.tasks.review import field_name
from alflow.tasks.store import Store
from conftest import SMS_CSV, SMS_KEYWORDS, write_config

runner = CliRunner()

KEY_ENV = "LLM_TEST_API_KEY"
KEY = "sk-alflow-test-7c1e9b2f-NEVER-SHOWN"
BATCH = 10
# The LLM also calls any text with "you" spam: it then disagrees with the model often.
KEYWORDS = {**SMS_KEYWORDS, "you": "spam"}


class Collect(logging.Handler):
    """Every log record's message, from the loggers it is attached to."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def llm_config(directory: Path, csv: Path, base_url: str) -> Path:
    extra = f"""
[llm]
base_url = "{base_url}"
model = "fake-llm"
api_key_env = "{KEY_ENV}"
max_items_per_cycle = 40
retries = 0

[model]
self_training = 0
"""
    config = write_config(directory, labels=["ham", "spam"], source_path=csv, extra=extra, batch_size=BATCH)
    # accuracy: the control estimate's interval is Wilson's, not a 1,000-draw macro-F1 bootstrap (~4 s a cycle)
    text = config.read_text().replace("holdout_fraction = 0.2", 'holdout_fraction = 0.2\nmetric = "accuracy"')
    config.write_text(text)
    return config


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api):
    """Three cycles over 300 SMS rows with the fake LLM; what each left, for the tests."""
    from openai_server import FakeOpenAI
    from prefect.flow_runs import resume_flow_run
    from test_flows import FlowThread, paused_form_parts, wait_until_paused

    directory = tmp_path_factory.mktemp("llm")
    csv = directory / "sms_300.csv"
    csv.write_text("".join(SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:301]), encoding="utf-8")
    os.environ[KEY_ENV] = KEY
    collect = Collect()
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(collect)
    server = FakeOpenAI(KEYWORDS, labels=["ham", "spam"], api_key=KEY)
    try:
        config = llm_config(directory, csv, server.base_url)
        settings = load_config(config)
        store = Store(settings.database)
        out = {"config": config, "settings": settings, "store": store, "server": server, "logs": collect.lines}

        # cycle 1: the cold start, paused for review; answered with the gold labels
        flow = FlowThread(active_learning_cycle, str(config))
        batch = wait_until_paused(store)
        out["form"] = paused_form_parts(batch["flow_run_id"])
        out["batch1"] = store.batch_items(batch["batch_id"])
        out["requests1"] = len(server.requests)
        exported = runner.invoke(app, ["export", str(directory / "batch1.csv"), "--config", str(config)])
        assert exported.exit_code == 0, exported.output
        out["export1"] = pd.read_csv(directory / "batch1.csv", keep_default_na=False)
        gold = store.gold_labels(out["batch1"]["item_id"].tolist())
        values = {field_name(r.rank): gold[r.item_id] for r in out["batch1"].itertuples()}
        resume_flow_run(UUID(batch["flow_run_id"]), run_input=dict(values, annotator="tester"))
        flow.join()
        assert flow.error is None, flow.error
        out["summary1"], out["gold1"] = flow.result, gold

        # cycle 2: a model; the LLM's second opinion on its uncertain candidates
        out["summary2"] = active_learning_cycle(str(config), auto=True, ingest_sources=False)
        out["requests2"] = len(server.requests)

        # cycle 3: the endpoint is down
        server.down()
        out["summary3"] = active_learning_cycle(str(config), auto=True, ingest_sources=False)
        yield out
    finally:
        server.close()
        os.environ.pop(KEY_ENV, None)
        for logger, level in zip(loggers, levels):
            logger.removeHandler(collect)
            logger.setLevel(level)


def chat_texts(requests) -> list[str]:
    return [body["messages"][-1]["content"] for path, body, _ in requests if path == "/v1/chat/completions"]


# -- through the flow (slow: the module's three shared flow runs take ~23 s on a 2-core machine
# loaded by other jobs, load average 5; the tests then read what they left, in under a second each
# but the key check, ~4 s) -------------------------------------------------------------------------
@pytest.mark.slow
def test_cold_start_prelabels_are_stored_with_their_lineage(project):
    store = project["store"]
    lineage = store.query_df("SELECT * FROM llm_models")
    assert len(lineage) == 1
    row = lineage.iloc[0]
    assert (row["base_url"], row["model"], json.loads(row["labels"])) == (project["server"].base_url, "fake-llm",
                                                                           ["ham", "spam"])
    assert len(row["prompt_hash"]) == 16
    answers = store.query_df("SELECT * FROM llm_predictions WHERE llm_version = ?", [int(row["llm_version"])])
    # every candidate asked in cycle 1 is stored once, with the fake's answer and confidence
    assert project["requests1"] == 40 and len(answers) >= 40
    docs = dict(store.query_df("SELECT item_id, text FROM items").itertuples(index=False))
    for answer in answers.itertuples():
        expected = project["server"].label_of(docs[answer.item_id], ["ham", "spam"])
        assert (answer.status, answer.label) == ("ok", expected)
        assert answer.confidence == pytest.approx(0.9) and list(answer.proba)[["ham", "spam"].index(expected)] == \
            pytest.approx(0.9)
    batch = project["batch1"]
    asked = batch[batch["picked_by"] != "control"]
    assert len(asked) == BATCH - 1 and (asked["prelabel_by"] == "llm").all()
    by_item = answers.set_index("item_id")
    assert list(asked["prelabel"]) == list(by_item.loc[asked["item_id"], "label"])
    assert project["summary1"]["llm"]["usage"]["requests"] == 40
    strategy = store.batches()["strategy"].tolist()
    assert strategy[0] == "cold-start:coverage+llm"


@pytest.mark.slow
def test_the_cold_start_form_preselects_the_llms_label_with_its_confidence(project):
    schema, description = project["form"]
    batch = project["batch1"]
    assert "each item's pre-label is the LLM's suggestion" in description
    for row in batch.itertuples():
        field = schema["properties"][field_name(row.rank)]
        if row.picked_by == "control":  # blind: no default of any kind
            assert "default" not in field and field["title"] == f"#{row.rank} · corpus · no pre-label"
        else:
            assert field["default"] == row.prelabel
            assert field["title"] == f"#{row.rank} · corpus · LLM's pre-label {row.prelabel} (90%)"


@pytest.mark.slow
def test_export_and_show_name_the_llms_suggestion(project):
    """`alflow export` and `alflow show` say whose pre-label it is, as the form does; the
    control item stays blind in the file."""
    exported, batch = project["export1"].set_index("item_id"), project["batch1"]
    for row in batch.itertuples():
        line = exported.loc[row.item_id]
        if row.picked_by == "control":
            assert (line["prelabel"], line["confidence"], line["prelabel_by"], line["label"]) == ("", "", "", "")
        else:
            assert (line["prelabel"], line["confidence"], line["prelabel_by"], line["label"]) == \
                (row.prelabel, "0.9", "llm", row.prelabel)
    batch_id = project["store"].batches()["batch_id"].iloc[0]
    shown = runner.invoke(app, ["show", batch_id, "--config", str(project["config"])])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())
    for row in batch[batch["picked_by"] != "control"].itertuples():
        assert f"#{row.rank} · corpus · picked by coverage · LLM's pre-label {row.prelabel} (90%)" in text


@pytest.mark.slow
def test_agreement_with_llm_prelabels_is_reported_apart(project):
    batch, gold = project["batch1"], project["gold1"]
    asked = batch[batch["picked_by"] != "control"]
    kept = int(sum(gold[i] == p for i, p in zip(asked["item_id"], asked["prelabel"])))
    prelabels = project["summary1"]["llm"]["prelabels"]
    assert prelabels["llm"]["shown"] == len(asked) and prelabels["llm"]["kept"] == kept
    assert prelabels["model"]["shown"] == 0
    from test_flows import run_artifacts

    summary = run_artifacts(project["store"].batches()["flow_run_id"].iloc[0])["cycle-summary"].data
    assert f"- LLM pre-labels: **{kept} of {len(asked)} kept" in summary
    assert "- LLM: 40 requests\\, " in summary and "prompt \\+ " in summary  # escaped as Markdown text


@pytest.mark.slow
def test_disagreement_ranks_first_and_cached_items_are_not_asked_again(project):
    store, server = project["store"], project["server"]
    summary = project["summary2"]
    batch = store.batch_items(summary["batch_id"])
    batch_row = store.batch(summary["batch_id"])
    assert batch_row["strategy"] == "margin+second_opinion+exploration(0.1)"
    picked = batch["picked_by"].tolist()
    assert "disagreement" in picked
    n = picked.count("disagreement")
    assert picked[:n] == ["disagreement"] * n  # ahead of every other pick
    llm = store.query_df("SELECT item_id, label FROM llm_predictions")
    llm_label = dict(zip(llm["item_id"], llm["label"]))
    model = store.query_df("SELECT item_id, label FROM predictions WHERE model_version = ?",
                           [int(batch_row["model_version"])])
    model_label = dict(zip(model["item_id"], model["label"]))
    for row in batch.itertuples():
        if row.picked_by == "disagreement":
            assert llm_label[row.item_id] != model_label[row.item_id] and row.prelabel_by == "model"
    # the second cycle asked only items the first had not: the cache holds per (item, lineage)
    first, second = chat_texts(server.requests[:project["requests1"]]), \
        chat_texts(server.requests[project["requests1"]:project["requests2"]])
    assert second and not set(first) & set(second)
    assert summary["llm"]["usage"]["requests"] == len(second) <= 40


@pytest.mark.slow
def test_the_endpoint_down_the_cycle_goes_on_and_says_so(project):
    store, summary = project["store"], project["summary3"]
    assert summary["cycle"] == 3 and summary["model_version"] is not None
    assert store.batch(summary["batch_id"])["status"] == "labeled"
    down = [line for line in project["logs"] if "could not be used" in line]
    assert len(down) == 1 and project["server"].base_url in down[0]
    # its answers from before still serve (the cache); without any, the model's picks alone
    assert "this cycle goes on with the" in down[0] and "answers it gave before" in down[0] or \
        "goes on without it: the trained model's picks alone" in down[0]
    usage = summary["llm"]["usage"]
    assert usage["failed"] > 0 and project["server"].base_url in usage["error"]


@pytest.mark.slow
def test_the_key_never_leaves_the_client(project):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    store = project["store"]
    server_headers = [headers.get("authorization") for _, _, headers in project["server"].requests]
    assert set(server_headers) == {f"Bearer {KEY}"}  # it was sent, so it was there to leak
    seen = list(project["logs"])
    runs = [UUID(r) for r in store.batches()["flow_run_id"]]
    with get_client(sync_client=True) as client:
        seen += [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=runs)))]
        for artifact in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs))):
            seen += [str(artifact.data), str(artifact.description)]
    assert any("could not be used" in line for line in seen)  # the logs were read
    for table in store.query_df("SELECT table_name FROM information_schema.tables")["table_name"]:
        seen.append(store.query_df(f'SELECT * FROM "{table}"').to_csv())
    result = runner.invoke(app, ["status", "--config", str(project["config"]), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["llm"]["usage"]["requests"] >= 40 and status["llm"]["prelabels"]["llm"]["shown"] == BATCH - 1
    text = runner.invoke(app, ["status", "--config", str(project["config"])]).output
    assert f"pre-labels kept: LLM {status['llm']['prelabels']['llm']['kept']} of {BATCH - 1} kept" in text
    assert "LLM asked so far: " in text
    seen += [result.output, text, project["config"].read_text()]
    leaked = [text[:80] for text in seen if KEY in text]
    assert not leaked


# -- the pieces ----------------------------------------------------------------------------------
def test_with_second_opinion_ranks_disagreements_first():
    proba = np.array([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3], [0.6, 0.4], [0.95, 0.05], [0.52, 0.48]])
    other = np.array([[0.0, 1.0], [0.6, 0.4], [0.1, 0.9], [np.nan, np.nan], [0.2, 0.8], [0.5, 0.5 - 1e-9]])
    assert strategies.disagreement(proba, other).tolist()[:3] == [1.0, 0.0, 1.0]
    assert np.isnan(strategies.disagreement(proba, other)[3])
    pool = strategies.Pool(proba, second_opinion=other)
    idx, scores = strategies.with_second_opinion(strategies.uncertainty_sampling("margin"))(pool, 4, None)
    # rows 2, 0, 4 disagree: the least sure of the model (smallest margin) first; then margin's own pick
    assert idx.tolist() == [2, 0, 4, 5] and (scores[:3] > 1).all() and scores[3] < 1
    plain, _ = strategies.uncertainty_sampling("margin")(proba, 4, None)
    assert strategies.with_second_opinion(strategies.uncertainty_sampling("margin"))(proba, 4, None)[0].tolist() == \
        plain.tolist()  # no second opinion: the strategy as it is
    composed = strategies.get_strategy("margin", exploration=0.25, second_opinion=True)
    idx, scores = composed(pool, 4, np.random.default_rng(0))
    assert idx[:3].tolist() == [2, 0, 4] and np.isnan(scores[3])  # the exploration share survives


def test_coverage_groups_give_each_clusters_nearest_members():
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    sizes = [6, 4, 2]
    x = np.concatenate([c + rng.normal(scale=0.1, size=(n, 2)) for c, n in zip(centres, sizes)])
    rows, groups = strategies.coverage_groups(x, 3, 2, np.random.default_rng(1))
    assert groups.tolist() == [0, 0, 1, 1, 2, 2]  # the biggest cluster first
    cluster_of = np.repeat([0, 1, 2], sizes)
    assert [set(cluster_of[rows[groups == g]]) for g in range(3)] == [{0}, {1}, {2}]


def test_least_confident_per_group():
    group = np.array([0, 0, 0, 1, 1, 2])
    unsure = np.array([0.1, 0.5, np.nan, 0.3, np.nan, np.nan])
    assert strategies.least_confident_per_group(group, unsure, 3).tolist() == [1, 3, 5]
    assert strategies.least_confident_per_group(group, unsure, 5).tolist() == [1, 3, 5, 0, 4]
    assert strategies.least_confident_per_group(np.zeros(3, int), np.array([0.2, np.nan, 0.4]), 2).tolist() == [2, 0]
    with pytest.raises(ValueError, match="group and uncertainty must be"):
        strategies.least_confident_per_group(group, unsure[:2], 1)


@pytest.mark.slow
def test_failed_answers_are_not_cached_and_outside_ones_never_a_label(project):
    """The cache through :func:`alflow.tasks.llm.ask`, under a new lineage (another prompt)."""
    from openai_server import FakeOpenAI

    from alflow.connectors.llm import LLMClient
    from alflow.tasks.llm import ask

    store, settings = project["store"], project["settings"]
    ids = store.query_df("SELECT item_id FROM items ORDER BY item_id LIMIT 6")["item_id"].tolist()
    candidates = pd.DataFrame({"item_id": ids})
    logger = logging.getLogger("test_llm_cycle")
    with FakeOpenAI(KEYWORDS, labels=["ham", "spam"], logprobs=False) as server:
        llm = settings.llm.model_copy(update={"base_url": server.base_url, "prompt": "Labels {labels}\nText:\n{text}",
                                              "api_key_env": None})
        server.fail_next(2)
        with LLMClient(llm, labels=settings.labels) as client:
            first = ask(store, client, settings.labels, candidates, None, "cold_start", 100, logger)
            assert np.isnan(first.confidence).sum() == 6 and pd.isna(first.uncertainty()).all()
            server.outside_next(1)
            second = ask(store, client, settings.labels, candidates, None, "cold_start", 100, logger)
            version = store.find_llm_version(client.lineage, settings.labels)
    assert len(server.requests) == 8  # 6, then only the 2 that failed
    stored = store.query_df("SELECT * FROM llm_predictions WHERE llm_version = ?", [version])
    assert len(stored) == 6 and (stored["status"] == "outside").sum() == 1
    assert stored.loc[stored["status"] == "outside", "label"].isna().all() and stored["confidence"].isna().all()
    assert sum(isinstance(label, str) for label in second.labels) == 5
    usage = store.query_df("SELECT * FROM llm_usage WHERE llm_version = ? ORDER BY created_at", [version])
    assert usage[["requests", "failed", "outside"]].values.tolist() == [[6, 2, 0], [2, 0, 1]]
    assert usage["prompt_tokens"].notna().all()


@pytest.mark.slow
def test_an_unusable_endpoint_without_cached_answers_leaves_a_plain_cold_start(project):
    """:func:`alflow.tasks.llm.llm_opinions` under a lineage never asked (another prompt),
    the endpoint down: nothing to go on, so None (the query's plain cold start), one line
    saying so, and the failed asking counted."""
    from alflow.tasks.llm import llm_opinions

    store, settings = project["store"], project["settings"]
    settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"prompt": "{labels}: {text}"})})
    collect = Collect()
    logger = logging.getLogger("test_llm_cycle.down")
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    try:
        assert llm_opinions(store, settings, None, "run-down", BATCH, logger) is None
    finally:
        logger.removeHandler(collect)
    assert len(collect.lines) == 1 and "could not be used" in collect.lines[0]
    assert collect.lines[0].endswith("this cycle goes on without it: a plain cold start")
    usage = store.llm_usage("run-down")
    assert 0 < usage["failed"] <= 40 and usage["steps"] == ["cold_start"] and usage["error"]
