"""[model] features with embeddings: items embedded once through the [llm] endpoint (the
fake OpenAI server), stored in DuckDB, read by the model wherever it is given texts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import SMS_CSV, SMS_KEYWORDS, write_config

from alflow.config import ConfigError, ModelSettings, load_config
from alflow.flows.cycle import active_learning_cycle
from alflow.tasks import modeling, train
from alflow.tasks.embeddings import EmbeddingError, StoredVectors, embed_items
from alflow.tasks.store import Store

EMBEDDING_MODEL = "fake-embed"


def sms_head(directory: Path, rows: int) -> Path:
    """The first ``rows`` SMS items as a CSV in ``directory``."""
    lines = SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:rows + 1]
    path = directory / "sms.csv"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def embeddings_config(directory: Path, csv: Path, base_url: str, llm: str = "") -> Path:
    """A config over ``csv`` with features = "embeddings" through ``base_url``; ``llm``: more [llm] keys."""
    extra = ('\n[model]\nfeatures = "embeddings"\n\n'
             f'[llm]\nbase_url = "{base_url}"\nembedding_model = "{EMBEDDING_MODEL}"\n{llm}')
    return write_config(directory, labels=["ham", "spam"], source_path=csv, batch_size=30, extra=extra)


def embedding_requests(server) -> int:
    return server.paths().count("/v1/embeddings")


@pytest.fixture(scope="module")
def two_cycles(tmp_path_factory, prefect_api):
    """Two auto cycles over 300 SMS items with features = "embeddings" and LLM weak labels:
    the first a cold start (the LLM pre-labels its candidates) that trains model v1, the
    second pre-labels the pool with it. Yields (config, server, embedding requests after
    cycle 1, after cycle 2, the two summaries)."""
    from openai_server import FakeOpenAI

    directory = tmp_path_factory.mktemp("embeddings")
    with FakeOpenAI(SMS_KEYWORDS, labels=["ham", "spam"]) as server:
        config = embeddings_config(directory, sms_head(directory, 300), server.base_url,
                                   llm='model = "fake-chat"\nweak_label_confidence = 0.5\nmax_items_per_cycle = 60\n')
        first = active_learning_cycle(str(config), auto=True)
        after_first = embedding_requests(server)
        second = active_learning_cycle(str(config), auto=True, ingest_sources=False)
        yield config, server, after_first, embedding_requests(server), first, second


def store_of(config) -> Store:
    settings = load_config(config)
    return Store(settings.database, settings.store.lock_timeout_seconds)


@pytest.mark.slow  # `two_cycles`, once for the three: 20 s measured on 2 cores at load average 5
def test_a_cycle_on_embeddings_trains_prelabels_and_embeds_each_item_once(two_cycles):
    config, server, after_first, after_second, first, second = two_cycles
    store = store_of(config)
    n_items = int(store.scalar("SELECT count(*) FROM items"))
    assert int(store.scalar("SELECT count(*) FROM embeddings WHERE embedding_model = ?", [EMBEDDING_MODEL])) == n_items
    dims = store.scalar("SELECT DISTINCT len(vector) FROM embeddings")
    assert dims == 64
    # every item in batches of embedding_batch_size (64), in the first cycle; none after
    assert after_first == math.ceil(n_items / 64)
    assert after_second == after_first
    # the first cycle trained model v1 on embeddings; the second pre-labeled the pool with it
    row = store.model_row(1)
    metrics = row["metrics"] if isinstance(row["metrics"], dict) else json.loads(row["metrics"])
    assert metrics["embeddings"] == {"model": EMBEDDING_MODEL, "dim": 64}
    assert int(store.scalar("SELECT count(*) FROM predictions WHERE model_version = 1")) > 0
    prelabels = store.batch_items(second["batch_id"])["prelabel"]
    assert prelabels.notna().sum() >= len(prelabels) - 2  # all but the blind control items
    assert first["cycle"] == 1 and second["cycle"] == 2


@pytest.mark.slow  # `two_cycles`, once for the three: 20 s measured on 2 cores at load average 5
def test_confident_llm_prelabels_of_pool_items_train_as_weak_labels_never_as_answers(two_cycles):
    config, *_ = two_cycles
    settings = load_config(config)
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    row = store.model_row(1)
    metrics = row["metrics"] if isinstance(row["metrics"], dict) else json.loads(row["metrics"])
    asked = store.query_df("SELECT item_id, confidence FROM llm_predictions WHERE status = 'ok' AND created_at "
                           "<= (SELECT created_at FROM models WHERE model_version = 1)")  # before v1's retrain
    assert len(asked) and (asked["confidence"] >= 0.5).all()
    # v1 trained on the LLM's answers about the cold start's candidates it did not ask a human about
    batch_1 = set(store.batch_items(store.query_df("SELECT batch_id FROM batches ORDER BY created_at")
                                    ["batch_id"].iloc[0])["item_id"])
    holdout = set(store.holdout_set(settings.holdout_fraction)["item_id"])
    assert metrics["self_training"]["weak_labels"] == len(set(asked["item_id"]) - batch_1 - holdout) > 0
    # never written as answers: every label row is a batch item's, one per item answered
    assert int(store.scalar("SELECT count(*) FROM labels WHERE item_id NOT IN (SELECT item_id FROM batch_items)")) == 0
    # now: the pool's answered items, control and held-out ones never among them
    docs, labels = train.weak_labels(store, settings)
    answered = store.query_df("SELECT i.item_id FROM items i JOIN labels l USING (item_id)")["item_id"]
    excluded = store.items(sorted(set(answered) | holdout))
    assert docs and not set(docs) & set(excluded["text"]) and set(labels) <= {"ham", "spam"}


@pytest.mark.slow  # `two_cycles`, once for the three: 20 s measured on 2 cores at load average 5
def test_a_model_of_another_embedding_model_is_refused_in_one_line(two_cycles):
    config, *_ = two_cycles
    settings = load_config(config, environ={"ALFLOW_LLM__EMBEDDING_MODEL": "other-embed"})
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    current, problem = train.find_usable_model(store, settings)
    assert current is None
    line = problem.line()
    assert "\n" not in line
    assert f"reads embeddings of '{EMBEDDING_MODEL}' (64 dimensions)" in line
    assert "llm.embedding_model 'other-embed'" in line
    # the same file under the embedding model it was trained with loads, and reads the store
    same = load_config(config)
    current, problem = train.find_usable_model(store, same)
    assert problem is None and modeling.embeddings_needed(current.model) == (EMBEDDING_MODEL, 64)


def test_features_with_embeddings_need_the_llm_endpoint(tmp_path):
    csv = sms_head(tmp_path, 5)
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=csv,
                          extra='\n[model]\nfeatures = "embeddings"\n')
    with pytest.raises(ConfigError) as error:
        load_config(config)
    message = str(error.value)
    assert "llm.base_url" in message and "model.features" in message and "\n" not in message


def test_a_text_ingested_later_is_embedded_on_first_use_and_stored(tmp_path, openai_server):
    """embed_items sends each item once; a lookup finds an item by the text the model reads
    (two items of one text: one row); an item stored since is embedded then (one request)
    and stored; a text that is no item is embedded, not stored."""
    import pandas as pd

    config = embeddings_config(tmp_path, sms_head(tmp_path, 3), openai_server.base_url)
    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()

    def items(rows):  # (item_id digit, title, text)
        return pd.DataFrame({"item_id": [digit * 64 for digit, _, _ in rows], "source": "t", "external_id": None,
                             "url": None, "title": [title for _, title, _ in rows],
                             "text": [text for _, _, text in rows], "gold_label": None, "meta": "{}"})

    # the second item's title adds nothing to its text: the model reads the same text
    store.upsert_items(items([("a", None, "free prize now"), ("b", "free prize", "free prize now"),
                              ("c", "Lunch", "see you at lunch")]), "run-1")
    assert embed_items(store, settings).items == 3
    assert embed_items(store, settings).items == 0 and embedding_requests(openai_server) == 1
    store.upsert_items(items([("d", None, "call me later")]), "run-2")
    source = StoredVectors(store, settings)
    x = source(["Lunch\nsee you at lunch", "call me later", "no such item", "free prize now"])
    assert x.shape == (4, 64) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    assert embedding_requests(openai_server) == 2
    assert int(store.scalar("SELECT count(*) FROM embeddings")) == 4  # "no such item" is not stored
    np.testing.assert_array_equal(source(["call me later", "free prize now"]), x[[1, 3]])  # stored: not asked
    assert embedding_requests(openai_server) == 2
    # the endpoint down: what is stored still serves; a new item cannot be embedded, said in one line
    openai_server.down()
    np.testing.assert_array_equal(source(["call me later"]), x[[1]])
    store.upsert_items(items([("e", None, "new text")]), "run-3")
    with pytest.raises(EmbeddingError) as error:
        embed_items(store, settings)
    assert f"embedding 1 text with '{EMBEDDING_MODEL}' failed" in str(error.value)
    assert openai_server.base_url in str(error.value) and "\n" not in str(error.value)


def test_tfidf_plus_embeddings_stacks_both_and_round_trips_through_skops(tmp_path):
    """The union is [tfidf | embedding], the model file records the embedding model and
    dimension and loads with the types the configured model needs; a text without a vector
    is refused in one line."""
    docs = ["free prize call now", "win cash prize", "see you at lunch", "ok lunch later", "claim your prize",
            "home soon"]
    labels = ["spam", "spam", "ham", "ham", "spam", "ham"]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(docs), 8)).astype(np.float32)
    table = modeling.VectorTable("mem-embed", docs, vectors)
    settings = ModelSettings(features="tfidf+embeddings", self_training=0)
    with modeling.thread_vectors(table):
        model = modeling.fit(settings, docs, labels)
        x = model[:-1].transform(docs)
        vocabulary = len(modeling.similarity_features(model)(docs[:1]).toarray()[0])
        assert x.shape == (len(docs), vocabulary + 8)
        np.testing.assert_allclose(x[:, vocabulary:].toarray(), vectors, rtol=1e-6)
        path = modeling.save_model(model, tmp_path / "m.skops")
        loaded = modeling.load_model(path, modeling.trusted_types(settings, ["ham", "spam"]))
        assert modeling.embeddings_needed(loaded) == ("mem-embed", 8)
        np.testing.assert_allclose(loaded.predict_proba(docs), model.predict_proba(docs))
        with pytest.raises(modeling.ModelError, match=r"^1 of 2 texts have no embedding of 'mem-embed'$"):
            loaded.predict_proba([docs[0], "unseen text"])
    assert "features" not in ModelSettings().model_dump()  # a TF-IDF model's stored params are as before
