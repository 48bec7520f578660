"""Labels to reach 95% of the full-pool accuracy: every alflow strategy vs random vs modAL.

On each shared data set (``--datasets``, default ``../shared/datasets/*.csv``), runs every
strategy through ``alflow.flows.simulate.run_strategy`` (the code ``alflow simulate`` and a
real cycle use) and modAL's ``margin_sampling`` in a modAL ``ActiveLearner``, side by side:
the same model (the shipped ``[model]``), the same test split, the same seeds, the same
cold-start labels and the same batch size. Prints one table per data set with AULC,
labels-to-95% and both as ratios (to random's labels with the same model, and to the better
of that and random with the plain model: no ratio is flattered by a baseline self-training
handicaps; to modAL's AULC), flags where a strategy does worse than the better random, and
writes the tables and curves to ``--out`` (``benchmarks/results/``). Needs the ``bench``
extra (``pip install -e .[bench]``) unless ``--no-modal``. ``--self-training auto,1,0`` runs
each strategy under each setting; ``--derived`` adds AG News titles only and an imbalanced
AG News.

    python benchmarks/labels.py --seeds 5
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from alflow.flows.simulate import (
    CURVE_COLUMNS,
    PLAIN_RANDOM,
    Dataset,
    _evaluate,
    aulc_by_seed,
    full_pool_accuracy,
    load_dataset,
    read_settings,
    run_strategy,
    summarize,
    plot_curves,
    train,
)
from alflow.tasks import modeling
from alflow.tasks.query import cold_start_select

HERE = Path(__file__).resolve().parent
DEFAULT_DATASETS = HERE.parents[1] / "shared" / "datasets"
# Batch and budget per data set, as the reference curves use them; the budget runs
# past random's labels-to-95% so that random's count is measured, not "more than".
PLANS = {"sms_spam": {"batch": 20, "cycles": 40}, "ag_news_7600": {"batch": 50, "cycles": 28},
         "ag_news_titles": {"batch": 50, "cycles": 70}, "ag_news_imbalanced": {"batch": 20, "cycles": 30}}
# --derived: harder sets built from AG News (written to --out/data, fixed seed): its titles
# alone (short texts: 7 words on average, like questions) and an imbalanced sample.
IMBALANCED = {"world": 1900, "sports": 600, "business": 250, "scitech": 120}
FALLBACK_PLAN = {"batch": 20, "cycles": 40}
STRATEGIES = ["random", "margin", "entropy", "least_confidence", "badge", "class_balanced", "committee",
              "cluster_margin"]
MODAL = "modAL margin"


def run_modal(data: Dataset, model_settings, query, *, init: int, batch: int, cycles: int, seed: int) -> list[dict]:
    """modAL's ``margin_sampling`` picks each batch from the same cold start as alflow's runs
    (cold-start batches while fewer than two classes are labeled, as alflow does).

    The model is refitted with ``modeling.self_train`` (``simulate.train``), the training every arm gets
    (self-training included, as the shipped ``[model]`` says), rather than ``ActiveLearner.teach``:
    modAL 0.4.2's ``teach`` passes ``force_all_finite`` to scikit-learn's ``check_X_y``,
    which scikit-learn 1.6+ no longer accepts. The query is modAL's own code.
    """
    from modAL.uncertainty import margin_sampling

    n = len(data.pool_docs)
    labeled = np.zeros(n, dtype=bool)
    order: list[int] = []
    rng = np.random.default_rng([seed, 0])
    sample = np.arange(n)
    if n > query.coverage_sample:
        sample = np.sort(rng.choice(n, size=query.coverage_sample, replace=False))
    idx, _, _ = cold_start_select(data.pool_docs[sample].tolist(), init, rng, query.cold_start)
    order.extend(int(i) for i in sample[idx])
    labeled[sample[idx]] = True
    rows = []
    decision = None
    for cycle in range(cycles + 1):
        seen = np.asarray(order)
        labels = data.pool_labels[seen].tolist()
        model = None
        if modeling.trainable(labels) is None:
            fitted = train(data, model_settings, data.pool_docs[seen].tolist(), labels, labeled, seed, decision)
            model, decision = fitted.model, fitted.decision
        rows.append({"strategy": MODAL, "seed": seed, "cycle": cycle, "n_labels": len(seen),
                     **_evaluate(model, data, data.pool_labels[seen])})
        unlabeled = np.flatnonzero(~labeled)
        if cycle == cycles or unlabeled.size == 0:
            continue
        if model is None:
            rng = np.random.default_rng([seed, cycle + 1])
            idx, _, _ = cold_start_select(data.pool_docs[unlabeled].tolist(), batch, rng, query.cold_start)
        else:
            idx = margin_sampling(model, data.pool_docs[unlabeled], n_instances=batch)
            idx = idx[0] if isinstance(idx, tuple) else idx
        picked = unlabeled[np.asarray(idx, dtype=np.int64)]
        labeled[picked] = True
        order.extend(int(i) for i in picked)
    return rows


def table(summary: pd.DataFrame, full: float, budget: int, curves: pd.DataFrame) -> pd.DataFrame:
    """The summary with ratios: labels_to_95 / random's (the same model) and / the fewer of
    random's and random's with the plain model, AULC - modAL's (with the standard error of
    that difference paired by seed: the same seed has the same cold start), and a verdict
    against the better random arm."""
    base = summary.set_index("strategy")
    per_seed = aulc_by_seed(curves)
    randoms = [name for name in ("random", PLAIN_RANDOM) if name in base.index]
    random_labels = base.loc["random", "labels_to_95"]
    best_labels = min(base.loc[randoms, "labels_to_95"])
    out = summary.copy()
    # Random never reached the target within the budget: its count is "more than the
    # budget", so a ratio to it is an upper bound (printed with "<").
    bound = random_labels if math.isfinite(random_labels) else float(budget)
    out["labels_vs_random"] = [v / bound for v in out["labels_to_95"]]
    out["ratio_is_bound"] = not math.isfinite(random_labels)
    best_bound = best_labels if math.isfinite(best_labels) else float(budget)
    out["labels_vs_best_random"] = [v / best_bound for v in out["labels_to_95"]]
    out["best_ratio_is_bound"] = not math.isfinite(best_labels)
    if MODAL in base.index:
        paired = per_seed.sub(per_seed.loc[MODAL], axis=1)
        out["aulc_vs_modal"] = out["aulc_mean"] - base.loc[MODAL, "aulc_mean"]
        out["aulc_vs_modal_se"] = [float(paired.loc[name].std(ddof=1) / math.sqrt(paired.shape[1]))
                                   if paired.shape[1] > 1 else 0.0 for name in out["strategy"]]
    else:
        out["aulc_vs_modal"] = out["aulc_vs_modal_se"] = math.nan
    best_random = base.loc[randoms, "aulc_mean"].idxmax()
    random_aulc, random_sd = base.loc[best_random, ["aulc_mean", "aulc_std"]]
    worse = []
    for row in out.itertuples(index=False):
        noise = max(row.aulc_std, random_sd)
        loses = (row.aulc_mean < random_aulc - noise) or (row.labels_to_95 > best_labels)
        worse.append("LOSES to random" if loses and row.strategy not in randoms else "")
    out["vs_random"] = worse
    return out


def to_markdown(name: str, t: pd.DataFrame, full: float, plan: dict, seeds: int, pool: int, test: int) -> str:
    lines = [f"### {name}: pool {pool}, test {test}, batch {plan['batch']}, {plan['cycles']} cycles, "
             f"{seeds} seeds; full-pool accuracy {full:.3f} (target {0.95 * full:.3f})", "",
             "| strategy | AULC (± sd) | AULC − modAL (± paired se) | final acc. | labels to 95% | ÷ random "
             "| ÷ best random | |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in t.itertuples(index=False):
        modal = "n/a" if math.isnan(r.aulc_vs_modal) else f"{r.aulc_vs_modal:+.3f} ± {r.aulc_vs_modal_se:.3f}"
        lines.append(f"| {r.strategy} | {r.aulc_mean:.3f} ± {r.aulc_std:.3f} | {modal} | "
                     f"{r.final_accuracy:.3f} | {r.labels_to_95:g} | {'< ' if r.ratio_is_bound else ''}"
                     f"{r.labels_vs_random:.2f} | {'< ' if r.best_ratio_is_bound else ''}"
                     f"{r.labels_vs_best_random:.2f} | {r.vs_random} |")
    return "\n".join(lines)


def derived_datasets(datasets: Path, out: Path) -> list[Path]:
    """The harder sets of ``--derived``, built from ``ag_news_7600.csv`` in ``datasets``."""
    source = datasets / "ag_news_7600.csv"
    if not source.is_file():
        return []
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    titles = frame[["title", "label"]].rename(columns={"title": "text"})
    titles.to_csv(out / "ag_news_titles.csv", index=False)
    parts = [frame[frame["label"] == label].sample(n, random_state=0) for label, n in IMBALANCED.items()]
    pd.concat(parts).sort_index()[["text", "label"]].to_csv(out / "ag_news_imbalanced.csv", index=False)
    return [out / "ag_news_titles.csv", out / "ag_news_imbalanced.csv"]


def arm_name(strategy: str, value: str, values: list[str]) -> str:
    """A strategy's name in the tables: with several ``--self-training`` values, the value too."""
    return strategy if len(values) < 2 else f"{strategy} (self-training {value})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS, help="folder of CSVs (text, label)")
    parser.add_argument("--only", default="", help="comma-separated data set names (file stems)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--init", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=None, help="cycles per run instead of the data set's plan")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--config", type=Path, default=None, help="alflow.toml whose [model]/[query] to use")
    parser.add_argument("--from-curves", action="store_true",
                        help="no runs: rebuild the tables and plots from the curves already in --out")
    parser.add_argument("--self-training", default="",
                        help="comma-separated [model] self_training values (auto, 1, 0): each strategy but "
                             "random runs under each; random runs under the first (and is reported with the "
                             "plain model too)")
    parser.add_argument("--derived", action="store_true",
                        help="also AG News titles only and an imbalanced AG News (built into --out/data)")
    parser.add_argument("--no-modal", action="store_true", help="leave out the modAL arm")
    args = parser.parse_args(argv)
    model_settings, query = read_settings(args.config)
    values = [v.strip() for v in args.self_training.split(",") if v.strip()] or [str(model_settings.self_training)]
    # each strategy as itself, on every label (modAL has no control slice to hold labels back)
    query = query.model_copy(update={"exploration": 0.0, "control_share": 0.0})
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    files = sorted(args.datasets.glob("*.csv"))
    if args.derived:
        files += derived_datasets(args.datasets, args.out / "data")
    if args.only:
        files = [f for f in files if f.stem in args.only.split(",")]
    for path in files:
        plan = dict(PLANS.get(path.stem, FALLBACK_PLAN))
        if args.cycles:
            plan["cycles"] = args.cycles
        data = load_dataset(path)
        full = full_pool_accuracy(data, model_settings)
        rows, seeds = [], args.seeds
        if args.from_curves:
            saved = pd.read_csv(args.out / f"{path.stem}_curves.csv")
            rows = saved.to_dict("records")
            plan["cycles"] = int(saved["cycle"].max())
            seeds = int(saved["seed"].nunique())
        arms = [(name, value) for name in names for value in (values[:1] if name == "random" else values)]
        for name, value in [] if args.from_curves else arms + ([] if args.no_modal else [(MODAL, values[0])]):
            started = time.time()
            settings = model_settings.model_copy(
                update={"self_training": value if value == "auto" else float(value)})
            label = arm_name(name, value, values) if name not in ("random", MODAL) else name
            for seed in range(seeds):
                if name == MODAL:
                    rows += run_modal(data, settings, query, init=args.init, seed=seed, **plan)
                else:
                    rows += [dict(r, strategy=label) if r["strategy"] == name else r
                             for r in run_strategy(data, settings, query.model_copy(update={"strategy": name}),
                                                   init=args.init, seed=seed, **plan)]
            print(f"{path.stem}: {label} done in {time.time() - started:.0f} s", flush=True)
        curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
        t = table(summarize(curves, full), full, args.init + plan["batch"] * plan["cycles"], curves)
        md = to_markdown(path.stem, t, full, plan, seeds, len(data.pool_docs), len(data.test_docs))
        print(md, flush=True)
        curves.to_csv(args.out / f"{path.stem}_curves.csv", index=False)
        t.to_csv(args.out / f"{path.stem}_summary.csv", index=False)
        (args.out / f"{path.stem}.md").write_text(md + "\n", encoding="utf-8")
        plot_curves(curves, full, args.out / f"{path.stem}.png",
                    title=f"{path.stem}: batch {plan['batch']}, {seeds} seeds")


if __name__ == "__main__":
    main()
