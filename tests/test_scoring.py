"""Scoring at scale: the query's top-k and samples come out of DuckDB (never the whole pool),
pre-label writes each unscored item once in bulk, a model predicts each holdout item once
(its labels are kept with it), and pre-label and holdout chunks run on one local Dask
cluster through real cycles."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from alflow.config import Settings
from alflow.tasks import modeling, query, strategies
from alflow.tasks.store import SCHEMA_VERSION, Store
from alflow.tasks.store.pool import PoolStore


def synthetic_pool(path, n: int, n_classes: int = 3, seed: int = 0) -> Store:
    """A store of ``n`` pool items scored by model v1 with known random probabilities,
    built inside DuckDB (no Python row per item)."""
    store = Store(path)
    store.migrate()
    with store.transaction() as con:
        con.execute(f"SELECT setseed({seed / 1000})")
        con.execute(
            """INSERT INTO items (item_id, source, text, fetched_at)
            SELECT sha256(i::VARCHAR), 'synthetic', 'item ' || i, now()::TIMESTAMP FROM range(?) r(i)""", [n])
        # Dirichlet-ish rows: exponentials normalised (proba in class order c0, c1, ...).
        raw = ", ".join("-ln(random())" for _ in range(n_classes))
        con.execute(f"""CREATE TEMP TABLE raw AS SELECT item_id, [{raw}] AS e FROM items""")
        con.execute(
            """CREATE TEMP TABLE scored AS SELECT item_id,
                   list_transform(e, lambda x: x / list_sum(e)) AS proba FROM raw""")
        con.execute(
            """INSERT INTO predictions
            SELECT item_id, 1, 'c' || (list_position(proba, list_max(proba)) - 1), proba,
                   1 - list_max(proba),
                   list_max(proba) - list_sort(proba, 'DESC')[2],
                   -list_sum(list_transform(proba, lambda p: CASE WHEN p > 0 THEN p * ln(p) ELSE 0 END)),
                   now()::TIMESTAMP
            FROM scored""")
    return store


def settings_for(store: Store, **query_settings) -> Settings:
    query_settings.setdefault("near_duplicate", None)
    return Settings(labels=["c0", "c1", "c2"], database=store.path, models_dir=store.path.parent / "models",
                    evaluation={"method": "cv"}, query=query_settings)


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> Store:
    return synthetic_pool(tmp_path_factory.mktemp("pool") / "a.duckdb", 3000)


@pytest.mark.parametrize("by", ["least_confidence", "margin", "entropy"])
def test_sql_top_k_equals_the_python_top_k(small_pool, by):
    item_ids, proba, _ = small_pool.pool_predictions(1, 3)
    expected = item_ids[strategies.top_k(strategies.MEASURES[by](proba), 50)]
    top_ids, top_proba, top_labels = small_pool.top_predictions(1, 3, by, 50)
    assert top_ids.tolist() == expected.tolist()
    assert np.allclose(top_proba, proba[np.searchsorted(item_ids, top_ids)])
    assert top_labels.tolist() == [f"c{j}" for j in top_proba.argmax(axis=1)]


@pytest.mark.parametrize("strategy", ["least_confidence", "margin", "entropy", "class_balanced"])
def test_model_picks_equal_the_strategy_over_the_whole_pool(small_pool, strategy):
    """Without exploration, the picks from the SQL candidates are the strategy's own picks
    over every pool row (the in-Python way, which read the whole pool)."""
    settings = settings_for(small_pool, strategy=strategy, exploration=0.0, batch_size=25)
    item_ids, proba, _ = small_pool.pool_predictions(1, 3)
    pool = strategies.Pool(proba, labeled_counts=np.array([5.0, 0.0, 2.0]))
    idx, _, _ = query.select(settings.query, pool, 25, np.random.default_rng(1))
    if strategy == "class_balanced":  # the counts come from labels; give it the same ones
        from alflow.tasks.store import Answer

        labeled = item_ids[-7:]
        store_labels = ["c0"] * 5 + ["c2"] * 2
        small_pool.record_labels([Answer(i, c) for i, c in zip(labeled, store_labels)],
                                 annotator="t", origin="cli")
        keep = ~np.isin(item_ids, labeled)
        item_ids, proba = item_ids[keep], proba[keep]
        idx, _, _ = query.select(settings.query, strategies.Pool(proba, labeled_counts=np.array([5.0, 0.0, 2.0])),
                                 25, np.random.default_rng(1))
    picks = query.model_picks(small_pool, settings, 1, 25, np.random.default_rng(1), None)
    assert picks["item_id"].tolist() == item_ids[idx].tolist()


def test_query_of_a_200k_pool_reads_only_its_candidates(tmp_path, monkeypatch):
    """The real query step on a 200,000-item pool: DuckDB ranks and samples, Python sees
    about k * CANDIDATE_FACTOR rows per read, never the pool."""
    store = synthetic_pool(tmp_path / "big.duckdb", 200_000)
    # control_share 0: no random control slice (tasks/control.py) in this batch
    settings = settings_for(store, strategy="margin", exploration=0.2, batch_size=20, control_share=0.0)
    item_ids, proba, _ = store.pool_predictions(1, 3)  # the answer, before the guard goes on
    expected_top = set(item_ids[strategies.top_k(strategies.MEASURES["margin"](proba), 16)])
    del item_ids, proba

    def whole_pool(*args, **kwargs):
        raise AssertionError("the query read the whole pool")

    fetched: list[int] = []
    rows_of = PoolStore._predictions_of

    def counted(self, sql, params, n_classes):
        result = rows_of(self, sql, params, n_classes)
        fetched.append(len(result[0]))
        return result

    monkeypatch.setattr(PoolStore, "pool_predictions", whole_pool)
    monkeypatch.setattr(PoolStore, "_predictions_of", counted)
    batch_id = query.query_batch(store, settings, 1, "run-1")
    batch = store.batch_items(batch_id)
    assert len(batch) == 20
    bound = 20 * query.CANDIDATE_FACTOR
    assert fetched and max(fetched) <= bound and sum(fetched) <= 2 * bound
    by = batch.groupby("picked_by")["item_id"].apply(set)
    assert by["uncertainty"] == expected_top  # 16 by margin, exactly the in-Python top 16
    assert len(by["exploration"]) == 4 and not by["exploration"] & expected_top


def test_sql_samples_are_deterministic_for_a_seed(small_pool):
    first = small_pool.sample_pool(100, seed=3)
    assert len(first) == 100 and first["item_id"].is_monotonic_increasing
    assert first.equals(small_pool.sample_pool(100, seed=3))
    other = small_pool.sample_pool(100, seed=4)
    assert len(set(first["item_id"]) & set(other["item_id"])) < 30  # ~100 * 100/3000 by chance
    assert len(small_pool.sample_pool(10_000, seed=3)) == small_pool.pool_size()
    ids, proba, _ = small_pool.sample_predictions(1, 3, 60, seed=9)
    again = small_pool.sample_predictions(1, 3, 60, seed=9)
    assert ids.tolist() == again[0].tolist() and np.array_equal(proba, again[1]) and len(ids) == 60
    # Uniform: the sampled items' mean margin is the pool's, within sampling noise.
    _, everything, _ = small_pool.pool_predictions(1, 3)
    big = small_pool.sample_predictions(1, 3, 1000, seed=5)[1]
    assert abs(strategies.margin(big).mean() - strategies.margin(everything).mean()) < 0.05


class CountingModel:
    """A fitted model that counts the documents it scores."""

    def __init__(self, model):
        self.model, self.docs = model, 0
        self.classes_ = model.classes_

    def predict_proba(self, docs):
        self.docs += len(docs)
        return self.model.predict_proba(docs)


def test_prelabel_writes_exactly_the_unscored_items_once(tmp_path):
    from alflow.tasks.prelabel import prelabel_pool

    store = synthetic_pool(tmp_path / "p.duckdb", 1200)
    docs = [f"item {i}" for i in range(40)]
    fitted = modeling.fit(settings_for(store).model, docs, ["c0", "c1", "c2", "c0"] * 10)
    # Model v1 scored everything (synthetic); v2 has scored 300 items already.
    with store.transaction() as con:
        con.execute("""INSERT INTO predictions SELECT item_id, 2, label, proba, least_confidence, margin,
                       entropy, created_at FROM predictions WHERE model_version = 1 ORDER BY item_id LIMIT 300""")
    before = store.query_df("SELECT * FROM predictions WHERE model_version = 2 ORDER BY item_id")
    model = CountingModel(fitted)
    writes: list[int] = []
    write = store.write_predictions
    store.write_predictions = lambda table, version: writes.append(len(table)) or write(table, version)
    assert prelabel_pool(store, model, 2, ["c0", "c1", "c2"], chunk_size=256, write_rows=500) == 900
    assert model.docs == 900  # the 300 scored items were not read again
    assert writes == [512, 388]  # chunks of 256 appended ~500 rows a transaction
    counts = store.query_df("SELECT item_id, count(*) AS n FROM predictions WHERE model_version = 2 GROUP BY item_id")
    assert len(counts) == 1200 and counts["n"].max() == 1
    after = store.query_df("SELECT * FROM predictions WHERE model_version = 2 ORDER BY item_id")
    kept = after[after["item_id"].isin(before["item_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, before)  # untouched
    fresh = after[~after["item_id"].isin(before["item_id"])]
    text = dict(zip(*store.query_df("SELECT item_id, text FROM items").to_dict("list").values()))
    expected = fitted.predict_proba([text[i] for i in fresh["item_id"]])
    assert np.allclose(np.stack(fresh["proba"].to_numpy()), expected)
    assert np.allclose(fresh["margin"], strategies.margin(expected))
    assert prelabel_pool(store, model, 2, ["c0", "c1", "c2"], chunk_size=256) == 0 and model.docs == 900
    # A chunk stored meanwhile (a retried write) is skipped row by row, not an error.
    again = store.query_df("SELECT item_id, label, proba, least_confidence, margin, entropy FROM predictions "
                           "WHERE model_version = 2 LIMIT 5")
    assert store.write_predictions(again, 2) == 0


def test_holdout_is_predicted_once_per_retrain(tmp_path, monkeypatch):
    """Each model predicts a holdout item once, across retrains: the new model predicts the
    holdout in chunks (texts streamed out of DuckDB), a promoted model's labels are stored
    with it, and a later comparison reads them, predicting only gold items it has not seen
    (or all, once, for a model promoted before they were stored). The metrics are exactly
    those of modeling.evaluate_holdout over the whole holdout."""
    from test_models import ingested, label_gold, project

    from alflow.tasks import prelabel
    from alflow.tasks.train import model_file, retrain

    config = project(tmp_path)
    config.write_text(config.read_text().replace("[query]\n", "[query]\nchunk_size = 100\n"))
    store, settings = ingested(config)
    predicted: dict[int, int] = {}  # docs predicted, by model (id)
    chunks: list[int] = []
    labels_of = prelabel.predicted_labels

    def counted(model, docs):
        predicted[id(model)] = predicted.get(id(model), 0) + len(docs)
        chunks.append(len(docs))
        return labels_of(model, docs)

    monkeypatch.setattr(prelabel, "predicted_labels", counted)
    trusted = modeling.trusted_types(settings.model, settings.labels)

    def holdout():
        gold = store.holdout_set(settings.holdout_fraction)
        return gold[gold["label"].isin(settings.labels)]

    def whole_holdout_metrics(version: int) -> dict:
        """Today's figure: the model file's predict over the whole holdout in one call."""
        model = modeling.load_model(model_file(settings, store.model_row(version)), trusted)
        gold = holdout()
        return modeling.evaluate_holdout(model, gold["doc"].tolist(), gold["label"].tolist())

    def stored(version: int) -> dict[str, str]:
        frame = store.holdout_predictions(version)
        return dict(zip(frame["item_id"], frame["label"]))

    n = len(holdout())
    label_gold(store, settings, 20)
    first = retrain(store, settings)
    assert first.promoted and list(predicted.values()) == [n] and len(chunks) == 2  # 100-item chunks
    expected = whole_holdout_metrics(1)
    assert {k: first.metrics[k] for k in expected} == expected
    v1 = modeling.load_model(model_file(settings, store.model_row(1)), trusted)
    gold = holdout()
    assert stored(1) == dict(zip(gold["item_id"], v1.predict(gold["doc"].tolist())))

    predicted.clear()
    label_gold(store, settings, 20, offset=20)
    second = retrain(store, settings)
    assert list(predicted.values()) == [n]  # the new model only: v1's labels (and score) are stored
    assert second.metrics["promotion"]["current"] == first.metrics[settings.evaluation.metric]
    assert {k: second.metrics[k] for k in expected} == whole_holdout_metrics(2)
    assert len(stored(2)) == (n if second.promoted else 0)  # a model that is never current keeps none

    # A new gold item changes the holdout: the current model predicts that item alone.
    current = store.current_model()["model_version"]
    with store.transaction() as con:
        con.execute("""INSERT INTO items (item_id, source, text, gold_label, fetched_at)
                       SELECT '00000000' || repeat('a', 56), 'x', 'a new world story', 'world', now()::TIMESTAMP""")
    predicted.clear()
    label_gold(store, settings, 10, offset=40)
    third = retrain(store, settings)
    assert sorted(predicted.values()) == [1, n + 1]
    assert third.metrics["promotion"]["current"] == whole_holdout_metrics(current)[settings.evaluation.metric]
    assert len(stored(current)) == n + 1

    # A model promoted before its labels were stored (an older database): predicted once, then kept.
    current = store.current_model()["model_version"]
    with store.transaction() as con:
        con.execute("DELETE FROM holdout_predictions WHERE model_version = ?", [current])
        con.execute("""INSERT INTO items (item_id, source, text, gold_label, fetched_at)
                       SELECT '00000000' || repeat('b', 56), 'x', 'a new sports story', 'sports', now()::TIMESTAMP""")
    predicted.clear()
    label_gold(store, settings, 10, offset=50)
    fourth = retrain(store, settings)
    assert sorted(predicted.values()) == [n + 2, n + 2]
    assert fourth.metrics["promotion"]["current"] == whole_holdout_metrics(current)[settings.evaluation.metric]
    assert len(stored(current)) == n + 2


@pytest.mark.usefixtures("prefect_api")
def test_holdout_is_predicted_here_while_the_local_cluster_starts(tmp_path, monkeypatch):
    """A retrain's holdout does not wait idle for this process's Dask cluster (started ahead
    by start_soon during the fit): its chunks are predicted in this process while the
    cluster starts, and the task runner takes the rest once it is up. Every item is
    predicted once, and the metrics are those of the whole holdout in one call."""
    import threading

    from test_models import ingested, label_gold, project

    from alflow.tasks import prelabel
    from alflow.tasks.train import model_file, retrain

    config = project(tmp_path, extra='\n[runner]\ntype = "threads"\n')
    config.write_text(config.read_text().replace("[query]\n", "[query]\nchunk_size = 100\n"))
    store, settings = ingested(config)
    label_gold(store, settings, 20)
    where: list[str] = []  # per chunk predicted: "here" (this thread) or "runner"
    labels_of, caller = prelabel.predicted_labels, threading.current_thread()

    def counted(model, docs):
        here = threading.current_thread() is caller
        where.append("here" if here else "runner")
        if here:
            monkeypatch.setattr(prelabel.LOCAL_CLUSTER, "_starting", False)  # the cluster is up after one chunk
        return labels_of(model, docs)

    monkeypatch.setattr(prelabel, "predicted_labels", counted)
    monkeypatch.setattr(prelabel.LOCAL_CLUSTER, "_starting", True)
    result = retrain(store, settings, on_runner=True)
    gold = store.holdout_set(settings.holdout_fraction)
    gold = gold[gold["label"].isin(settings.labels)]
    assert where[0] == "here" and where[1:] == ["runner"] * (len(where) - 1) and len(where) == -(-len(gold) // 100) >= 2
    model = modeling.load_model(model_file(settings, store.model_row(result.model_version)),
                                modeling.trusted_types(settings.model, settings.labels))
    expected = modeling.evaluate_holdout(model, gold["doc"].tolist(), gold["label"].tolist())
    assert {k: result.metrics[k] for k in expected} == expected
    assert store.holdout_predictions(result.model_version)["item_id"].tolist() == sorted(gold["item_id"])


def test_an_old_database_gains_the_holdout_predictions_table(tmp_path):
    """Migration 0010 on a v9 file with a promoted model: the table appears, the rows stay."""
    from alflow.tasks.store.database import MIGRATIONS

    assert SCHEMA_VERSION >= 10
    store = Store(tmp_path / "old.duckdb")
    with store.transaction() as con:
        con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
        for version, sql in enumerate(MIGRATIONS[:9], start=1):
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, now())", [version])
    store.register_model(1, "model-0001.skops", "sklearn.linear_model.LogisticRegression", {}, 20, 20,
                         {"method": "holdout", "accuracy": 0.5}, True, None, labels=["a", "b"])
    assert store.migrate() == SCHEMA_VERSION
    assert store.current_model()["model_version"] == 1 and store.holdout_predictions(1).empty
    written = store.write_holdout_predictions(1, pa.table({"item_id": ["x", "y"], "label": ["a", "b"]}))
    assert written == 2 and store.write_holdout_predictions(1, pa.table({"item_id": ["x"], "label": ["b"]})) == 0
    assert store.holdout_predictions(1)["label"].tolist() == ["a", "b"]  # a stored label is kept


def test_auto_runner_takes_dask_only_for_big_prelabels():
    from alflow.config import RunnerSettings
    from alflow.tasks.prelabel import runner_kind

    auto = RunnerSettings(type="auto", dask_min_items=1000)
    assert runner_kind(auto, 999) == "threads" and runner_kind(auto, 1000) == "dask"
    assert runner_kind(RunnerSettings(), 199_999) == "threads"  # the default: a small pool stays in threads
    assert runner_kind(RunnerSettings(), 200_000) == "dask"
    assert runner_kind(RunnerSettings(type="threads", dask_min_items=0), 10**7) == "threads"
    assert runner_kind(RunnerSettings(type="dask"), 1) == "dask"
    # a cluster already up costs no start-up: "auto" takes it whatever the size
    assert runner_kind(auto, 10, warm=True) == "dask"
    assert runner_kind(RunnerSettings(type="threads"), 10**7, warm=True) == "threads"


@pytest.mark.usefixtures("prefect_api")
def test_prelabel_on_a_local_dask_cluster_through_a_cycle(tmp_path, monkeypatch):
    """`[runner] type = "auto"`, a pool over dask_min_items: the first cycle's retrain starts
    a LocalCluster (a worker process) while it trains, since the pool's pre-label will need
    it, and predicts the holdout there; the second cycle's pre-label chunks are scored by
    Prefect tasks on the same cluster and written by the flow, and its holdout predicted
    there too: one cluster for the run, stopped once idle."""
    from uuid import UUID

    import distributed
    from conftest import SMS_CSV, ingested_here, write_config
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
    from test_models import label_gold

    from alflow.flows.cycle import active_learning_cycle
    from alflow.tasks import prelabel
    from alflow.tasks.train import model_file

    csv = tmp_path / "sms700.csv"
    csv.write_text("".join(SMS_CSV.read_text(encoding="utf-8").splitlines(keepends=True)[:701]), encoding="utf-8")
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=csv,
                          extra='\n[runner]\ntype = "auto"\ndask_min_items = 200\nworkers = 1\n'
                                'dask_idle_seconds = 120\n')
    config.write_text(config.read_text().replace("[query]\n", "[query]\nchunk_size = 100\n"))
    store, settings = ingested_here(config)
    label_gold(store, settings, 30)  # answers, no model yet: the first cycle is a cold start that trains one
    gold = store.holdout_set(settings.holdout_fraction)
    assert store.pool_size(settings.holdout_fraction) >= 200 and 100 < len(gold) < 200

    kinds, started = [], []
    real_task_runner, real_cluster = prelabel.task_runner, distributed.LocalCluster
    monkeypatch.setattr(prelabel, "task_runner", lambda s, kind: kinds.append(kind) or real_task_runner(s, kind))
    monkeypatch.setattr(distributed, "LocalCluster", lambda **kw: started.append(kw) or real_cluster(**kw))
    try:
        first = active_learning_cycle(str(config), auto=True, ingest_sources=False)
        # the holdout: predicted here while the cluster starts, on it if it is up by then
        assert first["model_version"] == 1 and kinds in ([], ["dask"]) and len(started) == 1
        pool = store.pool_size(settings.holdout_fraction)
        summary = active_learning_cycle(str(config), auto=True, ingest_sources=False)
        assert summary["cycle"] == 2
        assert kinds[-2:] == ["dask"] * 2 and len(started) == 1  # then the pre-label and the holdout: one cluster
        assert prelabel.LOCAL_CLUSTER.running(1)  # kept for the next step
        # The next step finds it (no second start); ended with idle_seconds, it stops.
        with prelabel.LOCAL_CLUSTER.use(1, idle_seconds=0.2):
            pass
        assert len(started) == 1
        deadline = time.monotonic() + 20
        while prelabel.LOCAL_CLUSTER.running(1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not prelabel.LOCAL_CLUSTER.running(1)
    finally:
        prelabel.LOCAL_CLUSTER.close()

    scored = store.query_df("SELECT item_id, count(*) AS n FROM predictions WHERE model_version = 1 GROUP BY item_id")
    assert len(scored) == pool and scored["n"].max() == 1
    for version in {first["model_version"], summary["model_version"]}:
        model = modeling.load_model(model_file(settings, store.model_row(version)),
                                    modeling.trusted_types(settings.model, settings.labels))
        expected = modeling.evaluate_holdout(model, gold["doc"].tolist(), gold["label"].tolist())
        metrics = store.model_row(version)["metrics"]
        assert {k: metrics[k] for k in expected} == expected  # the Dask worker's labels, today's figures
    run_id = store.batch(summary["batch_id"])["flow_run_id"]
    with get_client(sync_client=True) as client:
        def task_runs(name: str):
            return client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))

        score, predict = task_runs("score-chunk"), task_runs("predict-chunk")
    # chunks of at most 100 rows (DuckDB may cut one short at its 2,048-row vectors)
    assert pool / 100 <= len(score) <= pool / 100 + 3 and all(r.state.is_completed() for r in score)
    assert len(predict) == 2 and all(r.state.is_completed() for r in predict)
