"""[model] features = "embeddings" with the [llm] endpoint down: the cycle goes on over the
items that have a vector, says how many it left out, and takes them back once the endpoint
answers; a fit whose labels lack vectors keeps the current model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import SMS_KEYWORDS, write_config
from test_embeddings import EMBEDDING_MODEL, sms_head, store_of

from alflow.config import load_config
from alflow.flows.cycle import active_learning_cycle
from alflow.tasks import train
from alflow.tasks.ingest import ingest_source

ROWS, MORE = 60, 20  # the items of cycle 1; those ingested while the endpoint is down


def ingest(config, name: str) -> None:
    """The source's new rows stored, outside a flow (an ingest subflow costs a second or two)."""
    settings = load_config(config)
    store_of(config).migrate()
    ingest_source(settings, "corpus", name)


def down_config(directory, base_url: str):
    """features = "embeddings" through ``base_url`` over ``directory``/sms.csv, batches of 12;
    accuracy (macro-F1's bootstrap interval costs seconds a cycle) and no self-training."""
    extra = (f'\n[model]\nfeatures = "embeddings"\nself_training = 0\n\n'
             f'[llm]\nbase_url = "{base_url}"\nembedding_model = "{EMBEDDING_MODEL}"\n')
    config = write_config(directory, labels=["ham", "spam"], source_path=directory / "sms.csv", batch_size=12,
                          extra=extra)
    text = config.read_text().replace("holdout_fraction = 0.2", 'holdout_fraction = 0.2\nmetric = "accuracy"')
    config.write_text(text)
    return config


class Lines(logging.Handler):
    """The messages of the flow's and tasks' loggers."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def cycles(tmp_path_factory, prefect_api):
    """Three auto cycles with features = "embeddings": 1, the endpoint up (cold start, model
    v1); 2, the endpoint down and MORE new items ingested; 3, an endpoint up again. Yields
    what each left."""
    from openai_server import FakeOpenAI

    directory = tmp_path_factory.mktemp("embeddings_down")
    lines = Lines()
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.INFO)
        logger.addHandler(lines)
    try:
        with FakeOpenAI(SMS_KEYWORDS, labels=["ham", "spam"]) as server:
            sms_head(directory, ROWS)
            config = down_config(directory, server.base_url)
            ingest(config, "first")
            first = active_learning_cycle(str(config), auto=True, ingest_sources=False)
            store = store_of(config)
            embedded = set(store.query_df("SELECT item_id FROM embeddings")["item_id"])
            server.down()
        sms_head(directory, ROWS + MORE)  # new rows in the source, ingested while the endpoint is down
        ingest(config, "more")
        start = len(lines.lines)
        second = active_learning_cycle(str(config), auto=True, ingest_sources=False)
        lines_2 = lines.lines[start:]
        new = sorted(set(store.query_df("SELECT item_id FROM items")["item_id"]) - embedded)
        scored_2 = int(store.scalar("SELECT count(*) FROM predictions WHERE list_contains(?, item_id)", [new]))
        with FakeOpenAI(SMS_KEYWORDS, labels=["ham", "spam"]) as again:
            config = down_config(directory, again.base_url)
            third = active_learning_cycle(str(config), auto=True, ingest_sources=False)
        yield {"config": config, "store": store, "first": first, "second": second, "third": third,
               "new": new, "scored_2": scored_2, "lines_2": lines_2}
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(lines)
            logger.setLevel(level)


@pytest.mark.slow  # the module's three flow runs
def test_the_endpoint_down_a_cycle_leaves_out_items_without_a_vector_and_takes_them_back(cycles):
    store, new, second = cycles["store"], cycles["new"], cycles["second"]
    assert cycles["first"]["model_version"] is not None
    # cycle 2 completed, with a model, over the items that have a vector
    assert second["cycle"] == 2 and second["model_version"] is not None
    assert store.batch(second["batch_id"])["status"] == "labeled"
    in_pool = [i for i in new if i not in set(store.holdout_set(0.2)["item_id"])]
    left_out = [line for line in cycles["lines_2"] if "have no vector from" in line]
    assert len(left_out) == 1, left_out
    assert left_out[0].startswith(f"{len(in_pool)} pool items")
    assert f"no vector from {EMBEDDING_MODEL} (endpoint down: " in left_out[0]
    assert "left out of this cycle; they are embedded when the endpoint answers" in left_out[0]
    assert len(new) == MORE and cycles["scored_2"] == 0
    assert not set(new) & set(store.batch_items(second["batch_id"])["item_id"])
    # cycle 3, an endpoint up: the new items are embedded, and the pool's scored by the current model
    third = cycles["third"]
    assert third["cycle"] == 3
    embedded = set(store.query_df("SELECT item_id FROM embeddings WHERE embedding_model = ?",
                                  [EMBEDDING_MODEL])["item_id"])
    assert set(new) <= embedded
    version = int(store.scalar("SELECT model_version FROM batches WHERE batch_id = ?", [third["batch_id"]]))
    scored = set(store.query_df("SELECT item_id FROM predictions WHERE model_version = ?", [version])["item_id"])
    asked = set(store.query_df("SELECT item_id FROM labels")["item_id"])
    assert set(in_pool) - asked and set(in_pool) - asked <= scored


@pytest.mark.slow  # reads the module's flow runs' store
def test_labels_without_vectors_keep_the_current_model_and_loading_needs_no_endpoint(cycles, caplog):
    from openai_server import FakeOpenAI

    from alflow.tasks.label_check import check_labels

    with FakeOpenAI(SMS_KEYWORDS) as gone:
        url = gone.base_url
    config = down_config(cycles["config"].parent, url)
    settings = load_config(config)
    store = store_of(config)
    current = train.load_current_model(store, settings)  # the endpoint refuses: the model still loads
    assert current is not None
    models = int(store.scalar("SELECT count(*) FROM models"))
    # every labeled item's vector lost (another embedding model's store, say): nothing left to fit
    with store.transaction() as con:
        con.execute("DELETE FROM embeddings WHERE item_id IN (SELECT item_id FROM labels)")
    with caplog.at_level(logging.WARNING, logger="alflow"):
        result = train.retrain(store, settings)
    assert result.model_version == current.version and not result.promoted
    assert result.reason.startswith(f"kept model v{current.version}: need labels of at least 2 classes")
    assert int(store.scalar("SELECT count(*) FROM models")) == models
    lines = [r.getMessage() for r in caplog.records if "left out of this fit" in r.getMessage()]
    labeled = int(store.scalar("SELECT count(DISTINCT item_id) FROM labels"))
    assert len(lines) == 1 and "labeled items" in lines[0] and "left out of this fit" in lines[0]
    assert int(lines[0].split()[0]) <= labeled
    # the cycle's label check of the kept model reads the labels that have a vector: none here
    with caplog.at_level(logging.WARNING, logger="alflow"):
        check_labels(store, settings, current.version)
    assert any("left out of the label check" in r.getMessage() for r in caplog.records)


def test_the_cold_start_needs_no_vectors(tmp_path, prefect_api, caplog):
    from openai_server import FakeOpenAI

    from alflow.tasks.query import cold_start_picks

    with FakeOpenAI(SMS_KEYWORDS) as gone:
        url = gone.base_url
    sms_head(tmp_path, 30)
    config = down_config(tmp_path, url)
    ingest(config, "first")
    settings, store = load_config(config), store_of(config)
    with caplog.at_level(logging.WARNING, logger="alflow"):
        assert train.load_current_model(store, settings) is None  # no vector, no model: a cold start
    assert int(store.scalar("SELECT count(*) FROM embeddings")) == 0
    line = [r.getMessage() for r in caplog.records if "cold start needs no vectors" in r.getMessage()]
    assert len(line) == 1 and "chosen by coverage over the whole pool" in line[0]
    picks = cold_start_picks(store, settings, 12, np.random.default_rng(0), settings.holdout_fraction)
    assert len(picks) == 12 and (picks["picked_by"] == "coverage").all()


def test_a_client_opened_for_a_new_text_is_closed(tmp_path, monkeypatch, prefect_api):
    from openai_server import FakeOpenAI

    from alflow.connectors.llm import LLMClient
    from alflow.tasks.embeddings import StoredVectors

    opened, closed = [], []
    init, close = LLMClient.__init__, LLMClient.close
    monkeypatch.setattr(LLMClient, "__init__", lambda self, *a, **k: (opened.append(self), init(self, *a, **k))[1])
    monkeypatch.setattr(LLMClient, "close", lambda self: (closed.append(self), close(self))[1])
    with FakeOpenAI(SMS_KEYWORDS) as server:
        sms_head(tmp_path, 10)
        config = down_config(tmp_path, server.base_url)
        ingest(config, "first")
        vectors = StoredVectors(store_of(config), load_config(config))(["a text no item has", "another one"])
    assert vectors.shape == (2, 64)
    assert opened and opened == closed
