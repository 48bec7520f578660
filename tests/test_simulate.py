"""`alflow simulate` end to end through the CLI, and every new strategy in a real cycle."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from conftest import AG_NEWS_CSV
from typer.testing import CliRunner

from alflow.flows.cli import app
from alflow.flows.simulate import CURVE_COLUMNS, SUMMARY_COLUMNS, read_settings, summarize

runner = CliRunner()


@pytest.fixture(scope="module")
def sample_csv(tmp_path_factory):
    """240 AG News rows (4 classes), with a split column marking 80 of them as test."""
    frame = pd.read_csv(AG_NEWS_CSV).head(240)
    frame["split"] = ["test" if i % 3 == 0 else "train" for i in range(len(frame))]
    path = tmp_path_factory.mktemp("sim") / "sample.csv"
    frame.to_csv(path, index=False)
    return path


def simulate_args(data, out, *more):
    return ["simulate", "--data", str(data), "--text-col", "text", "--label-col", "label",
            "--strategies", "random,margin,badge,default", "--batch", "10", "--cycles", "3",
            "--init", "12", "--seeds", "2", "--out", str(out), "--no-progress", *more]


def test_simulate_writes_curves_summary_and_plot_deterministically(sample_csv, tmp_path):
    default = read_settings()[1].strategy
    first = runner.invoke(app, simulate_args(sample_csv, tmp_path / "a", "--split-col", "split"))
    assert first.exit_code == 0, first.output
    out = tmp_path / "a"
    curves = pd.read_csv(out / "curves.csv")
    summary = pd.read_csv(out / "summary.csv")
    assert list(curves.columns) == CURVE_COLUMNS
    assert list(summary.columns) == SUMMARY_COLUMNS
    names = list(dict.fromkeys(["random", "margin", "badge", default]))  # `default` under its real name
    assert summary["strategy"].tolist() == names
    assert "default" not in set(curves["strategy"])
    assert len(curves) == len(names) * 2 * 4  # strategies x seeds x (cycles + 1)
    assert sorted(curves["n_labels"].unique().tolist())[:2] == [12, 22]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full-pool accuracy" in first.output and "labels_to_95" in first.output
    # The test set is the 80 'test' rows: the printed accuracy is a multiple of 1/80.
    assert all(abs(a * 80 - round(a * 80)) < 1e-9 for a in curves["accuracy"])
    # Same arguments, same numbers.
    second = runner.invoke(app, simulate_args(sample_csv, tmp_path / "b", "--split-col", "split"))
    assert second.exit_code == 0, second.output
    pd.testing.assert_frame_equal(curves, pd.read_csv(tmp_path / "b" / "curves.csv"))
    pd.testing.assert_frame_equal(summary, pd.read_csv(tmp_path / "b" / "summary.csv"))


@pytest.mark.parametrize(
    ("more", "needle"),
    [
        (["--label-col", "topic"], "--label-col 'topic'"),
        (["--split-col", "fold"], "--split-col 'fold'"),
        (["--strategies", "margin,smartest"], "unknown strategy 'smartest'"),
        (["--test-split", "1.5"], "--test-split 1.5"),
        (["--split-col", "split", "--test-split", "0.3"], "--split-col 'split' and --test-split 0.3"),
    ],
)
def test_simulate_bad_input_is_one_line(sample_csv, tmp_path, more, needle):
    args = simulate_args(sample_csv, tmp_path / "out") + more
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "out" / "curves.csv").exists()


def test_summary_definitions():
    # Two seeds of one strategy; the full-pool accuracy 0.8 makes the target 0.76.
    curves = pd.DataFrame({
        "strategy": ["s"] * 6, "seed": [0, 0, 0, 1, 1, 1], "cycle": [0, 1, 2] * 2,
        "n_labels": [10, 20, 30] * 2, "accuracy": [0.5, 0.76, 0.8, 0.5, 0.6, 0.7], "macro_f1": [0.0] * 6,
    })
    row = summarize(curves, 0.8).iloc[0]
    assert row["aulc_mean"] == pytest.approx((0.6866666667 + 0.6) / 2)
    assert row["aulc_std"] == pytest.approx(pd.Series([0.6866666667, 0.6]).std())
    assert row["final_accuracy"] == pytest.approx(0.75)
    assert math.isinf(row["labels_to_95"])  # median of 20 and inf
    assert summarize(curves[curves.seed == 0], 0.8).iloc[0]["labels_to_95"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["badge", "class_balanced", "committee"])
def test_a_real_auto_cycle_uses_each_new_strategy(ag_config, prefect_api, monkeypatch, strategy):
    from alflow.config import load_config
    from alflow.tasks.store import Store

    monkeypatch.setenv("ALFLOW_QUERY__STRATEGY", strategy)
    result = runner.invoke(app, ["run", "--config", str(ag_config), "--auto", "--cycles", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    settings = load_config(ag_config)
    store = Store(settings.database)
    batches = store.batches()
    assert len(batches) == 2
    second = batches.sort_values("created_at").iloc[-1]
    assert second["strategy"].startswith(strategy)
    items = store.batch_items(second["batch_id"])
    assert len(items) == settings.query.batch_size
    own = {"badge": "diversity", "class_balanced": "class_balance", "committee": "committee"}[strategy]
    # the rest: exploration, the control slice, and flagged labels asked again (rechecks)
    fixed = int(items["picked_by"].isin(["control", "recheck"]).sum())
    assert (items["picked_by"] == own).sum() >= settings.query.batch_size - 2 - fixed
    # No message twice: not within the batch, not one already labeled in the first batch
    # (but for a recheck, which asks a flagged label again on purpose).
    items = items[items["picked_by"] != "recheck"]
    first_ids = store.batch_items(batches.sort_values("created_at").iloc[0]["batch_id"])["item_id"].tolist()
    texts = store.items(items["item_id"].tolist())["text"].str.strip().str.lower()
    seen = store.items(first_ids)["text"].str.strip().str.lower()
    assert texts.is_unique and not set(texts) & set(seen)


@pytest.mark.slow
def test_a_real_cycle_fits_the_vectorizer_on_the_pool_and_asks_by_cluster_margin(ag_config, prefect_api,
                                                                                  monkeypatch):
    """vectorizer_fit = "pool" + LSA + cluster_margin in a real run: the saved model's
    vocabulary covers unlabeled pool items' words, pre-label and query use it."""
    from alflow.config import load_config
    from alflow.tasks import modeling
    from alflow.tasks.store import Store
    from alflow.tasks.train import model_file

    monkeypatch.setenv("ALFLOW_MODEL__VECTORIZER_FIT", "pool")
    monkeypatch.setenv("ALFLOW_MODEL__SVD_COMPONENTS", "20")
    monkeypatch.setenv("ALFLOW_QUERY__STRATEGY", "cluster_margin")
    result = runner.invoke(app, ["run", "--config", str(ag_config), "--auto", "--cycles", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    settings = load_config(ag_config)
    store = Store(settings.database)
    batches = store.batches().sort_values("created_at")
    second = batches.iloc[-1]
    assert second["strategy"].startswith("cluster_margin")
    items = store.batch_items(second["batch_id"])
    # The rest: exploration, the control slice and re-checks, never plain uncertainty.
    assert (items["picked_by"] == "diversity").sum() >= settings.query.batch_size // 2
    assert "uncertainty" not in set(items["picked_by"])
    row = store.current_model()
    model = modeling.load_model(model_file(settings, row), modeling.trusted_types(settings.model, settings.labels))
    assert list(model.named_steps) == ["tfidf", "lsa", "clf"]
    labeled, _ = store.training_set(settings.holdout_fraction)
    labeled_words = set(modeling.build_model(settings.model).named_steps["tfidf"].fit(labeled["doc"]).vocabulary_)
    pool_only = set(model.named_steps["tfidf"].vocabulary_) - labeled_words
    assert len(pool_only) > 1000  # words of unlabeled items: fitted on the pool, not the labels
    assert model[:-1].transform(["a text"]).shape[1] == len(model.named_steps["tfidf"].vocabulary_) + 20


def test_simulate_fits_pool_features_once_and_runs_cluster_margin(sample_csv, tmp_path, monkeypatch):
    """[model] vectorizer_fit = "pool" in a simulation: the features are fitted once on the
    pool (no labels) and shared by every model, as a real cycle shares its pool's."""
    from conftest import copy_repo_config

    from alflow.tasks import modeling

    config = copy_repo_config(tmp_path)
    text = re.sub(r"(?m)^vectorizer_fit = .*$", 'vectorizer_fit = "pool"', config.read_text(encoding="utf-8"))
    config.write_text(re.sub(r"(?m)^svd_components = .*$", "svd_components = 20", text), encoding="utf-8")
    assert read_settings(config)[0].svd_components == 20
    fitted = []
    real = modeling.fit_features
    monkeypatch.setattr(modeling, "fit_features", lambda s, docs, seed=0: fitted.append(len(docs)) or real(s, docs, seed))
    args = ["simulate", "--data", str(sample_csv), "--split-col", "split", "--strategies", "cluster_margin",
            "--batch", "10", "--cycles", "2", "--init", "12", "--seeds", "1", "--out", str(tmp_path / "out"),
            "--config", str(config), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert fitted == [160]  # the 160 pool rows (the 80 test rows never), once for every model
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["strategy"].tolist() == ["cluster_margin"]
    assert pd.read_csv(tmp_path / "out" / "curves.csv")["n_labels"].tolist() == [12, 22, 32]
