"""Multi-label strategies side by side: alflow's vs random vs modAL's, labels to 95% and AULC.

On the multi-label AG News (``make_multilabel.build`` of ``../shared/datasets/ag_news_7600.csv``,
seed 0, or ``--data``), split once into a pool and a test set (``--test-share``, seed 0;
``--pool`` caps the pool with a seeded sample), every arm runs the same loop with the same
model and seeds: a random cold start of ``--init`` labels (the same rows for every arm of
a seed), then per cycle the multi-label model of the labels so far
(``alflow.tasks.multilabel.model.fit_tagger``: one-vs-rest of the shipped ``[model]``
classifier on its TF-IDF, per-tag thresholds from 5-fold out-of-fold predictions) is
scored on the test set and picks the next ``--batch`` items. alflow's arms pick with
``alflow.tasks.multilabel.strategies``; modAL's with ``modAL.multilabel``'s own functions,
handed the same fitted model (``ModalView``). ``+exploration`` arms spend 10% of each batch
on random picks (``--exploration``); ``+self_training`` arms fit
``alflow.tasks.multilabel.model.fit_self_trained_tagger`` (``--share`` pseudo-labels per
human label) instead; ``+min_tags`` arms predict at least the fewest tags any answer has.
``committee`` arms bag their members as a cycle does (``alflow.tasks.query.tag_committee``);
``+density`` and ``+clusters`` (on ``mean_margin``, here only) weight its candidates by their
similarity to the pool or spread the batch over k-means clusters of them.
``--config`` takes ``[model]`` from a file (``multilabel_pool.toml``: TF-IDF fitted on the
pool). Reports per arm: AULC of micro F1 (mean over the curve), the labels until 95% of the
full-pool micro F1 (the model fitted on every pool item), their ratio to
random's, and its worst per-cycle gap to random's mean curve with the seed standard error
of that (paired) difference. ``--thresholds`` says which labeled rows choose the per-tag
thresholds. Needs the ``bench`` extra (``pip install -e .[bench]``).

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multilabel.py --seeds 3
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from alflow.flows.simulate import read_settings
from alflow.tasks import modeling
from alflow.tasks import strategies as st
from alflow.tasks.multilabel import metrics as ml_metrics
from alflow.tasks.multilabel import strategies as ml
from alflow.tasks.multilabel.model import (FOLDS, Tagger, fit_self_trained_tagger, fit_tagger, min_cardinality,
                                           predict_with_minimum)
from alflow.tasks.multilabel.tags import parse_tags, tag_matrix
from alflow.tasks.query import tag_committee

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_multilabel import build  # noqa: E402  (a sibling script, not a package)

SOURCE = HERE.parents[1] / "shared" / "datasets" / "ag_news_7600.csv"
OURS = ["mean_margin", "min_margin", "cardinality_inconsistency", "mmc", "committee", "random",
        "mean_margin+exploration", "mmc+exploration", "committee+exploration"]
MODAL = ["mean_max_loss", "max_loss", "min_confidence", "avg_confidence", "max_score", "avg_score"]
METRIC = "micro_f1"
TARGET_SHARE = 0.95
SPLIT_SEED = 0
CURVE_COLUMNS = ["strategy", "seed", "cycle", "n_labels", *ml_metrics.METRICS]


class Data:
    """The pool and test split: docs (n,) object arrays and (n, t) tag matrices."""

    def __init__(self, frame: pd.DataFrame, test_share: float, pool_cap: int | None):
        sets = [parse_tags(cell) for cell in frame["labels"]]
        self.tags = tuple(sorted(set().union(*sets)))
        docs = frame["text"].astype(str).to_numpy(dtype=object)
        y = tag_matrix(sets, self.tags)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(docs))
        n_test = int(round(test_share * len(docs)))
        test, pool = np.sort(order[:n_test]), order[n_test:]
        if pool_cap is not None and pool.size > pool_cap:
            pool = pool[:pool_cap]  # already a seeded permutation: its head is a seeded sample
        pool = np.sort(pool)
        self.pool_docs, self.pool_y = docs[pool], y[pool]
        self.test_docs, self.test_y = docs[test], y[test]


class ModalView:
    """A fitted :class:`Tagger` as modAL's multi-label strategies call a classifier: rows of
    ``X`` are pool docs; ``predict_proba`` gives the per-tag probabilities, ``predict`` the
    tags above their thresholds (the model's own decisions), ``classes_`` one per tag."""

    def __init__(self, tagger: Tagger):
        self.tagger = tagger
        self.classes_ = np.arange(len(tagger.tags))

    def predict_proba(self, X):
        return self.tagger.predict_proba(list(X))

    def predict(self, X):
        return self.tagger.predict(list(X))


def modal_pick(name: str, tagger: Tagger, docs: np.ndarray, k: int, seed: int) -> np.ndarray:
    """modAL.multilabel's ``name`` on the unlabeled ``docs``: indices (k,) into them.
    ``seed`` seeds numpy's global generator, which modAL's shuffled tie-break draws from
    (``max_score`` shuffles by default)."""
    import modAL.multilabel as modal

    np.random.seed(seed)
    picked = getattr(modal, name)(ModalView(tagger), docs, n_instances=k)
    picked = picked[0] if isinstance(picked, tuple) else picked
    return np.asarray(picked, dtype=np.int64).ravel()


EXPLORATION = 0.1  # the share of a "+exploration" arm's batch drawn at random (the shipped query.exploration)


def ours_pick(name: str, tagger: Tagger, data: Data, labeled: np.ndarray, unlabeled: np.ndarray, k: int,
              rng: np.random.Generator, exploration: float = EXPLORATION,
              settings=None) -> tuple[np.ndarray, np.ndarray]:
    """alflow's multi-label strategy ``name`` (``+exploration``: with ``exploration``):
    indices into ``unlabeled`` and whether each was a random pick. ``committee``: members
    of the ``[model]`` ``settings`` bagged as a cycle bags them (``tag_committee``)."""
    base, *options = name.split("+")
    pool = ml.TagPool(tagger.predict_proba(data.pool_docs[unlabeled].tolist()), thresholds=tagger.thresholds,
                      labeled_proba=tagger.predict_proba(data.pool_docs[labeled].tolist()),
                      labeled_tags=data.pool_y[labeled])
    if base == "committee":
        pool.committee = tag_committee(settings, tagger.model[:-1], data.pool_docs[labeled].tolist(),
                                       data.pool_y[labeled], lambda r: data.pool_docs[unlabeled[r]].tolist(),
                                       rng.spawn(1)[0])
    share = exploration if "exploration" in options else 0.0
    if "density" in options or "clusters" in options:
        # TF-IDF rows of the unlabeled pool (unit length: the shipped vectorizer's l2 norm)
        x = tagger.model[:-1].transform(data.pool_docs[unlabeled].tolist())
        strategy = density_weighted(x) if "density" in options else uncertain_clusters(x)
        picks, scores = (st.with_exploration(strategy, share) if share else strategy)(pool, k, rng)
    else:
        picks, scores = ml.get_strategy(base, exploration=share)(pool, k, rng)
    return picks, np.isnan(scores)


CANDIDATES = 10  # the shipped query.candidates


def density_weighted(x, candidates: int = CANDIDATES):
    """``+density`` (mean_margin only): among the ``k * candidates`` items of highest
    mean-margin uncertainty u, the k of highest u x density, density the item's mean cosine
    similarity to the unlabeled pool (``x`` (n, d) unit TF-IDF rows: ``x @ mean(x)``), so
    outliers that are uncertain because they are unlike anything give way to uncertain items
    typical of many (Settles & Craven 2008's information density, beta = 1)."""
    centre = np.asarray(x.mean(axis=0)).ravel()

    def strategy(pool, k, rng=None):
        pool = ml.as_tag_pool(pool)
        u = ml.mean_margin_uncertainty(pool.proba, pool.thresholds)
        rows = st.top_k(u, int(k) * candidates)
        scores = u[rows] * np.asarray(x[rows] @ centre).ravel()
        order = st.top_k(scores, k)
        return rows[order], scores[order]

    return strategy


def uncertain_clusters(x, candidates: int = CANDIDATES):
    """``+clusters`` (mean_margin only): the ``k * candidates`` items of highest mean-margin
    uncertainty split into k clusters (k-means on their unit TF-IDF rows ``x``, seeded from
    ``rng``), each cluster's most uncertain item, so a batch of 50 covers 50 kinds of doubt
    instead of near-copies of one (single-label ``cluster_margin`` over tags)."""
    from sklearn.cluster import KMeans

    def strategy(pool, k, rng):
        pool = ml.as_tag_pool(pool)
        u = ml.mean_margin_uncertainty(pool.proba, pool.thresholds)
        rows = st.top_k(u, int(k) * candidates)
        k = min(int(k), rows.size)
        clusters = KMeans(n_clusters=k, n_init=1, random_state=int(rng.integers(2**31 - 1))).fit_predict(x[rows])
        chosen = np.asarray([members[np.argmax(u[rows][members])]
                             for members in (np.flatnonzero(clusters == c) for c in np.unique(clusters))])
        if chosen.size < k:  # clusters that came out empty: the next most uncertain
            rest = np.setdiff1d(np.arange(rows.size), chosen)
            chosen = np.concatenate([chosen, rest[st.top_k(u[rows][rest], k - chosen.size)]])
        order = chosen[st.top_k(u[rows][chosen], chosen.size)]
        return rows[order], u[rows][order]

    return strategy


def run_arm(name: str, data: Data, settings, corpus, *, seed: int, init: int, batch: int, cycles: int,
            thresholds_on: str = "all", share: float = 1.0, exploration: float = EXPLORATION) -> list[dict]:
    """One arm's learning curve for one seed: a row per cycle (CURVE_COLUMNS).

    ``thresholds_on``: "all", each model's thresholds are chosen on the out-of-fold
    predictions of every labeled row (``fit_tagger``'s default); "random": of the labeled
    rows drawn at random only (the cold start, exploration picks, every row of the random
    arm); "fixed": no out-of-fold predictions, every threshold 0.5. ``+self_training`` arms:
    ``fit_self_trained_tagger`` with ``share`` pseudo-labels per human label (thresholds 0.5).
    With ``vectorizer_fit = "pool"`` (``--config``) the features are fitted on the pool.
    ``+min_tags`` arms predict at least as many tags as the fewest any labeled item has
    (``predict_with_minimum``).
    """
    n = len(data.pool_docs)
    pool = data.pool_docs.tolist() if settings.vectorizer_fit == "pool" else None
    order = list(np.random.default_rng([seed, 0]).choice(n, size=init, replace=False))
    drawn_at_random = [True] * init
    labeled = np.zeros(n, dtype=bool)
    labeled[order] = True
    rows = []
    for cycle in range(cycles + 1):
        seen = np.asarray(order, dtype=np.int64)
        at_random = np.flatnonzero(drawn_at_random) if thresholds_on == "random" else None
        if "self_training" in name.split("+"):
            tagger = fit_self_trained_tagger(settings, data.pool_docs[seen].tolist(), data.pool_y[seen], data.tags,
                                             data.pool_docs[~labeled].tolist(), seed=seed, corpus=corpus,
                                             share=share)
        else:
            tagger = fit_tagger(settings, data.pool_docs[seen].tolist(), data.pool_y[seen], data.tags, seed=seed,
                                folds=0 if thresholds_on == "fixed" else FOLDS, threshold_rows=at_random,
                                corpus=corpus, pool_docs=pool)
        if "min_tags" in name.split("+"):  # no item left without a tag where every answer has one
            predicted = predict_with_minimum(tagger.predict_proba(data.test_docs.tolist()), tagger.thresholds,
                                             min_cardinality(data.pool_y[seen]))
        else:
            predicted = tagger.predict(data.test_docs.tolist())
        scores = ml_metrics.tag_metrics(data.test_y, predicted)
        rows.append({"strategy": name, "seed": seed, "cycle": cycle, "n_labels": len(seen), **scores})
        unlabeled = np.flatnonzero(~labeled)
        if cycle == cycles or unlabeled.size == 0:
            break
        k = min(batch, unlabeled.size)
        if name in MODAL:
            picks = modal_pick(name, tagger, data.pool_docs[unlabeled], k, seed * 1000 + cycle)
            randomly = np.zeros(picks.size, dtype=bool)
        else:
            picks, randomly = ours_pick(name, tagger, data, seen, unlabeled, k,
                                        np.random.default_rng([seed, cycle + 1]), exploration, settings)
            randomly = np.ones(picks.size, dtype=bool) if name == "random" else randomly
        chosen = unlabeled[picks]
        labeled[chosen] = True
        order.extend(int(i) for i in chosen)
        drawn_at_random.extend(bool(r) for r in randomly)
    return rows


def labels_to_target(curve: pd.DataFrame, target: float) -> float:
    """The first n_labels at which the curve's METRIC reaches ``target`` (inf: never)."""
    reached = curve.loc[curve[METRIC] >= target - 1e-12, "n_labels"]
    return float(reached.iloc[0]) if len(reached) else math.inf


def summarize(curves: pd.DataFrame, full: float) -> pd.DataFrame:
    """Per arm: AULC (mean METRIC over a seed's curve; mean and sd over seeds), final METRIC,
    labels_to_95 (median over seeds) and its ratio to random's."""
    target = TARGET_SHARE * full
    rows = []
    for name, own in curves.groupby("strategy", sort=False):
        per_seed = [g.sort_values("cycle") for _, g in own.groupby("seed")]
        aulc = np.array([g[METRIC].mean() for g in per_seed])
        rows.append({"strategy": name, "aulc_mean": aulc.mean(), "aulc_sd": aulc.std(ddof=1) if aulc.size > 1 else 0.0,
                     "final": float(np.mean([g[METRIC].iloc[-1] for g in per_seed])),
                     "labels_to_95": float(np.median([labels_to_target(g, target) for g in per_seed]))})
    summary = pd.DataFrame(rows)
    random = summary.set_index("strategy").loc["random", "labels_to_95"]
    summary["labels_vs_random"] = summary["labels_to_95"] / random if math.isfinite(random) else math.nan
    return summary


def gap_to_random(curves: pd.DataFrame, name: str) -> pd.DataFrame:
    """Per cycle: ``name``'s mean METRIC minus random's, and the seed standard error of that
    difference (seeds paired: a seed has the same cold start in both arms)."""
    wide = curves.pivot_table(index=["cycle", "n_labels"], columns=["strategy", "seed"], values=METRIC)
    diff = wide[name] - wide["random"]
    out = pd.DataFrame({"gap": diff.mean(axis=1),
                        "se": diff.std(axis=1, ddof=1) / math.sqrt(diff.shape[1])}).reset_index()
    out["below_by_more_than_se"] = out["gap"] < -out["se"]
    return out


def with_gaps(summary: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The summary plus, per arm, its worst per-cycle gap to random (``worst_gap`` ± ``worst_gap_se``
    at ``worst_at`` labels) and at how many cycles it is below random by more than one SE."""
    out = summary.copy()
    worst, se, at, below = [], [], [], []
    for name in out["strategy"]:
        gaps = gap_to_random(curves, name)
        row = gaps.loc[gaps["gap"].idxmin()]
        worst.append(row["gap"]), se.append(row["se"]), at.append(int(row["n_labels"]))
        below.append(int(gaps["below_by_more_than_se"].sum()))
    out["worst_gap"], out["worst_gap_se"], out["worst_at"], out["cycles_below"] = worst, se, at, below
    return out


def report(summary: pd.DataFrame, full: float, meta: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Data: {meta['data']}; pool {meta['pool']}, test {meta['test']}, tags {', '.join(meta['tags'])}; "
             f"random cold start of {meta['init']}, batch {meta['batch']}, {meta['cycles']} cycles, "
             f"{meta['seeds']} seeds; thresholds: {meta['thresholds']}; {meta['seconds']:.0f} s.", "",
             f"Full-pool micro F1 {full:.3f} (target {TARGET_SHARE * full:.3f}).", "",
             "| strategy | source | AULC micro F1 (± sd) | final micro F1 | labels to 95% | ÷ random "
             f"| worst gap to random (± paired se) | cycles below random by > 1 se (of {meta['cycles'] + 1}) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary.itertuples(index=False):
        source = "modAL" if r.strategy in MODAL else "alflow"
        gap = "–" if r.strategy == "random" else f"{r.worst_gap:+.3f} ± {r.worst_gap_se:.3f} at {r.worst_at}"
        lines.append(f"| {r.strategy} | {source} | {r.aulc_mean:.3f} ± {r.aulc_sd:.3f} | {r.final:.3f} | "
                     f"{r.labels_to_95:g} | {r.labels_vs_random:.2f} | {gap} | "
                     f"{'–' if r.strategy == 'random' else r.cycles_below} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="a multi-label CSV (text, labels); default: built from --source")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--strategies", default=",".join(OURS + MODAL))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--init", type=int, default=20)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--pool", type=int, default=None, help="cap the pool at this many items (seeded sample)")
    parser.add_argument("--test-share", type=float, default=0.25)
    parser.add_argument("--thresholds", choices=["all", "random", "fixed"], default="all",
                        help="which labeled rows choose the per-tag thresholds (run_arm's thresholds_on)")
    parser.add_argument("--config", type=Path, default=None,
                        help="take [model] from this file (default: the shipped alflow.toml)")
    parser.add_argument("--exploration", type=float, default=EXPLORATION,
                        help="+exploration arms: the share of each batch drawn at random")
    parser.add_argument("--share", type=float, default=1.0,
                        help="+self_training arms: pseudo-labels per human label")
    parser.add_argument("--name", default=None,
                        help="the suffix of the output files (default: --thresholds)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "multilabel")
    args = parser.parse_args(argv)
    started = time.time()
    frame = pd.read_csv(args.data) if args.data else build(pd.read_csv(args.source))
    data = Data(frame, args.test_share, args.pool)
    settings, _ = read_settings(args.config)
    corpus = modeling.Corpus(settings, data.pool_docs.tolist() + data.test_docs.tolist())
    full_model = fit_tagger(settings, data.pool_docs.tolist(), data.pool_y, data.tags, corpus=corpus)
    full = ml_metrics.micro_f1(data.test_y, full_model.predict(data.test_docs.tolist()))
    print(f"pool {len(data.pool_docs)}, test {len(data.test_docs)}, full-pool micro F1 {full:.3f}", flush=True)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in names if s.split("+")[0] not in ml.NAMES and s not in MODAL
               or not set(s.split("+")[1:]) <= {"exploration", "self_training", "min_tags", "density", "clusters"}]
    if unknown:
        parser.error(f"unknown strategy {unknown[0]!r}; choose from {OURS + MODAL}")
    if "random" not in names:
        parser.error("--strategies must include random, the baseline")
    rows = []
    for name in names:
        t0 = time.time()
        for seed in range(args.seeds):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=FutureWarning)
                rows += run_arm(name, data, settings, corpus, seed=seed, init=args.init, batch=args.batch,
                                cycles=args.cycles, thresholds_on=args.thresholds, share=args.share,
                                exploration=args.exploration)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    summary = with_gaps(summarize(curves, full), curves)
    meta = {"data": str(args.data) if args.data else f"built from {args.source.name} (make_multilabel.build, seed 0)",
            "pool": len(data.pool_docs), "test": len(data.test_docs), "tags": data.tags, "init": args.init,
            "batch": args.batch, "cycles": args.cycles, "seeds": args.seeds, "thresholds": args.thresholds,
            "seconds": time.time() - started}
    command = "nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/multilabel.py " + " ".join(argv or sys.argv[1:])
    text = report(summary, full, meta, command.strip())
    print(text, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = args.name or args.thresholds
    curves.to_csv(args.out / f"curves_{suffix}.csv", index=False)
    summary.to_csv(args.out / f"summary_{suffix}.csv", index=False)
    (args.out / f"report_{suffix}.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
