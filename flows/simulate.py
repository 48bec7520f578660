"""`alflow simulate`: replay the active-learning loop on a labeled CSV, strategy by strategy.

    read CSV -> split pool / test -> per strategy and seed:
        cold start -> (train -> evaluate on test -> select next batch -> gold labels) x cycles
    -> curves.csv, summary.csv, curves.png (+ Prefect artifacts when run as a flow)

The annotator is simulated by the gold labels. Training is :func:`modeling.fit_self_trained`
with the configured ``[model]``, the batch is :func:`query.select` / :func:`query.cold_start_select`
with the configured ``[query]``: the same code a real cycle runs, so a simulated curve is
what a run would have drawn.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from prefect import flow

from alflow.config import ModelSettings, QuerySettings

SUMMARY_COLUMNS = ["strategy", "aulc_mean", "aulc_std", "final_accuracy", "labels_to_95"]
# With --noise: the label check on each run's final labeled set (means over seeds), beside
# what re-reviewing as many labeled items picked at random would find.
LABEL_CHECK_COLUMNS = ["noise", "flipped", "flags", "flag_precision", "flag_recall", "random_precision",
                       "random_recall"]
CURVE_COLUMNS = ["strategy", "seed", "cycle", "n_labels", "accuracy", "macro_f1"]
TARGET_SHARE = 0.95  # labels_to_95: labels until this share of the full-pool accuracy
# The random split of --test-split is drawn once with this seed, so every seed and strategy
# is scored on the same test set against one full-pool accuracy.
SPLIT_SEED = 0
TEST_SPLIT = 0.25  # the test share when neither --split-col nor --test-split is given


class SimulationError(ValueError):
    """Bad input to a simulation; the message is one line naming what was wrong."""


@dataclass
class Dataset:
    """A labeled corpus split into the pool (annotated on demand) and a fixed test set."""

    pool_docs: np.ndarray  # (n_pool,) str
    pool_labels: np.ndarray  # (n_pool,) str
    test_docs: np.ndarray  # (n_test,) str
    test_labels: np.ndarray  # (n_test,) str
    classes: list[str]


@dataclass
class SimulationResult:
    curves: pd.DataFrame  # CURVE_COLUMNS
    summary: pd.DataFrame  # SUMMARY_COLUMNS
    full_accuracy: float
    out_dir: Path


def load_dataset(path: str | Path, text_col: str = "text", label_col: str = "label",
                 split_col: str | None = None, test_split: float | None = None) -> Dataset:
    """Read a CSV; the test set is the rows whose ``split_col`` is ``test``, or a stratified
    ``test_split`` share (default :data:`TEST_SPLIT`) drawn with :data:`SPLIT_SEED`, never
    both. Rows without text or label are dropped."""
    if split_col is not None and test_split is not None:
        raise SimulationError(f"--split-col {split_col!r} and --test-split {test_split}: give one or the other")
    path = Path(path)
    if not path.is_file():
        raise SimulationError(f"--data {path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse error, reported in one line
        raise SimulationError(f"--data {path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    for flag, column in (("--text-col", text_col), ("--label-col", label_col), ("--split-col", split_col)):
        if column is not None and column not in frame.columns:
            raise SimulationError(f"{flag} {column!r}: no such column in {path} (columns: {', '.join(frame.columns)})")
    frame = frame[(frame[text_col].str.strip() != "") & (frame[label_col].str.strip() != "")]
    classes = sorted(frame[label_col].unique().tolist())
    if len(classes) < 2:
        raise SimulationError(f"--label-col {label_col!r}: need at least 2 classes, found {classes}")
    if split_col is not None:
        is_test = frame[split_col].str.strip().str.lower().eq("test").to_numpy()
        if not is_test.any() or is_test.all():
            raise SimulationError(f"--split-col {split_col!r}: need rows with split 'test' and rows without")
    else:
        test_split = TEST_SPLIT if test_split is None else test_split
        if not 0.0 < test_split < 1.0:
            raise SimulationError(f"--test-split {test_split}: must be between 0 and 1")
        from sklearn.model_selection import train_test_split

        positions = np.arange(len(frame))
        counts = frame[label_col].value_counts()
        stratify = frame[label_col] if counts.min() >= 2 else None
        try:
            _, test_rows = train_test_split(positions, test_size=test_split, random_state=SPLIT_SEED, stratify=stratify)
        except ValueError as exc:
            raise SimulationError(f"--test-split {test_split}: {exc}") from None
        is_test = np.zeros(len(frame), dtype=bool)
        is_test[test_rows] = True
    docs = frame[text_col].to_numpy(dtype=object)
    labels = frame[label_col].to_numpy(dtype=object)
    return Dataset(docs[~is_test], labels[~is_test], docs[is_test], labels[is_test], classes)


def read_settings(config: str | Path | None = None) -> tuple[ModelSettings, QuerySettings]:
    """``[model]`` and ``[query]`` of ``config``, by default the ``alflow.toml`` alflow ships
    (whose ``query.strategy`` is what ``default`` names)."""
    from alflow.config import ConfigError

    path = Path(config) if config else Path(__file__).resolve().parents[1] / "alflow.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return ModelSettings(**data.get("model", {})), QuerySettings(**data.get("query", {}))
    except Exception as exc:  # pydantic's ValidationError: first error, one line
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {key}: {first['msg']}") from None


def resolve_strategies(names: Sequence[str], query: QuerySettings) -> list[str]:
    """The strategy names to run, ``default`` replaced by the configured one, each once."""
    from alflow.tasks.strategies import NAMES

    resolved: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        name = query.strategy if name == "default" else name
        if name not in NAMES:
            raise SimulationError(f"--strategies: unknown strategy {raw.strip()!r}; choose from {', '.join(NAMES)}, default")
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        raise SimulationError("--strategies: no strategy named")
    return resolved


def _evaluate(model, data: Dataset, labels_seen: np.ndarray) -> dict[str, float]:
    from alflow.tasks import modeling

    if model is None:  # no model yet: the best a user has is the most common label so far
        values, counts = np.unique(labels_seen, return_counts=True)
        predicted = np.full(len(data.test_labels), values[np.argmax(counts)] if len(values) else data.classes[0])
    else:
        predicted = np.asarray(data.classes, dtype=object)[
            modeling.predict_proba(model, data.test_docs.tolist(), data.classes).argmax(axis=1)]
    return modeling.metrics(data.test_labels.tolist(), predicted.tolist())


def noisy_answers(labels: np.ndarray, classes: Sequence[str], noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The simulated annotator's answers: ``labels`` (n,) with a seeded ``noise`` share
    flipped to another class; returns (answers (n,), flipped (n,) bool)."""
    rng = np.random.default_rng([seed, 7919])  # apart from the selection's [seed, cycle] streams
    flipped = rng.random(len(labels)) < noise
    answers = labels.copy()
    for row in np.flatnonzero(flipped):
        answers[row] = rng.choice([c for c in classes if c != labels[row]])
    return answers, flipped


def label_check_scores(data: Dataset, model_settings: ModelSettings, rows: np.ndarray, answers: np.ndarray,
                       flipped: np.ndarray, seed: int, folds: int = 5) -> dict:
    """The label check (:mod:`alflow.tasks.label_check`) on the labeled pool ``rows``
    answered ``answers``: precision and recall of its flags against the ``flipped``
    answers, and the expected ones of re-reviewing as many labeled items at random."""
    from alflow.tasks.label_check import MIN_PER_CLASS, find_label_errors, out_of_fold_proba

    given = answers[rows]
    classes = [c for c in data.classes if (given == c).sum() >= MIN_PER_CLASS]
    keep = np.isin(given, classes)
    rows, given = rows[keep], given[keep]
    wrong = flipped[rows]
    flagged = np.empty(0, dtype=int)
    if len(classes) >= 2:
        proba = out_of_fold_proba(model_settings, data.pool_docs[rows].tolist(), given.tolist(), classes, folds, seed)
        flagged = find_label_errors(given.tolist(), proba, classes)[0]
    hits = int(wrong[flagged].sum())
    n, n_wrong = len(rows), int(wrong.sum())
    return {"flipped": n_wrong, "flags": len(flagged),
            "flag_precision": hits / len(flagged) if len(flagged) else 0.0,
            "flag_recall": hits / n_wrong if n_wrong else 0.0,
            "random_precision": n_wrong / n if n else 0.0,
            "random_recall": len(flagged) / n if n else 0.0}


def pool_features(data: Dataset, model_settings: ModelSettings):
    """With ``vectorizer_fit = "pool"``: the model's features fitted once on the whole pool
    (no labels), as a real cycle fits them on its pool; cached on ``data``. Else None."""
    from alflow.tasks import modeling

    if model_settings.vectorizer_fit != "pool":
        return None
    cache = data.__dict__.setdefault("_features", {})
    key = model_settings.model_dump_json()
    if key not in cache:
        cache[key] = modeling.fit_features(model_settings, data.pool_docs.tolist())
    return cache[key]


def self_training_docs(data: Dataset, labeled: np.ndarray, model_settings: ModelSettings, seed: int) -> list[str]:
    """The unlabeled pool texts self-training reads, as a real retrain reads them: all of
    them, or beyond ``self_training_sample`` a sample drawn with ``seed``. Empty when
    self-training is off."""
    if not model_settings.self_training:
        return []
    rows = np.flatnonzero(~labeled)
    if rows.size > model_settings.self_training_sample:
        rows = np.sort(np.random.default_rng([seed, 1]).choice(rows, model_settings.self_training_sample,
                                                                replace=False))
    return data.pool_docs[rows].tolist()


def run_strategy(data: Dataset, model_settings: ModelSettings, query: QuerySettings, *, init: int,
                 batch: int, cycles: int, seed: int, advance=lambda n: None, noise: float = 0.0,
                 checks: list | None = None) -> list[dict]:
    """One learning curve: ``cycles + 1`` rows (cycle 0 is the cold start of ``init`` labels).

    ``query.strategy`` picks each batch of ``batch`` items; the random generator of cycle
    c is ``default_rng([seed, c])``, as a real run seeds batch c with ``[seed, c]``.
    ``noise``: the share of the simulated answers flipped (:func:`noisy_answers`); with
    ``checks`` given, the label check of the final labeled set is appended to it
    (:func:`label_check_scores`).
    """
    from alflow.tasks import modeling
    from alflow.tasks.query import build_pool, cold_start_select, select

    n = len(data.pool_docs)
    answers, flipped = noisy_answers(data.pool_labels, data.classes, noise, seed)
    labeled = np.zeros(n, dtype=bool)
    order: list[int] = []  # pool rows in the order they were labeled

    def take(rows: np.ndarray) -> None:
        labeled[rows] = True
        order.extend(int(r) for r in rows)

    rng = np.random.default_rng([seed, 0])
    sample = np.arange(n)
    if n > query.coverage_sample:
        sample = np.sort(rng.choice(n, size=query.coverage_sample, replace=False))
    idx, _, _ = cold_start_select(data.pool_docs[sample].tolist(), init, rng, query.cold_start)
    take(sample[idx])
    rows = []
    for cycle in range(cycles + 1):
        seen = np.asarray(order)
        docs, labels = data.pool_docs[seen].tolist(), answers[seen].tolist()
        model = None
        if modeling.trainable(labels) is None:
            unlabeled = self_training_docs(data, labeled, model_settings, seed)
            model, _ = modeling.fit_self_trained(model_settings, docs, labels, unlabeled,
                                                 features=pool_features(data, model_settings))
        rows.append({"strategy": query.strategy, "seed": seed, "cycle": cycle, "n_labels": len(seen),
                     **_evaluate(model, data, answers[seen])})
        advance(1)
        unlabeled = np.flatnonzero(~labeled)
        if cycle == cycles or unlabeled.size == 0:
            continue
        rng = np.random.default_rng([seed, cycle + 1])
        if model is None:  # still no trainable model: another cold-start batch
            idx, _, _ = cold_start_select(data.pool_docs[unlabeled].tolist(), batch, rng, query.cold_start)
        else:
            proba = modeling.predict_proba(model, data.pool_docs[unlabeled].tolist(), data.classes)
            pool = build_pool(query, proba, model, lambda r: data.pool_docs[unlabeled[r]].tolist(),
                              docs, labels, data.classes, model_settings, rng)
            idx, _, _ = select(query, pool, batch, rng)
        take(unlabeled[idx])
    if len(rows) < cycles + 1:
        advance(cycles + 1 - len(rows))
    if checks is not None:
        checks.append({"strategy": query.strategy, "seed": seed, "noise": noise,
                       **label_check_scores(data, model_settings, np.asarray(order), answers, flipped, seed)})
    return rows


def full_pool_accuracy(data: Dataset, model_settings: ModelSettings) -> float:
    """Test accuracy of the configured model trained on every pool item's gold label."""
    from alflow.tasks import modeling

    model = modeling.fit(model_settings, data.pool_docs.tolist(), data.pool_labels.tolist(),
                         features=pool_features(data, model_settings))
    return _evaluate(model, data, data.pool_labels)["accuracy"]


def labels_to_target(curve: pd.DataFrame, target: float) -> float:
    """The first n_labels at which accuracy >= target, or inf."""
    reached = curve.loc[curve["accuracy"] >= target - 1e-12, "n_labels"]
    return float(reached.iloc[0]) if len(reached) else math.inf


def aulc_by_seed(curves: pd.DataFrame) -> pd.DataFrame:
    """AULC (mean test accuracy over the curve) of each run: strategies x seeds (NaN where
    a strategy has no run of that seed)."""
    return curves.groupby(["strategy", "seed"], sort=False)["accuracy"].mean().unstack("seed")


def summarize(curves: pd.DataFrame, full_accuracy: float) -> pd.DataFrame:
    """One row per strategy (SUMMARY_COLUMNS), in the order the strategies first appear.

    AULC: the mean test accuracy over a seed's curve, then mean and standard deviation
    over seeds; final_accuracy: mean over seeds at the last cycle; labels_to_95: median
    over seeds of the labels until 95% of ``full_accuracy`` (inf if never reached).
    """
    target = TARGET_SHARE * full_accuracy
    by_seed = aulc_by_seed(curves)
    rows = []
    for name in dict.fromkeys(curves["strategy"]):
        own = curves[curves["strategy"] == name]
        per_seed = [group.sort_values("cycle") for _, group in own.groupby("seed", sort=True)]
        aulc = by_seed.loc[name].dropna().to_numpy()
        rows.append({
            "strategy": name,
            "aulc_mean": float(aulc.mean()),
            "aulc_std": float(aulc.std(ddof=1)) if len(aulc) > 1 else 0.0,
            "final_accuracy": float(np.mean([g["accuracy"].iloc[-1] for g in per_seed])),
            "labels_to_95": float(np.median([labels_to_target(g, target) for g in per_seed])),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def plot_curves(curves: pd.DataFrame, full_accuracy: float, path: str | Path, title: str = "") -> Path:
    """Accuracy against labels per strategy: the mean over seeds, a band of ±1 standard
    deviation, and the 95%-of-full-pool target as a dashed line. Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name in dict.fromkeys(curves["strategy"]):
        own = curves[curves["strategy"] == name]
        by_cycle = own.groupby("cycle")
        x = by_cycle["n_labels"].mean()
        mean, std = by_cycle["accuracy"].mean(), by_cycle["accuracy"].std(ddof=0).fillna(0.0)
        (line,) = ax.plot(x, mean, label=name, linewidth=1.6)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
    ax.axhline(TARGET_SHARE * full_accuracy, color="grey", linestyle="--", linewidth=1,
               label=f"95% of full pool ({full_accuracy:.3f})")
    ax.set_xlabel("labels")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "learning curves (mean ± 1 sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def simulate(data_path: str | Path, out_dir: str | Path, *, text_col: str = "text", label_col: str = "label",
             split_col: str | None = None, test_split: float | None = None,
             strategies: Sequence[str] = ("random", "margin", "default"), batch: int = 20, cycles: int = 25,
             init: int = 20, seeds: int = 5, config: str | Path | None = None,
             noise: float = 0.0) -> SimulationResult:
    """Run every strategy for seeds 0..seeds-1 and write ``curves.csv``, ``summary.csv`` and
    ``curves.png`` to ``out_dir``. Deterministic for given arguments.

    ``noise`` > 0: that share of the simulated answers is flipped, and summary.csv gains
    :data:`LABEL_CHECK_COLUMNS` (the label check's flags vs random re-review)."""
    from alflow.tasks.progress import track

    for flag, value, low in (("--batch", batch, 1), ("--cycles", cycles, 1), ("--init", init, 1), ("--seeds", seeds, 1)):
        if value < low:
            raise SimulationError(f"{flag} {value}: must be at least {low}")
    if not 0.0 <= noise < 0.5:
        raise SimulationError(f"--noise {noise}: must be at least 0 and below 0.5")
    model_settings, query = read_settings(config)
    names = resolve_strategies(strategies, query)
    data = load_dataset(data_path, text_col, label_col, split_col, test_split)
    if init >= len(data.pool_docs):
        raise SimulationError(f"--init {init}: the pool has only {len(data.pool_docs)} items")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = full_pool_accuracy(data, model_settings)
    rows: list[dict] = []
    checks: list[dict] | None = [] if noise > 0 else None
    for name in names:
        q = query.model_copy(update={"strategy": name})
        with track(f"simulate {name}", seeds * (cycles + 1)) as advance:
            for seed in range(seeds):
                rows.extend(run_strategy(data, model_settings, q, init=init, batch=batch, cycles=cycles,
                                         seed=seed, advance=advance, noise=noise, checks=checks))
    curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    summary = summarize(curves, full)
    if checks is not None:
        means = pd.DataFrame(checks).groupby("strategy", sort=False)[LABEL_CHECK_COLUMNS].mean()
        summary = summary.join(means, on="strategy").assign(noise=noise)
    curves.to_csv(out / "curves.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plot_curves(curves, full, out / "curves.png", title=f"{Path(data_path).name}: batch {batch}, {seeds} seeds")
    return SimulationResult(curves, summary, full, out)


def summary_markdown(result: SimulationResult) -> str:
    """The summary as a Markdown table, with the full-pool accuracy and ratios to random."""
    lines = [f"Full-pool accuracy: {result.full_accuracy:.3f} (target {TARGET_SHARE:.0%}: "
             f"{TARGET_SHARE * result.full_accuracy:.3f})", "",
             "| strategy | AULC mean | AULC sd | final accuracy | labels to 95% |", "|---|---:|---:|---:|---:|"]
    for row in result.summary.itertuples(index=False):
        lines.append(f"| {row.strategy} | {row.aulc_mean:.3f} | {row.aulc_std:.3f} | {row.final_accuracy:.3f} | "
                     f"{row.labels_to_95:g} |")
    if "flag_precision" in result.summary:
        lines += ["", label_check_caption(result.summary), "",
                  "| strategy | flipped | flags | precision | recall | random precision | random recall |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in result.summary.itertuples(index=False):
            lines.append(f"| {row.strategy} | {row.flipped:.1f} | {row.flags:.1f} | {row.flag_precision:.3f} | "
                         f"{row.flag_recall:.3f} | {row.random_precision:.3f} | {row.random_recall:.3f} |")
    return "\n".join(lines)


def label_check_caption(summary: pd.DataFrame) -> str:
    """One line on the label check under --noise (means over seeds)."""
    return (f"Label check with {summary['noise'].iloc[0]:.0%} of the answers flipped: flags on each run's final "
            "labeled set vs re-reviewing as many labeled items at random (means over seeds)")


def simulate_flow_body(**kwargs) -> SimulationResult:
    """:func:`simulate`, then its table and plot as Prefect artifacts of the current run."""
    import base64

    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    result = simulate(**kwargs)
    table = result.summary.replace({math.inf: "inf"}).to_dict("records")
    create_table_artifact(key="simulation-summary", table=table,
                          description=f"Full-pool accuracy {result.full_accuracy:.3f}")
    png = base64.b64encode((result.out_dir / "curves.png").read_bytes()).decode()
    create_markdown_artifact(key="simulation-curves", description="Learning curves (mean ± 1 sd over seeds)",
                             markdown=summary_markdown(result) + f"\n\n![learning curves](data:image/png;base64,{png})")
    return result


@flow(name="simulate")
def simulate_flow(data: str, out: str, text_col: str = "text", label_col: str = "label",
                  split_col: str | None = None, test_split: float | None = None,
                  strategies: list[str] = ["random", "margin", "default"],  # noqa: B006 - Prefect parameter
                  batch: int = 20, cycles: int = 25, init: int = 20, seeds: int = 5,
                  config: str | None = None, noise: float = 0.0) -> dict:
    """Replay the loop per strategy with a simulated annotator; curves and summary as
    files in ``out`` and as artifacts of this run."""
    result = simulate_flow_body(data_path=data, out_dir=out, text_col=text_col, label_col=label_col,
                                split_col=split_col, test_split=test_split, strategies=strategies,
                                batch=batch, cycles=cycles, init=init, seeds=seeds, config=config, noise=noise)
    return {"full_accuracy": result.full_accuracy, "out": str(result.out_dir),
            "summary": result.summary.replace({math.inf: "inf"}).to_dict("records")}
