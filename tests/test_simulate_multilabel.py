"""`alflow simulate --task multi_label` end to end through the CLI, and the multi-label
self-training model it uses by default (issue 25)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import DATA
from typer.testing import CliRunner

from alflow.flows.cli import app
from alflow.flows.simulate import (PLAIN_RANDOM, TAG_CURVE_COLUMNS, TAG_SUMMARY_COLUMNS, SimulationResult, read_settings,
                                   summary_markdown)
from alflow.tasks.multilabel.model import (confident_set_picks, fit_self_trained_tagger, min_cardinality,
                                           predict_with_minimum)
from alflow.tasks.multilabel.tags import parse_tags, tag_matrix

runner = CliRunner()
MULTILABEL_CSV = DATA / "ag_news_multilabel.csv"
STRATEGIES = "random,mean_margin,min_margin,cardinality_inconsistency,mmc,committee,default"


@pytest.fixture(scope="module")
def sample_csv(tmp_path_factory):
    """The first 150 rows of the shipped multi-label AG News sample (4 tags)."""
    frame = pd.read_csv(MULTILABEL_CSV, dtype=str, keep_default_na=False).head(150)
    path = tmp_path_factory.mktemp("simml") / "sample.csv"
    frame.to_csv(path, index=False)
    return path


def simulate_args(data, out, *more):
    return ["simulate", "--task", "multi_label", "--data", str(data), "--label-col", "labels",
            "--strategies", STRATEGIES, "--batch", "10", "--cycles", "2", "--init", "10", "--seeds", "2",
            "--out", str(out), "--no-progress", *more]


@pytest.fixture(scope="module")
def runs(sample_csv, tmp_path_factory):
    """The same simulation with --jobs 1 and --jobs 2: (CLI result, out folder) each."""
    out = {}
    for jobs in (1, 2):
        folder = tmp_path_factory.mktemp(f"jobs{jobs}")
        out[jobs] = (runner.invoke(app, simulate_args(sample_csv, folder, "--jobs", str(jobs))), folder)
    return out


def test_multilabel_simulate_writes_curves_summary_and_plot_the_same_for_any_jobs(runs):
    (first, one), (second, two) = runs[1], runs[2]
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    curves, summary = pd.read_csv(one / "curves.csv"), pd.read_csv(one / "summary.csv")
    assert list(curves.columns) == TAG_CURVE_COLUMNS
    assert list(summary.columns) == TAG_SUMMARY_COLUMNS
    default = "mean_margin"  # the shipped query.strategy is single-label: the multi-label default stands in
    assert read_settings()[1].strategy not in {"mean_margin", "min_margin", "mmc"}
    # self-training is on by default, so random is also reported with the plain model
    assert summary["strategy"].tolist() == ["random", PLAIN_RANDOM, default, "min_margin",
                                            "cardinality_inconsistency", "mmc", "committee"]
    assert set(summary["metric"]) == {"micro_f1"}
    assert len(curves) == 7 * 2 * 3  # arms x seeds x (cycles + 1)
    assert sorted(curves["n_labels"].unique().tolist()) == [10, 20, 30]
    assert curves[["micro_f1", "macro_f1", "subset_accuracy"]].stack().between(0, 1).all()
    # the strategies pick different items: after the cold start their curves part
    by_arm = curves[curves["cycle"] == 2].groupby("strategy")["micro_f1"].mean()
    assert by_arm.nunique() > 1
    # the committee's members disagree elsewhere than mean margin (its fallback without them) looks
    assert by_arm["committee"] != by_arm["mean_margin"]
    assert (one / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "full-pool micro_f1" in first.output
    # the flow's artifact table names the metric too
    table = summary_markdown(SimulationResult(curves, summary, 0.64, one))
    assert "Full-pool micro_f1: 0.640" in table and "| final micro_f1 |" in table
    # worker processes change nothing
    pd.testing.assert_frame_equal(curves, pd.read_csv(two / "curves.csv"))
    pd.testing.assert_frame_equal(summary, pd.read_csv(two / "summary.csv"))


@pytest.mark.parametrize("more, needle", [
    (["--labels", "business,sports"], "--labels: tag 'scitech' of --label-col 'labels' is not one of"),
    (["--noise", "0.1"], "--noise: not with --task multi_label"),
    (["--strategies", "margin"], "--strategies: unknown multi-label strategy 'margin'"),
    (["--task", "both"], "--task 'both': choose from single_label, multi_label"),
])
def test_multilabel_simulate_bad_input_is_one_line(sample_csv, tmp_path, more, needle):
    args = simulate_args(sample_csv, tmp_path / "o")
    for flag, value in zip(more[::2], more[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert needle in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_confident_set_picks_mirror_the_human_sets():
    tags = ("a", "b", "c")
    proba = np.array([[0.9, 0.1, 0.1],     # a, confidence 0.729
                      [0.6, 0.4, 0.4],     # a, 0.216
                      [0.95, 0.05, 0.05],  # a, 0.857
                      [0.9, 0.9, 0.1],     # a;b, 0.729
                      [0.1, 0.1, 0.1],     # the empty set: no human gave it
                      [0.1, 0.9, 0.1]])    # b: no human gave it
    human = ["a", "a", "a;b", "c"]
    # per human set, as many of the surest rows predicted as that set as humans gave it
    assert confident_set_picks(proba, np.full(3, 0.5), human, tags).tolist() == [2, 0, 3]
    assert confident_set_picks(proba, np.full(3, 0.5), human, tags, share=0.5).tolist() == [2, 3]
    # a lower threshold of b makes row 1 an a;b, the less sure of the two
    more = ["a", "a", "a", "a;b", "a;b"]
    assert confident_set_picks(proba, np.full(3, 0.5), more, tags).tolist() == [2, 0, 1, 3]
    assert confident_set_picks(proba, np.array([0.5, 0.3, 0.5]), more, tags).tolist() == [2, 0, 3, 1]


def test_self_trained_tagger_learns_from_the_pool_and_keeps_half_thresholds():
    frame = pd.read_csv(MULTILABEL_CSV, dtype=str, keep_default_na=False).head(200)
    tags = ("business", "scitech", "sports", "world")
    docs = frame["text"].tolist()
    y = tag_matrix([parse_tags(c) for c in frame["labels"]], tags)
    settings = read_settings()[0]
    plain = fit_self_trained_tagger(settings, docs[:40], y[:40], tags, docs[40:], share=0)
    trained = fit_self_trained_tagger(settings, docs[:40], y[:40], tags, docs[40:])
    assert np.all(trained.thresholds == 0.5) and trained.folds == 0
    assert not np.allclose(trained.predict_proba(docs[40:]), plain.predict_proba(docs[40:]))
    with pytest.raises(ValueError, match="y has 39 rows"):
        fit_self_trained_tagger(settings, docs[:40], y[:39], tags, docs[40:])


def test_predict_with_minimum_fills_up_with_the_most_probable_tags():
    proba = np.array([[0.2, 0.4, 0.1], [0.7, 0.6, 0.1], [0.1, 0.1, 0.1]])
    assert min_cardinality(np.array([[1, 0, 0], [1, 1, 0]])) == 1
    assert min_cardinality(np.array([[0, 0, 0], [1, 1, 0]])) == 0  # "none of these tags" was answered
    assert predict_with_minimum(proba, np.full(3, 0.5), 0).tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert predict_with_minimum(proba, np.full(3, 0.5), 1).tolist() == [[0, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert predict_with_minimum(proba, np.full(3, 0.5), 2).tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0]]
