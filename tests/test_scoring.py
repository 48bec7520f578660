"""Scoring at scale: the query's top-k and samples come out of DuckDB (never the whole pool),
pre-label writes each unscored item once in bulk, the holdout is predicted once per retrain,
and pre-label chunks run on a Dask cluster through a real cycle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from alflow.config import Settings
from alflow.tasks import modeling, query, strategies
from alflow.tasks.store import Store
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
        raw = ", ".join(f"-ln(random())" for _ in range(n_classes))
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
    from test_models import ingested, label_gold, project

    from alflow.tasks.train import retrain

    store, settings = ingested(project(tmp_path))
    calls: list[int] = []
    evaluate = modeling.evaluate_holdout
    monkeypatch.setattr(modeling, "evaluate_holdout",
                        lambda model, docs, labels: calls.append(len(docs)) or evaluate(model, docs, labels))
    label_gold(store, settings, 20)
    first = retrain(store, settings)
    assert first.promoted and len(calls) == 1
    label_gold(store, settings, 20, offset=20)
    second = retrain(store, settings)
    assert len(calls) == 2  # the new model only: v1's score on this holdout is stored
    promotion = second.metrics["promotion"]
    assert promotion["current"] == pytest.approx(first.metrics[settings.evaluation.metric])
    # New gold items change the holdout: the current model is scored on it again.
    with store.transaction() as con:
        con.execute("""INSERT INTO items (item_id, source, text, gold_label, fetched_at)
                       SELECT '00000000' || repeat('a', 56), 'x', 'a new world story', 'world', now()::TIMESTAMP""")
    label_gold(store, settings, 10, offset=40)
    retrain(store, settings)
    assert len(calls) == 4 and calls[-1] == calls[-2] == calls[0] + 1


def test_auto_runner_takes_dask_only_for_big_prelabels():
    from alflow.config import RunnerSettings
    from alflow.tasks.prelabel import runner_kind

    auto = RunnerSettings(type="auto", dask_min_items=1000)
    assert runner_kind(auto, 999) == "threads" and runner_kind(auto, 1000) == "dask"
    assert runner_kind(RunnerSettings(), 199_999) == "threads"  # the default: a small pool stays in threads
    assert runner_kind(RunnerSettings(), 200_000) == "dask"
    assert runner_kind(RunnerSettings(type="threads", dask_min_items=0), 10**7) == "threads"
    assert runner_kind(RunnerSettings(type="dask"), 1) == "dask"


@pytest.mark.usefixtures("prefect_api")
def test_prelabel_on_a_local_dask_cluster_through_a_cycle(tmp_path, small_csv, monkeypatch):
    """`[runner] type = "auto"` over dask_min_items: a cycle's pre-label chunks are scored by
    Prefect tasks on a LocalCluster (a worker process) and written by the flow, one chunk
    per transaction."""
    from uuid import UUID

    from conftest import write_config
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
    from test_models import label_gold

    from alflow.config import FilesSource, load_config
    from alflow.connectors import build_connector, to_row
    from alflow.flows.cycle import active_learning_cycle
    from alflow.tasks.train import retrain

    config = write_config(tmp_path, labels=["ham", "spam"], source_path=small_csv,
                          extra='\n[runner]\ntype = "auto"\ndask_min_items = 100\nworkers = 1\n')
    config.write_text(config.read_text().replace("[query]\n", "[query]\nchunk_size = 100\n"))
    settings = load_config(config)
    store = Store(settings.database)
    store.migrate()
    # A model already trained (without Prefect), so the one cycle below pre-labels the pool.
    source = FilesSource(type="files", name="corpus", path=small_csv, label_column="label")
    store.upsert_items(pd.DataFrame([to_row(r, "corpus") for r in build_connector(source).fetch()]), "ingest")
    label_gold(store, settings, 30)
    assert retrain(store, settings).model_version == 1
    pool = store.pool_size(settings.holdout_fraction)

    from alflow.tasks import prelabel

    kinds = []
    real_task_runner = prelabel.task_runner
    monkeypatch.setattr(prelabel, "task_runner", lambda s, kind: kinds.append(kind) or real_task_runner(s, kind))
    summary = active_learning_cycle(str(config), auto=True, ingest_sources=False)
    assert summary["cycle"] == 1
    assert kinds == ["dask"]
    scored = store.query_df("SELECT item_id, count(*) AS n FROM predictions WHERE model_version = 1 GROUP BY item_id")
    assert len(scored) == pool > 200 and scored["n"].max() == 1
    run_id = store.batch(summary["batch_id"])["flow_run_id"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(run_id)])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="score-chunk")))
    # chunks of at most 100 rows (DuckDB may cut one short at its 2,048-row vectors)
    assert 3 <= len(runs) <= 5 and all(r.state.is_completed() for r in runs)
