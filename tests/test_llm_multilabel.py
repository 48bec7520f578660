"""The LLM in a multi-label project (issues 24 x 25): zero-shot tag sets pre-label the cold
start, an answer naming a tag outside the set is counted and never stored as a label, the
LLM's tag sets are the second opinion (set disagreement), and a second run asks nothing it
asked before (the cache, under a lineage of its own).

One module-scoped pair of `alflow run --auto` runs over 100 items of
tests/data/ag_news_multilabel.csv against the fake endpoint (tests/openai_server.py), ~10 s
on a loaded 2-core machine; the tests read what they left."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
from conftest import write_config
from typer.testing import CliRunner

from alflow.config import ConfigError, load_config
from alflow.config.settings import DEFAULT_LLM_PROMPT, DEFAULT_LLM_TAG_PROMPT
from alflow.connectors.llm import LLMClient, parse_tags_answer
from alflow.flows.cli import app
from alflow.tasks.llm import tag_set_distance
from alflow.tasks.multilabel.tags import parse_tags
from alflow.tasks.store import Store

runner = CliRunner()
TAGS = ["business", "scitech", "sports", "world"]
# The fake LLM tags a text with the tag of every one of these words it contains.
KEYWORDS = {"reuters": "business", "company": "business", "oil": "business", "game": "sports", "win": "sports",
            "iraq": "world", "president": "world", "software": "scitech", "internet": "scitech"}
LLM = """
[llm]
base_url = "{base_url}"
model = "fake-llm"
max_items_per_cycle = 30
retries = 0
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api):
    """Two `alflow run --auto` runs of one multi-label project with [llm]: the cold start,
    then a model with the LLM's second opinion; what each asked, stored and logged."""
    from openai_server import FakeOpenAI
    from test_llm_cycle import Collect
    from test_multilabel_cycle import project_config, sample_csv

    directory = tmp_path_factory.mktemp("llm_multilabel")
    collect = Collect()
    logger = logging.getLogger("prefect.task_runs")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(collect)
    try:
        with FakeOpenAI(KEYWORDS) as server:
            config = project_config(directory, sample_csv(directory / "news.csv"))
            config.write_text(config.read_text() + LLM.format(base_url=server.base_url), encoding="utf-8")
            server.outside_next(1)  # the first answer names a tag that is not one of the tags
            first = runner.invoke(app, ["run", "--config", str(config), "--auto"])
            asked1 = list(server.requests)
            second = runner.invoke(app, ["run", "--config", str(config), "--auto", "--no-ingest"])
            asked2 = server.requests[len(asked1):]
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    settings = load_config(config)
    return {"config": config, "settings": settings, "store": Store(settings.database), "server": server,
            "runs": (first, second), "asked": (asked1, asked2), "logs": collect.lines}


def chat(requests) -> list[dict]:
    return [body for path, body, _ in requests if path == "/v1/chat/completions"]


def item_texts(store: Store) -> dict[str, str]:
    return dict(store.query_df("SELECT item_id, text FROM items").itertuples(index=False))


def test_the_cold_start_is_pre_labeled_with_the_llms_tag_sets(project):
    store, server = project["store"], project["server"]
    for run in project["runs"]:
        assert run.exit_code == 0, run.output
    body = chat(project["asked"][0])[0]
    schema = body["response_format"]["json_schema"]["schema"]["properties"]["tags"]
    assert schema == {"type": "array", "items": {"type": "string", "enum": TAGS}, "uniqueItems": True}
    assert "logprobs" not in body  # a tag set's confidence is not read from logprobs (docs/llm.md)
    assert "Several tags may apply, or none" in body["messages"][0]["content"]

    batches = store.batches().sort_values("created_at")
    first = batches.iloc[0]
    assert first["strategy"] == "cold-start:coverage+llm" and pd.isna(first["model_version"])
    batch = store.batch_items(first["batch_id"])
    shown = batch[batch["picked_by"] != "control"]
    assert shown["confidence"].isna().all()  # no confidence: none is made up
    answers = store.query_df("SELECT item_id, label, status, confidence FROM llm_predictions")
    llm_label = dict(zip(answers["item_id"], answers["label"]))
    texts = item_texts(store)
    by_llm = shown[shown["item_id"].map(llm_label).notna()]
    assert len(by_llm) >= len(shown) - 1 >= 7 and (by_llm["prelabel_by"] == "llm").all()
    for row in by_llm.itertuples():
        expected = ";".join(server.tags_of(texts[row.item_id], TAGS))
        assert row.prelabel == llm_label[row.item_id] == expected
    # an item the LLM gave no tag set for (the answer outside the tags) is offered none
    assert shown.loc[~shown.index.isin(by_llm.index), "prelabel"].isna().all()
    stored = answers[answers["status"] == "ok"]
    assert (stored["label"] == "").any() and stored["label"].str.contains(";").any()  # none, and several
    assert all(parse_tags(label) <= set(TAGS) for label in stored["label"])


def test_the_cold_start_form_preselects_the_llms_tags(project):
    """The Resume form the cycle builds for that batch (as it stood before anyone answered):
    each field's default is the LLM's tags, its title says they are the LLM's, with no
    confidence, and the description says so."""
    from alflow.tasks.review import build_review_form, field_name, form_description, review_round_items

    store, settings = project["store"], project["settings"]
    batch_id = store.batches().sort_values("created_at")["batch_id"].iloc[0]
    batch = review_round_items(store, batch_id, 1, None).assign(answer=None)
    form = build_review_form(batch, settings.labels, settings.review.text_chars, None, task=settings.task,
                             description=form_description(batch_id, batch, True, task=settings.task))
    schema = form.model_json_schema()
    assert "each item's preselected tags are the LLM's suggestion" in form._description
    for row in batch.itertuples():
        field = schema["properties"][field_name(row.rank)]
        if row.prelabel_by == "llm":
            assert field["default"] == sorted(parse_tags(row.prelabel))
            assert "· LLM's pre-label " in field["title"] and field["title"].endswith("(no confidence given)")
        else:  # the control item, and the one the LLM gave no tag set for
            assert field["default"] == [] and field["title"].endswith("no pre-label")


def test_an_answer_outside_the_tags_is_counted_and_never_stored_as_a_label(project):
    store = project["store"]
    outside = store.query_df("SELECT * FROM llm_predictions WHERE status = 'outside'")
    assert len(outside) == 1 and outside["label"].isna().all()
    assert int(store.query_df("SELECT sum(outside) AS n FROM llm_usage")["n"].iloc[0]) == 1
    prelabels = store.query_df("SELECT prelabel FROM batch_items WHERE item_id = ? AND prelabel_by = 'llm'",
                               [outside["item_id"].iloc[0]])
    assert prelabels.empty
    line = next(line for line in project["logs"] if "cold-start pre-labels for" in line)
    assert "1 outside the tags" in line


def test_the_second_opinion_ranks_set_disagreements_first(project):
    store = project["store"]
    batches = store.batches().sort_values("created_at")
    second = batches.iloc[1]
    assert second["strategy"] == "mean_margin+second_opinion+exploration(0.1)"
    batch = store.batch_items(second["batch_id"])
    picked = batch["picked_by"].tolist()
    n = picked.count("disagreement")
    assert n and picked[:n] == ["disagreement"] * n
    answers = store.query_df("SELECT item_id, label FROM llm_predictions WHERE status = 'ok'")
    llm_label = dict(zip(answers["item_id"], answers["label"]))
    model = store.query_df("SELECT item_id, label FROM predictions WHERE model_version = ?",
                           [int(second["model_version"])])
    model_label = dict(zip(model["item_id"], model["label"]))
    for row in batch.itertuples():
        if row.picked_by == "disagreement":
            assert parse_tags(llm_label[row.item_id]) != parse_tags(model_label[row.item_id])
            assert row.prelabel_by == "model" and row.prelabel == model_label[row.item_id]


def test_a_second_run_asks_nothing_again(project):
    """Every item is asked once under the lineage: the second run's requests (if any) are all
    about items never asked, and the answers stored are one per item asked."""
    store = project["store"]
    first, second = ([body["messages"][0]["content"] for body in chat(asked)] for asked in project["asked"])
    assert first and second and not set(first) & set(second)
    # the second run's candidates the first had asked about were read from the cache
    line = next(line for line in project["logs"] if "second opinion for" in line)
    cached = int(re.search(r"(\d+) cached, (\d+) asked", line).group(1))
    assert cached > 0 and int(re.search(r"(\d+) cached, (\d+) asked", line).group(2)) == len(second)
    stored = store.query_df("SELECT count(*) AS n, count(DISTINCT item_id) AS items FROM llm_predictions").iloc[0]
    assert int(stored["n"]) == int(stored["items"]) == len(first) + len(second)
    usage = store.query_df("SELECT step, requests FROM llm_usage ORDER BY created_at")
    assert usage["step"].tolist()[0] == "cold_start" and set(usage["step"]) <= {"cold_start", "second_opinion"}
    lineage = store.query_df("SELECT * FROM llm_models")
    assert len(lineage) == 1 and json.loads(lineage["labels"].iloc[0]) == TAGS
    # the lineage is the multi-label one: a single-label client of the same settings hashes otherwise
    settings = project["settings"]
    tags_client = LLMClient.from_settings(settings)
    single = LLMClient(settings.llm, labels=TAGS)
    assert lineage["prompt_hash"].iloc[0] == tags_client.prompt_hash != single.prompt_hash


# -- the pieces -----------------------------------------------------------------------------------
def test_parse_tags_answer_is_strict():
    assert parse_tags_answer('{"tags": ["world", "business"]}', TAGS) == ("business;world", "ok")
    assert parse_tags_answer('{"tags": []}', TAGS) == ("", "ok")  # none applies: an answer
    assert parse_tags_answer('["Sports", "sports"]', TAGS) == ("sports", "ok")  # case forgiven, once
    assert parse_tags_answer('{"tags": ["world", "politics"]}', TAGS) == (None, "outside")
    for content in ("world", '{"label": "world"}', '{"tags": "world"}', '{"tags": [1]}', "I think world"):
        assert parse_tags_answer(content, TAGS) == (None, "malformed")


def test_tag_set_distance_is_jaccard():
    distance = tag_set_distance(np.full(3, 0.5))
    proba = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.1], [0.1, 0.1, 0.1], [0.1, 0.2, 0.3], [0.9, 0.1, 0.1]])
    other = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0], [np.nan] * 3])
    far = distance(proba, other)
    assert far[:4].tolist() == [0.0, 0.5, 1.0, 0.0] and np.isnan(far[4])


def test_the_multi_label_llm_settings(tmp_path):
    """The tag prompt by default (the user's own prompt wins), and weak labels refused in one line."""
    source = tmp_path / "items.csv"
    source.write_text("text,label\na,world\n", encoding="utf-8")
    config = write_config(tmp_path, labels=TAGS, source_path=source,
                          extra='\n[llm]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n')
    text = config.read_text()
    tagged = config.with_name("tags.toml")
    tagged.write_text('task = "multi_label"\n' + text.replace('strategy = "margin"', 'strategy = "mean_margin"'))
    assert load_config(config, environ={}).llm.prompt == DEFAULT_LLM_PROMPT
    assert load_config(tagged, environ={}).llm.prompt == DEFAULT_LLM_TAG_PROMPT
    own = tagged.with_name("own.toml")
    own.write_text(tagged.read_text().replace('model = "m"', 'model = "m"\nprompt = "Tags {labels}: {text}"'))
    assert load_config(own, environ={}).llm.prompt == "Tags {labels}: {text}"
    weak = tagged.with_name("weak.toml")
    weak.write_text(tagged.read_text().replace('model = "m"', 'model = "m"\nweak_label_confidence = 0.9'))
    with pytest.raises(ConfigError, match=r'llm.weak_label_confidence: is not used with task = "multi_label"') as err:
        load_config(weak, environ={})
    assert "\n" not in str(err.value)


def test_a_tags_client_asks_for_a_set_and_reads_it():
    """Without a flow: the request, the answers' text forms ("" for none), a tag repeated
    once, one outside the tags counted and given no label, and the lineage apart."""
    from openai_server import FakeOpenAI

    from alflow.config.settings import LLMSettings

    with FakeOpenAI(KEYWORDS) as server:
        llm = LLMSettings(base_url=server.base_url, model="m", prompt=DEFAULT_LLM_TAG_PROMPT, retries=0,
                           max_concurrency=1)  # reply_next answers the first request: send them in order
        with LLMClient(llm, labels=TAGS, task="multi_label") as client:
            server.reply_next('{"tags": ["world", "World"]}')
            answers, usage = client.classify(["a", "Oil company wins the game", "nothing to see"], TAGS)
            server.outside_next(1)
            (outside,), more = client.classify(["the president"], TAGS)
        assert LLMClient(llm, labels=TAGS).prompt_hash != client.prompt_hash
    assert [(a.label, a.status, a.confidence) for a in answers] == [
        ("world", "ok", None), ("business;sports", "ok", None), ("", "ok", None)]
    assert (outside.label, outside.status, more.outside, usage.outside) == (None, "outside", 1, 0)
    assert all("logprobs" not in body for _, body, _ in server.requests)
    with pytest.raises(ValueError, match="task must be one of"):
        LLMClient(llm, task="tags")
