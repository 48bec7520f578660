"""`alflow simulate` end to end through the CLI, and every new strategy in a real cycle."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from conftest import AG_NEWS_CSV
from typer.testing import CliRunner

from alflow.flows.cli import app
from alflow.flows.simulate import CURVE_COLUMNS, PLAIN_RANDOM, SUMMARY_COLUMNS, read_settings, summarize

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
    assert not (out / "estimates.csv").exists()  # only with --automation-bias
    # `default` under its real name; random also with the plain model (self-training is on by default)
    names = list(dict.fromkeys(["random", PLAIN_RANDOM, "margin", "badge", default]))
    assert summary["strategy"].tolist() == names
    assert "default" not in set(curves["strategy"])
    assert len(curves) == len(names) * 2 * 4  # strategies x seeds x (cycles + 1)
    # labels to 95% over random's with the same model, and over the better random arm
    best = summary.set_index("strategy").loc[["random", PLAIN_RANDOM], "labels_to_95"].min()
    if math.isfinite(best):
        np.testing.assert_allclose(summary["labels_vs_best_random"], summary["labels_to_95"] / best)
    assert "÷ best random" in first.output
    assert sorted(curves["n_labels"].unique().tolist())[:2] == [12, 22]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full-pool accuracy" in first.output and "labels_to_95" in first.output
    assert "simulate:" not in first.output  # --no-progress: no progress lines either
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
        (["--automation-bias", "1"], "--automation-bias 1.0: must be at least 0 and below 1"),
        (["--automation-bias", "-0.1"], "--automation-bias -0.1"),
        (["--jobs", "0"], "--jobs 0: must be at least 1"),
    ],
)
def test_simulate_bad_input_is_one_line(sample_csv, tmp_path, more, needle):
    args = simulate_args(sample_csv, tmp_path / "out") + more
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not (tmp_path / "out" / "curves.csv").exists()


def jobs_args(data, out, jobs, *more):
    """Two strategies x two seeds (four runs), three batches of 10 after a cold start of
    12, with the label check (--noise) and the control estimates (--automation-bias): every
    file a run adds to."""
    return ["simulate", "--data", str(data), "--split-col", "split", "--strategies", "random,margin", "--batch", "10",
            "--cycles", "3", "--init", "12", "--seeds", "2", "--noise", "0.1", "--automation-bias", "0.3",
            "--out", str(out), "--jobs", str(jobs), *more]


@pytest.fixture(scope="module")
def jobs_runs(sample_csv, tmp_path_factory):
    """The same simulation with --jobs 1 and --jobs 2, output captured (not a terminal) and
    a progress line due after every cycle (PROGRESS_EVERY = 0): {jobs: (output, out dir)}.
    With --jobs 2 this process's run_strategy raises: the runs must happen in the workers."""
    from alflow.flows import simulate

    def not_here(*args, **kwargs):
        raise AssertionError("a (strategy, seed) run in the parent process")

    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulate, "PROGRESS_EVERY", 0.0)
        for jobs in (1, 2):
            if jobs == 2:
                patch.setattr(simulate, "run_strategy", not_here)
            out = tmp_path_factory.mktemp(f"jobs{jobs}")
            result = runner.invoke(app, jobs_args(sample_csv, out, jobs))
            assert result.exit_code == 0, result.output
            runs[jobs] = (result.output, out)
    return runs


def test_simulate_jobs_run_the_pairs_in_worker_processes_with_the_same_results(jobs_runs):
    for name in ("curves.csv", "summary.csv", "estimates.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(jobs_runs[1][1] / name), pd.read_csv(jobs_runs[2][1] / name),
                                      check_exact=True)
    assert "flag_precision" in pd.read_csv(jobs_runs[2][1] / "summary.csv")  # the label check ran in them
    assert len(pd.read_csv(jobs_runs[2][1] / "estimates.csv")) == 4


DONE_LINE = re.compile(r"^simulate: (\w+) seed (\d) done: (\d+) cycles, (\d+) labels, accuracy (\d\.\d{3}), "
                       r"\d+\.\d s \((\d)/4 runs\)$")
CYCLE_LINE = re.compile(r"^simulate: (\w+) seed (\d): (\d)/3 cycles, \d+ s$")


@pytest.mark.parametrize("jobs", [1, 2])
def test_simulate_prints_progress_lines_when_its_output_is_not_a_terminal(jobs_runs, jobs):
    """A line per finished (strategy, seed) run with its cycles, labels and final accuracy,
    and for a run still going one every PROGRESS_EVERY seconds (here: after every cycle),
    in order, from the workers as from this process."""
    output, out = jobs_runs[jobs]
    lines = [line for line in output.splitlines() if line.startswith("simulate:")]
    curves = pd.read_csv(out / "curves.csv")
    done = [DONE_LINE.match(line) for line in lines if " done: " in line]
    assert all(done) and len(done) == 4, lines
    assert sorted(int(m[6]) for m in done) == [1, 2, 3, 4]  # the count of finished runs
    for strategy in ("random", "margin"):
        for seed in (0, 1):
            last = curves[(curves["strategy"] == strategy) & (curves["seed"] == seed)].iloc[-1]
            mine = [m for m in done if (m[1], int(m[2])) == (strategy, seed)]
            assert len(mine) == 1, lines
            assert (int(mine[0][3]), int(mine[0][4]), mine[0][5]) == (3, last["n_labels"], f"{last['accuracy']:.3f}")
            own = [line for line in lines if line.startswith(f"simulate: {strategy} seed {seed}")]
            assert [CYCLE_LINE.match(line)[3] for line in own[:-1]] == ["0", "1", "2", "3"], own
            assert " done: " in own[-1]


def test_the_simulate_flow_runs_the_pairs_in_workers_and_logs_each_one(sample_csv, tmp_path, prefect_api, caplog):
    """The `simulate` flow (as a deployment runs it) with jobs=2: a progress line per
    finished run in the flow run's log, the summary as its artifact."""
    import logging

    from test_ingest import run_logs_and_artifacts

    from alflow.flows.simulate import simulate_flow

    caplog.set_level(logging.INFO, logger="prefect.flow_runs")  # the tests' default is WARNING
    state = simulate_flow(data=str(sample_csv), out=str(tmp_path / "out"), split_col="split",
                          strategies=["random", "margin"], batch=10, cycles=2, init=12, seeds=2, jobs=2,
                          return_state=True)
    assert state.is_completed(), state
    logs, artifacts = run_logs_and_artifacts(state.state_details.flow_run_id)
    done = sorted(m for m in logs if m.startswith("simulate: ") and " done: " in m)
    assert [m.split(" done: ")[0] for m in done] == ["simulate: margin seed 0", "simulate: margin seed 1",
                                                     "simulate: random seed 0", "simulate: random seed 1"], logs
    assert "simulation-summary" in artifacts
    assert len(pd.read_csv(tmp_path / "out" / "curves.csv")) == (2 + 1) * 2 * 3  # (random, its plain arm, margin)


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


def biased_config(tmp_path, **keys):
    """The shipped alflow.toml with [query]/[model] ``keys`` replaced. The tests below take
    control_share = 0.5 (its maximum) for control answers enough to test an interval on,
    and, for speed, no self-training, unigrams and a random cold start: what they test is
    the annotator and the control slice, not the model."""
    from conftest import copy_repo_config

    config = copy_repo_config(tmp_path)
    text = config.read_text(encoding="utf-8").replace("ngram_range = [1, 2]", "ngram_range = [1, 1]")
    keys = {"control_share": "0.5", "self_training": "0", "cold_start": '"random"', **keys}
    for key, value in keys.items():
        text, found = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert found == 1, key
    config.write_text(text, encoding="utf-8")
    return config


def bias_args(config, out, bias, *more):
    """AG News, 800 rows: half of them the test set (400: the truth's own standard error is
    at most 0.025), half the pool; 5 batches of 20 (the cold start's included), 10 of each
    the control slice: 50 blind answers per seed."""
    from conftest import AG_NEWS_CSV

    return ["simulate", "--data", str(AG_NEWS_CSV), "--test-split", "0.5", "--strategies", "default",
            "--batch", "20", "--cycles", "4", "--init", "20", "--seeds", "3", "--config", str(config),
            "--out", str(out), "--automation-bias", str(bias), "--no-progress", *more]


def test_automation_bias_inflates_the_unblinded_estimate_not_the_blind_one(tmp_path):
    """An annotator who accepts 80% of the pre-labels: the blind control slice still
    estimates the final model's test accuracy, the same answers given with the pre-label
    shown (the old design) overstate it by far, and many training labels are wrong."""
    from alflow.flows.simulate import ESTIMATE_COLUMNS

    out = tmp_path / "out"
    result = runner.invoke(app, bias_args(biased_config(tmp_path), out, 0.8))
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert "Automation bias 0.8" in printed and "unblinded" in printed, result.output
    per_seed = pd.read_csv(out / "estimates.csv")
    assert list(per_seed.columns) == ["strategy", "seed", *ESTIMATE_COLUMNS]
    assert per_seed["seed"].tolist() == [0, 1, 2] and (per_seed["control_n"] == 50).all()
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS + ESTIMATE_COLUMNS
    row = summary.iloc[0]
    assert row["automation_bias"] == 0.8 and row["true_accuracy"] == pytest.approx(row["final_accuracy"])
    # The truth is a sample too (400 test items): the interval (mean bounds over seeds)
    # holds it within two of the truth's standard errors.
    truth = row["true_accuracy"]
    slack = 2 * math.sqrt(truth * (1 - truth) / 400)
    assert row["control_low"] - slack <= truth <= row["control_high"] + slack, row.to_dict()
    assert row["control_low"] <= row["control_estimate"] <= row["control_high"]
    # Unblinded, the annotator's echo of the pre-label counts as the model being right.
    assert row["unblinded_estimate"] >= truth + 0.15, row.to_dict()
    assert row["unblinded_estimate"] > row["control_high"], row.to_dict()
    assert (per_seed["unblinded_estimate"] > per_seed["true_accuracy"]).all(), per_seed.to_dict("records")
    assert row["label_error_rate"] >= 0.2, row.to_dict()


def test_without_automation_bias_the_estimates_agree_and_no_label_is_wrong(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, bias_args(biased_config(tmp_path), out, 0))
    assert result.exit_code == 0, result.output
    per_seed = pd.read_csv(out / "estimates.csv")
    assert (per_seed["label_error_rate"] == 0).all()
    # Nothing accepted: shown the pre-label or not, the same answers, the same estimate.
    assert per_seed["unblinded_estimate"].tolist() == per_seed["control_estimate"].tolist()
    row = pd.read_csv(out / "summary.csv").iloc[0]
    truth = row["true_accuracy"]
    slack = 2 * math.sqrt(truth * (1 - truth) / 400)
    assert row["control_low"] - slack <= truth <= row["control_high"] + slack, row.to_dict()


def test_automation_bias_runs_are_seeded_and_control_trains_scores_nothing(tmp_path):
    """Same arguments, same numbers; with control_trains the control answers train every
    later model, so the final model has none left to be scored on (as in a real run)."""
    config = biased_config(tmp_path)
    short = ["--seeds", "2", "--cycles", "2"]
    first = runner.invoke(app, bias_args(config, tmp_path / "a", 0.5, *short))
    second = runner.invoke(app, bias_args(config, tmp_path / "b", 0.5, *short))
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    for name in ("estimates.csv", "summary.csv", "curves.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / name), pd.read_csv(tmp_path / "b" / name))
    assert pd.read_csv(tmp_path / "a" / "estimates.csv")["label_error_rate"].gt(0).all()
    (tmp_path / "c").mkdir()
    trains = runner.invoke(app, bias_args(biased_config(tmp_path / "c", control_trains="true"), tmp_path / "d", 0.5,
                                          *short, "--seeds", "1", "--cycles", "1"))
    assert trains.exit_code == 0, trains.output
    per_seed = pd.read_csv(tmp_path / "d" / "estimates.csv")
    assert (per_seed["control_n"] == 0).all() and per_seed["control_estimate"].isna().all()
    assert "n/a" in trains.output
