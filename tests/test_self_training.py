"""Self-training ([model] self_training): the pseudo-label rule, the two-step fit, the
cross-validated evaluation of the model as it is trained, a real cycle through the CLI, what
a retrain fits (its cost), and simulate's plain-model baseline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import AG_NEWS_CSV, SMS_CSV, write_config
from sklearn.model_selection import StratifiedKFold
from typer.testing import CliRunner

from alflow.config import ModelSettings
from alflow.flows.cli import app
from alflow.tasks import modeling

runner = CliRunner()


# -- the rule ----------------------------------------------------------------------------------
def test_confident_picks_takes_each_class_quota_of_its_surest_rows():
    predicted = np.array(["a", "b", "a", "a", "b", "c", "a"], dtype=object)
    confidence = np.array([0.90, 0.99, 0.97, 0.90, 0.60, 0.95, 0.50])
    # a: 2 human labels -> 2 picks (0.97, then the 0.90 tie goes to the lower row, 0);
    # b: 1 -> 1 (row 1); c: no human label -> none, however sure the model is.
    picks = modeling.confident_picks(predicted, confidence, {"a": 2, "b": 1}, share=1.0)
    assert picks.tolist() == [2, 0, 1]
    assert modeling.confident_picks(predicted, confidence, {"a": 2, "b": 1}, share=0.5).tolist() == [2, 1]
    assert modeling.confident_picks(predicted, confidence, {"a": 2, "b": 1}, share=0.0).size == 0
    # A quota larger than the class's predicted rows takes what there is.
    assert sorted(modeling.confident_picks(predicted, confidence, {"b": 5}, share=1.0).tolist()) == [1, 4]
    with pytest.raises(ValueError, match="share"):
        modeling.confident_picks(predicted, confidence, {"a": 1}, share=-1)
    with pytest.raises(ValueError, match="shape"):
        modeling.confident_picks(predicted[:3], confidence, {"a": 1}, share=1)


@pytest.fixture(scope="module")
def ag():
    frame = pd.read_csv(AG_NEWS_CSV)
    return frame["text"].tolist(), frame["label"].tolist()


def test_fit_self_trained_adds_the_human_only_models_surest_predictions(ag):
    docs, labels = ag
    train, pool = list(range(40)), list(range(40, 800))
    settings = ModelSettings(self_training=1.0)
    human_docs, human_labels = [docs[i] for i in train], [labels[i] for i in train]
    pool_docs = [docs[i] for i in pool]
    model, (pseudo_docs, pseudo_labels) = modeling.fit_self_trained(settings, human_docs, human_labels, pool_docs)

    counts = modeling.class_counts(human_labels)
    assert modeling.class_counts(pseudo_labels) == counts  # one pseudo-label per human label, per class
    # They are exactly what the model of human labels alone is surest of (that model solved
    # by newton-cg: the same objective as the configured lbfgs, several times faster).
    newton = settings.model_copy(update={"classifier_params": {**settings.classifier_params, "solver": "newton-cg"}})
    picker = modeling.fit(newton, human_docs, human_labels)
    classes = sorted(counts)
    proba = modeling.predict_proba(picker, pool_docs, classes)
    predicted = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    expected = modeling.confident_picks(predicted, proba.max(axis=1), counts, 1.0)
    assert pseudo_docs == [pool_docs[i] for i in expected]
    assert pseudo_labels == predicted[expected].tolist()
    # The returned model learned from both: it is not the human-only one.
    assert not np.allclose(modeling.predict_proba(model, pool_docs[:50], classes), proba[:50])
    # Sure predictions of a first model are mostly right (here: gold labels to check).
    gold = [labels[40 + i] for i in expected]
    assert np.mean(np.asarray(gold, dtype=object) == np.asarray(pseudo_labels, dtype=object)) >= 0.8

    off, (none_docs, _) = modeling.fit_self_trained(ModelSettings(self_training=0.0), human_docs, human_labels,
                                                    pool_docs)
    assert none_docs == []  # off: the configured classifier on the human labels, as fit trains it
    plain = modeling.fit(settings, human_docs, human_labels)
    np.testing.assert_allclose(modeling.predict_proba(off, pool_docs[:50], classes),
                               modeling.predict_proba(plain, pool_docs[:50], classes))


def test_cross_validation_scores_each_fold_self_trained_on_its_own_labels(ag):
    docs, labels = ag
    human_docs, human_labels, pool_docs = docs[:60], labels[:60], docs[60:400]
    settings = ModelSettings(self_training=1.0)
    splitter = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    predicted = modeling.out_of_fold(settings, human_docs, human_labels, splitter, 0, pool_docs=pool_docs)
    expected = np.empty(60, dtype=object)
    x, y = np.asarray(human_docs, dtype=object), np.asarray(human_labels, dtype=object)
    for train, test in splitter.split(x, y):
        fold, _ = modeling.fit_self_trained(settings, x[train].tolist(), y[train].tolist(), pool_docs)
        expected[test] = fold.predict(x[test].tolist())
    assert predicted.tolist() == expected.tolist()
    plain = modeling.out_of_fold(settings, human_docs, human_labels, splitter, 0)  # no pool: human labels only
    assert plain.tolist() != predicted.tolist()


# -- a real cycle -------------------------------------------------------------------------------
@pytest.mark.usefixtures("prefect_api")
def test_a_cycle_self_trains_on_pool_items_only_and_says_so(tmp_path, monkeypatch):
    """`alflow run --auto`: each retrain reads a pool sample that holds no labeled and no
    held-out item, trains on as many pseudo-labels as human labels per class, records
    them with the model and prints them; with self_training = 0 there are none."""
    from alflow.tasks.store import Store
    from alflow.config import load_config

    seen: list[tuple[list[str], list[str] | None, int]] = []
    real = modeling.self_train

    def spy(settings, docs, labels, pool_docs, features=None, **kwargs):
        trained = real(settings, docs, labels, pool_docs, features=features, **kwargs)
        seen.append((list(docs), None if pool_docs is None else list(pool_docs), len(trained.pseudo_docs)))
        return trained

    monkeypatch.setattr(modeling, "self_train", spy)
    # forced on (a number): no out-of-fold test, always self-trained
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=SMS_CSV, extra="\n[model]\nself_training = 1\n")
    result = runner.invoke(app, ["run", "--config", str(config), "--auto", "--cycles", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    settings = load_config(config)
    store = Store(settings.database)
    holdout = set(store.holdout_set(settings.holdout_fraction)["doc"])
    assert len(seen) == 2
    for docs, pool_docs, n_pseudo in seen:
        assert pool_docs and not set(pool_docs) & holdout and not set(pool_docs) & set(docs)
        assert n_pseudo == len(docs)  # share 1.0: as many as the human labels, class by class
    metrics = store.cycles()["metrics"].iloc[-1]
    metrics = metrics if isinstance(metrics, dict) else json.loads(metrics)
    assert metrics["self_training"]["pseudo_labels"] == 38  # 40 answers, 2 of them control answers
    assert metrics["self_training"]["mode"] == "on" and metrics["self_training"]["used"]
    assert "cycle 2: 38 labels" in result.output and "(+38 self-training pseudo-labels)" in result.output

    (tmp_path / "off").mkdir()
    off = write_config(tmp_path / "off", labels=["ham", "spam"], source_path=SMS_CSV,
                       extra="\n[model]\nself_training = 0\n")
    seen.clear()
    result = runner.invoke(app, ["run", "--config", str(off), "--auto", "--cycles", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert [n for _, _, n in seen] == [0] and "pseudo-labels" not in result.output


def test_simulate_replays_self_training_as_configured(tmp_path):
    """`alflow simulate --config`: the same seeds and strategy give other curves with
    self-training on than off, and the same ones again for the same config."""
    frame = pd.read_csv(AG_NEWS_CSV).head(400)
    data = tmp_path / "ag.csv"
    frame.to_csv(data, index=False)
    curves = {}
    for name, share in (("on", 1.0), ("off", 0.0), ("on-again", 1.0)):
        config = tmp_path / f"{name}.toml"
        config.write_text(f'[model]\nself_training = {share}\n[query]\nstrategy = "cluster_margin"\n',
                          encoding="utf-8")
        result = runner.invoke(app, ["simulate", "--data", str(data), "--strategies", "default", "--batch", "10",
                                     "--cycles", "3", "--init", "12", "--seeds", "2", "--out", str(tmp_path / name),
                                     "--config", str(config), "--no-progress"])
        assert result.exit_code == 0, result.output
        curves[name] = pd.read_csv(tmp_path / name / "curves.csv")
    pd.testing.assert_frame_equal(curves["on"], curves["on-again"])
    assert not curves["on"]["accuracy"].equals(curves["off"]["accuracy"])
    assert set(curves["on"]["strategy"]) == {"cluster_margin"}


# -- "auto": decided per data set from out-of-fold evidence ---------------------------------------
def test_auto_self_training_stays_off_where_pseudo_labels_hurt_and_forcing_overrides_it(ag):
    """A constructed case where pseudo-labels hurt: the unlabeled items are all sports
    stories, so every pseudo-label of the other three classes is wrong. The out-of-fold
    macro F1 of the 200 human labels is lower with them by more than its noise: "auto"
    trains on the human labels only and says why; a number forces it either way."""
    docs, labels = ag
    rng = np.random.default_rng(103)
    rows = rng.choice(len(docs), 200, replace=False)
    rest = np.setdiff1d(np.arange(len(docs)), rows)
    human_docs, human_labels = [docs[i] for i in rows], [labels[i] for i in rows]
    pool = [docs[i] for i in rest if labels[i] == "sports"]

    auto = modeling.self_train(ModelSettings(), human_docs, human_labels, pool, seed=7)
    decision = auto.decision
    assert decision["mode"] == "auto" and not decision["used"] and auto.pseudo_docs == []
    assert decision["oof_with"] < decision["oof_without"] - decision["se"], decision
    assert decision["reason"].startswith(f"out-of-fold macro_f1 {decision['oof_with']:.3f} with, "
                                         f"{decision['oof_without']:.3f} without on 200 labels")
    assert ", it hurts (noise" in decision["reason"]
    plain = modeling.fit(ModelSettings(), human_docs, human_labels)
    np.testing.assert_allclose(auto.model.predict_proba(pool[:20]), plain.predict_proba(pool[:20]))

    forced = modeling.self_train(ModelSettings(self_training=1), human_docs, human_labels, pool, seed=7)
    assert forced.decision["used"] and forced.pseudo_docs and "oof_with" not in forced.decision
    off = modeling.self_train(ModelSettings(self_training=0), human_docs, human_labels, pool, seed=7)
    assert not off.decision["used"] and off.decision["reason"] == "self_training = 0"
    # Its evidence stands for the next retrains until the labels have grown 1.5 times.
    more = [int(i) for i in rest if labels[i] != "sports"][:100]
    for extra, gathered_on in ((50, 200), (100, 300)):
        later = modeling.self_train(ModelSettings(), human_docs + [docs[i] for i in more[:extra]],
                                    human_labels + [labels[i] for i in more[:extra]], pool, seed=7, previous=decision)
        assert later.decision["evidence_labels"] == gathered_on


@pytest.mark.usefixtures("prefect_api")
def test_auto_self_training_is_used_where_out_of_fold_evidence_says_it_helps(tmp_path):
    """`alflow run --auto` with the default self_training = "auto": on AG News the
    out-of-fold macro F1 of the human labels is far higher with pseudo-labels, so the model
    is self-trained (where they hurt it is not: the test above). The model records both
    figures, and the cycle line and the cycle summary say which and why."""
    from alflow.config import load_config
    from alflow.tasks.store import Store

    from test_flows import run_artifacts

    config = write_config(tmp_path, labels=["world", "sports", "business", "scitech"], source_path=AG_NEWS_CSV,
                          batch_size=60)
    result = runner.invoke(app, ["run", "--config", str(config), "--auto", "--cycles", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    cycle = Store(load_config(config).database).cycles().iloc[-1]
    metrics = cycle["metrics"] if isinstance(cycle["metrics"], dict) else json.loads(cycle["metrics"])
    decision = metrics["self_training"]
    assert decision["mode"] == "auto" and decision["used"] and decision["pseudo_labels"] == 57, decision
    assert decision["oof_with"] - decision["oof_without"] > decision["se"] > 0  # 57 labels: 3 answers are control
    figures = f"out-of-fold macro_f1 {decision['oof_with']:.3f} with, {decision['oof_without']:.3f} without on 57 labels"
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert f"(+57 self-training pseudo-labels: {figures}" in printed, printed
    summary = run_artifacts(cycle["flow_run_id"])["cycle-summary"].data.replace("\\", "")
    assert f"self-training (auto): on — {figures}" in summary, summary


# -- what a retrain fits (the cost of self-training) ------------------------------------------------
@pytest.fixture()
def fits(monkeypatch):
    """Every LogisticRegression fit: (solver, tol, warm-started) in order."""
    from sklearn.linear_model import LogisticRegression

    seen: list[tuple[str, float, bool]] = []
    real = LogisticRegression.fit

    def spy(self, x, y, sample_weight=None):
        seen.append((self.solver, self.tol, bool(self.warm_start and hasattr(self, "coef_"))))
        return real(self, x, y, sample_weight=sample_weight)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    return seen


def test_a_self_trained_retrain_fits_the_configured_solver_once_and_warm(ag, fits):
    """Self-training used: the model of the human labels only picks the pseudo-labels, solved
    by newton-cg; the configured lbfgs fits once, the self-trained model, started from the
    last one and stopped at SELF_TRAINED_TOL. Decided off (evidence reused): one lbfgs fit,
    the plain model, at the configured tol; nothing else is fitted."""
    docs, labels = ag
    human_docs, human_labels, pool = docs[:120], labels[:120], docs[120:700]
    first = modeling.self_train(ModelSettings(self_training=1), human_docs[:80], human_labels[:80], pool)
    fits.clear()
    trained = modeling.self_train(ModelSettings(self_training=1), human_docs, human_labels, pool, warm=first.model)
    assert fits == [("newton-cg", 1e-4, False), ("lbfgs", modeling.SELF_TRAINED_TOL, True)]
    assert trained.decision["used"] and trained.plain is None  # the picker is not the configured model

    off = {"mode": "auto", "metric": "macro_f1", "oof_with": 0.5, "oof_without": 0.6, "se": 0.01, "folds": 5,
           "evidence_labels": 100}
    fits.clear()
    kept_off = modeling.self_train(ModelSettings(), human_docs, human_labels, pool, previous=off)
    assert fits == [("lbfgs", 1e-4, False)] and not kept_off.decision["used"]
    assert kept_off.plain is kept_off.model and "it hurts" in kept_off.decision["reason"]


def test_simulate_reports_random_with_the_plain_model_as_self_training_off_trains_it(tmp_path):
    """`alflow simulate --strategies random`: with self-training on, the "random (plain
    model)" curve is the curve random draws with self_training = 0, point for point (its
    pseudo-labels come from a faster solver's model, so the plain model is fitted for it)."""
    frame = pd.read_csv(AG_NEWS_CSV).head(300)
    data = tmp_path / "ag.csv"
    frame.to_csv(data, index=False)
    curves = {}
    for name, share in (("on", 1.0), ("off", 0.0)):
        config = tmp_path / f"{name}.toml"
        config.write_text(f"[model]\nself_training = {share}\n", encoding="utf-8")
        result = runner.invoke(app, ["simulate", "--data", str(data), "--strategies", "random", "--batch", "10",
                                     "--cycles", "2", "--init", "12", "--seeds", "1", "--out", str(tmp_path / name),
                                     "--config", str(config), "--no-progress"])
        assert result.exit_code == 0, result.output
        curves[name] = pd.read_csv(tmp_path / name / "curves.csv")
    on, off = curves["on"], curves["off"]
    plain = on[on["strategy"] == "random (plain model)"].drop(columns="strategy").reset_index(drop=True)
    pd.testing.assert_frame_equal(plain, off.drop(columns="strategy").reset_index(drop=True))
    assert not on[on["strategy"] == "random"]["accuracy"].reset_index(drop=True).equals(plain["accuracy"])
