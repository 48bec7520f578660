"""`alflow simulate`: replay the active-learning loop on a labeled CSV, strategy by strategy.

    read CSV -> split pool / test -> per strategy and seed (side by side: ``--jobs``):
        cold start -> (train -> evaluate on test -> select next batch -> gold labels) x cycles
    -> curves.csv, summary.csv, curves.png (+ Prefect artifacts when run as a flow)

The annotator is simulated by the gold labels. Training is :func:`modeling.self_train`
with the configured ``[model]``, the batch is :func:`query.select` / :func:`query.cold_start_select`
with the configured ``[query]``: the same code a real cycle runs, so a simulated curve is
what a run would have drawn. Each batch carries the control slice a real batch carries
(``query.control_share`` of it, drawn uniformly from the pool, answered blind; out of
training unless ``query.control_trains``), and ``n_labels`` counts it.

With ``[llm] base_url`` and ``model`` in ``--config``, the LLM labels the test set once
(:func:`llm_baseline`): its zero-shot accuracy is a line on curves.png and, per strategy, the
labels its mean curve needs to pass it are in the summary (:data:`LLM_COLUMNS`). With
``[model] features`` reading embeddings, every text is embedded once through the same
endpoint and kept in memory (:func:`embed_dataset`).

``--automation-bias P``: the annotator accepts the pre-label shown with every active pick
(the then-current model's prediction) with probability P, else answers itself; a control
item is shown blind, so it always answers itself. :data:`ESTIMATE_COLUMNS` then say how far
each accuracy figure is from the truth (:func:`control_estimates`).
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
from prefect import flow

from alflow.config import ModelSettings, QuerySettings

if TYPE_CHECKING:
    from alflow.tasks.modeling import VectorTable

SUMMARY_COLUMNS = ["strategy", "aulc_mean", "aulc_std", "final_accuracy", "labels_to_95", "labels_vs_random",
                   "labels_vs_best_random"]
# With --noise: the label check on each run's final labeled set (means over seeds), beside
# what re-reviewing as many labeled items picked at random would find.
LABEL_CHECK_COLUMNS = ["noise", "flipped", "flags", "flag_precision", "flag_recall", "random_precision",
                       "random_recall"]
CURVE_COLUMNS = ["strategy", "seed", "cycle", "n_labels", "accuracy", "macro_f1"]
# With [llm] base_url in --config: the LLM's zero-shot figures on the test set (the same for
# every strategy), and the labels each strategy's mean curve needs to beat its accuracy.
LLM_COLUMNS = ["llm_accuracy", "llm_macro_f1", "labels_to_llm"]
# With --automation-bias: each run's final model, its accuracy on the test set (the truth)
# beside what the control slice estimates (blind answers, Wilson 95%), what it would have
# estimated had the control items been shown with the pre-label (the old design), and the
# share of the training labels that are wrong. estimates.csv per (strategy, seed),
# summary.csv the means over seeds.
ESTIMATE_COLUMNS = ["automation_bias", "true_accuracy", "control_n", "control_estimate", "control_low",
                    "control_high", "unblinded_estimate", "label_error_rate"]
ESTIMATE_HEADERS = ["strategy", "true accuracy", "control n", "control estimate (95% Wilson)",
                    "unblinded estimate", "label error rate"]  # as printed
# Seed streams apart from the selection's [seed, cycle] ones: the control draw of batch c is
# default_rng([seed, c, CONTROL_STREAM]); the annotator's accept-or-not coins,
# default_rng([seed, BIAS_STREAM]) (one per pool item, so the same annotator would accept
# the same item's pre-label whether it was shown as an active pick or, unblinded, as control).
CONTROL_STREAM = 15485863
BIAS_STREAM = 6007
# With self-training not off, random is also reported with the plain model (human labels
# only), so that no ratio to random is flattered by a baseline self-training handicaps.
PLAIN_RANDOM = "random (plain model)"
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
    # with [model] features reading embeddings: every pool and test text's vector, embedded
    # once through [llm] (embed_dataset), registered in each process that trains
    vectors: "VectorTable | None" = None


@dataclass
class SimulationResult:
    curves: pd.DataFrame  # CURVE_COLUMNS
    summary: pd.DataFrame  # SUMMARY_COLUMNS
    full_accuracy: float
    out_dir: Path
    llm: "LLMBaseline | None" = None  # with [llm] base_url in the config


@dataclass
class LLMBaseline:
    """The LLM's zero-shot answers on the test set, asked once (:func:`llm_baseline`):
    ``accuracy`` and ``macro_f1`` over every test item (an answer that is not a class, or
    none, counts as wrong), the endpoint's ``model`` name, and ``usage``
    (:class:`alflow.connectors.llm.LLMUsage` as a dict: requests, failures, tokens, seconds)."""

    model: str
    accuracy: float
    macro_f1: float
    n: int
    usage: dict


def load_dataset(path: str | Path, text_col: str = "text", label_col: str = "label",
                 split_col: str | None = None, test_split: float | None = None) -> Dataset:
    """Read a CSV; the test set is the rows whose ``split_col`` is ``test``, or a stratified
    ``test_split`` share (default :data:`TEST_SPLIT`) drawn with :data:`SPLIT_SEED`, never
    both. Rows without text or label are dropped."""
    if split_col is not None and test_split is not None:
        raise SimulationError(f"--split-col {split_col!r} and --test-split {test_split}: give one or the other")
    frame = _read_csv(path, {"--text-col": text_col, "--label-col": label_col, "--split-col": split_col})
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
    sections = []
    for section, kind in (("model", ModelSettings), ("query", QuerySettings)):
        try:
            sections.append(kind(**data.get(section, {})))
        except Exception as exc:  # pydantic's ValidationError: first error, one line
            first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
            key = ".".join(str(p) for p in (section, *first["loc"]))
            raise ConfigError(f"{path}: {key}: {first['msg']}") from None
    return sections[0], sections[1]


def read_llm_settings(config: str | Path | None = None):
    """``[llm]`` of ``config`` (:class:`alflow.config.settings.LLMSettings`), or None when
    there is no config or its ``base_url`` is unset (no LLM baseline, no embeddings)."""
    from alflow.config import ConfigError
    from alflow.config.settings import LLMSettings

    if config is None:
        return None
    path = Path(config)
    data = tomllib.loads(path.read_text(encoding="utf-8")).get("llm", {})  # read_settings has read it whole
    try:
        llm = LLMSettings(**data)
    except Exception as exc:  # pydantic's ValidationError: first error, one line
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        key = ".".join(str(p) for p in ("llm", *first["loc"]))
        raise ConfigError(f"{path}: {key}: {first['msg']}") from None
    return llm if llm.base_url else None


def llm_baseline(data: Dataset, llm, client=None) -> LLMBaseline | None:
    """The LLM's zero-shot figures on ``data``'s test set: every test text classified once
    through ``llm`` (:class:`~alflow.config.settings.LLMSettings`) into ``data.classes``.
    None (and a warning) when the endpoint is unusable (refused, 401, 404): the curves
    stand without the line."""
    import logging

    from sklearn.metrics import f1_score

    from alflow.connectors.llm import LLMClient, LLMError

    own = client is None
    client = client or LLMClient(llm)
    try:
        answers, usage = client.classify(data.test_docs.tolist(), data.classes)
    except LLMError as exc:
        logging.getLogger("alflow").warning(f"simulate: no LLM baseline: {exc}")
        return None
    finally:
        if own:
            client.close()
    predicted = [a.label if a.status == "ok" and a.label is not None else "" for a in answers]
    truth = data.test_labels.tolist()
    return LLMBaseline(
        model=str(llm.model), n=len(truth),
        accuracy=float(np.mean([p == t for p, t in zip(predicted, truth)])) if truth else math.nan,
        # over the classes only: a missing answer is a miss of its true class, not a class of its own
        macro_f1=float(f1_score(truth, predicted, labels=data.classes, average="macro", zero_division=0)),
        usage=usage.as_dict())


def embed_dataset(data: Dataset, model_settings: ModelSettings, llm, client=None) -> None:
    """With ``[model] features`` reading embeddings: every distinct pool and test text
    embedded once through ``llm`` into ``data.vectors`` (in memory), and registered for
    this process's models (:func:`alflow.tasks.modeling.register_vectors`). A one-line
    :class:`SimulationError` without ``[llm] base_url`` and ``embedding_model``, or when
    the endpoint fails."""
    from alflow.connectors.llm import LLMClient, LLMError
    from alflow.tasks import modeling

    if model_settings.features == "tfidf":
        return
    if llm is None or not llm.embedding_model:
        raise SimulationError(f"--config: model.features = {model_settings.features!r} needs [llm] base_url "
                              "and embedding_model")
    docs = list(dict.fromkeys(data.pool_docs.tolist() + data.test_docs.tolist()))
    own = client is None
    client = client or LLMClient(llm)
    try:
        vectors, _ = client.embed(docs, llm.embedding_model)
    except LLMError as exc:
        raise SimulationError(f"--config: embedding the data set with {llm.embedding_model!r} failed: {exc}") \
            from None
    finally:
        if own:
            client.close()
    data.vectors = modeling.VectorTable(llm.embedding_model, docs, vectors)
    modeling.register_vectors(data.vectors)


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


def _predict(model, docs: np.ndarray, data: Dataset, labels_seen: np.ndarray) -> np.ndarray:
    """The model's label for each of ``docs``; with no model yet, the best a user has: the
    most common label so far."""
    from alflow.tasks import modeling

    if model is None:
        values, counts = np.unique(labels_seen, return_counts=True)
        return np.full(len(docs), values[np.argmax(counts)] if len(values) else data.classes[0], dtype=object)
    if len(docs) == 0:
        return np.empty(0, dtype=object)
    return np.asarray(data.classes, dtype=object)[
        modeling.predict_proba(model, docs.tolist(), data.classes).argmax(axis=1)]


def _evaluate(model, data: Dataset, labels_seen: np.ndarray) -> dict[str, float]:
    from alflow.tasks import modeling

    predicted = _predict(model, data.test_docs, data, labels_seen)
    return modeling.metrics(data.test_labels.tolist(), predicted.tolist())


def compose(active: np.ndarray, picked_by: Sequence[str], control: np.ndarray, k: int) -> np.ndarray:
    """The active picks (pool rows in rank order, ``picked_by`` each) that a batch of ``k``
    keeps beside its ``control`` rows, as :func:`alflow.tasks.control.compose_batch` keeps
    them: none that is a control item, and the strategy's own lowest-ranked picks give way
    (exploration picks survive)."""
    keep = ~np.isin(active, control)
    active, picked_by = active[keep], np.asarray(picked_by, dtype=object)[keep]
    room = max(0, k - len(control))
    own = np.flatnonzero(picked_by != "exploration")
    excess = max(0, len(active) - room)
    drop = own[len(own) - min(excess, len(own)):]
    return np.delete(active, drop)[:room]


def control_estimates(gold: np.ndarray, given: np.ndarray, trained: np.ndarray, control: np.ndarray,
                      predicted: np.ndarray, accepts: np.ndarray) -> dict:
    """The accuracy figures of one run's final model (:data:`ESTIMATE_COLUMNS` but
    automation_bias and true_accuracy).

    Over the pool rows: ``gold`` and ``given`` (the answers) labels; ``trained`` bool, the
    final model trained on it; ``control`` bool, answered (blind) as a control item;
    ``predicted`` the final model's label; ``accepts`` bool, the annotator leaves a
    preselected answer as it is on that item. ``unblinded_estimate``: the same control
    slice had it been shown with the judged model's pre-label preselected (the old, not
    blind, design): the annotator's answer is then that pre-label wherever it accepts. The
    estimates read the control items the model never trained on (none with
    ``control_trains``: then NaN, as the newest model of a real run has no estimate until
    the next batch is answered)."""
    from alflow.tasks.control import wilson_interval

    scored = control & ~trained
    n = int(scored.sum())
    correct = int((given[scored] == predicted[scored]).sum())
    low, high = wilson_interval(correct, n)
    shown_answers = np.where(accepts[scored], predicted[scored], given[scored])
    return {"control_n": n, "control_estimate": correct / n if n else math.nan, "control_low": low,
            "control_high": high,
            "unblinded_estimate": float((shown_answers == predicted[scored]).mean()) if n else math.nan,
            "label_error_rate": float((given[trained] != gold[trained]).mean()) if trained.any() else 0.0}


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


def corpus(data: Dataset, model_settings: ModelSettings):
    """Every pool and test text tokenized once (:class:`modeling.Corpus`), so that each
    retrain's TF-IDF is fitted and applied without tokenizing again (the same features);
    cached on ``data``."""
    from alflow.tasks import modeling

    if model_settings.features == "embeddings":
        return None  # no TF-IDF to count words for
    cache = data.__dict__.setdefault("_corpus", {})
    key = json.dumps(model_settings.vectorizer_params, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = modeling.Corpus(model_settings, data.pool_docs.tolist() + data.test_docs.tolist())
    return cache[key]


def train(data: Dataset, model_settings: ModelSettings, docs: list[str], labels: list[str],
          labeled: np.ndarray, seed: int, previous=None):
    """A simulated retrain: :func:`modeling.self_train` as a real retrain calls it (the
    unlabeled pool texts of :func:`self_training_docs`, evaluation.metric's default, the
    last retrain's decision as ``previous``)."""
    from alflow.tasks import modeling

    last = previous if isinstance(previous, modeling.SelfTrained) else None
    return modeling.self_train(model_settings, docs, labels, self_training_docs(data, labeled, model_settings, seed),
                               features=pool_features(data, model_settings), seed=seed,
                               corpus=corpus(data, model_settings),
                               previous=last.decision if last else previous,
                               warm=last.model if last and last.decision["used"] else None)


def self_training_docs(data: Dataset, labeled: np.ndarray, model_settings: ModelSettings, seed: int) -> list[str]:
    """The unlabeled pool texts self-training reads, as a real retrain reads them: all of
    them, or beyond ``self_training_sample`` a sample drawn with ``seed``. Empty when
    self-training is off."""
    if model_settings.self_training == 0:
        return []
    rows = np.flatnonzero(~labeled)
    if rows.size > model_settings.self_training_sample:
        rows = np.sort(np.random.default_rng([seed, 1]).choice(rows, model_settings.self_training_sample,
                                                                replace=False))
    return data.pool_docs[rows].tolist()


def run_strategy(data: Dataset, model_settings: ModelSettings, query: QuerySettings, *, init: int,
                 batch: int, cycles: int, seed: int, advance=lambda n: None, noise: float = 0.0,
                 checks: list | None = None, automation_bias: float = 0.0,
                 estimates: list | None = None) -> list[dict]:
    """One learning curve: ``cycles + 1`` rows (cycle 0 is the cold start of ``init`` labels).

    ``query.strategy`` picks each batch of ``batch`` items; the random generator of cycle
    c is ``default_rng([seed, c])``, as a real run seeds batch c with ``[seed, c]``. Each
    batch (the cold start's too) carries its control slice: ``query.control_share`` of it
    (:func:`alflow.tasks.control.control_size`) drawn uniformly from the pool, shown blind,
    kept out of training unless ``query.control_trains``; the active picks give way to it
    (:func:`compose`). ``n_labels`` counts every answer, the control slice's included.

    The annotator: its own answer is the gold label, with ``noise`` of them flipped
    (:func:`noisy_answers`); an active pick shown with a pre-label (a model's prediction)
    gets that pre-label instead with probability ``automation_bias``. With ``checks``
    given, the label check of the final training set is appended to it
    (:func:`label_check_scores`); with ``estimates`` given, the final model's accuracy
    figures (:func:`control_estimates`).
    """
    from alflow.tasks import modeling
    from alflow.tasks.control import control_size
    from alflow.tasks.query import build_pool, cold_start_select, select

    n = len(data.pool_docs)
    own, _ = noisy_answers(data.pool_labels, data.classes, noise, seed)
    accepts = np.random.default_rng([seed, BIAS_STREAM]).random(n) < automation_bias
    given = own.copy()  # the answers as given; a row's entry counts once it is labeled
    labeled = np.zeros(n, dtype=bool)
    control = np.zeros(n, dtype=bool)
    order: list[int] = []  # pool rows in the order they were labeled
    classes = np.asarray(data.classes, dtype=object)

    def take(candidates: np.ndarray, active: np.ndarray, picked_by, k: int, cycle: int,
             prelabels: np.ndarray | None) -> None:
        """Ask a batch of ``k``: its control slice drawn from ``candidates`` (pool rows),
        then the ``active`` picks; ``prelabels`` (per candidate) shown with the active picks."""
        size = min(control_size(query.control_share, k), len(candidates))
        slice_ = np.random.default_rng([seed, cycle, CONTROL_STREAM]).choice(candidates, size, replace=False)
        asked = compose(active, [picked_by] * len(active) if isinstance(picked_by, str) else picked_by, slice_, k)
        if prelabels is not None:
            shown = np.empty(n, dtype=object)
            shown[candidates] = prelabels
            biased = asked[accepts[asked]]
            given[biased] = shown[biased]
        control[slice_] = True
        labeled[asked] = labeled[slice_] = True
        order.extend(int(r) for r in np.concatenate([asked, slice_]))

    rng = np.random.default_rng([seed, 0])
    sample = np.arange(n)
    if n > query.coverage_sample:
        sample = np.sort(rng.choice(n, size=query.coverage_sample, replace=False))
    idx, _, picked_by = cold_start_select(data.pool_docs[sample].tolist(), init, rng, query.cold_start)
    take(np.arange(n), sample[idx], picked_by, init, 0, None)
    rows = []
    model = trained = decision = None
    # random's picks never read the model, so the plain model on the same labels is random's
    # arm without self-training: no extra fit where self-training was not used, one where it
    # was (its pseudo-labels come from a faster solver's model, not the configured one's)
    # (the annotator's answers read no model either, unless it accepts pre-labels)
    plain_arm = query.strategy == "random" and model_settings.self_training != 0 and not automation_bias
    for cycle in range(cycles + 1):
        seen = np.asarray(order)
        trained = seen if query.control_trains else seen[~control[seen]]
        docs, labels = data.pool_docs[trained].tolist(), given[trained].tolist()
        model = plain = None
        if modeling.trainable(labels) is None:
            fitted = train(data, model_settings, docs, labels, labeled, seed, decision)
            model, plain, decision = fitted.model, fitted.plain, fitted
            if plain is None and plain_arm:  # the model self_training = 0 trains
                plain = modeling.self_train(model_settings.model_copy(update={"self_training": 0.0}), docs, labels,
                                            None, features=pool_features(data, model_settings),
                                            corpus=corpus(data, model_settings)).model
        rows.append({"strategy": query.strategy, "seed": seed, "cycle": cycle, "n_labels": len(seen),
                     **_evaluate(model, data, given[trained])})
        if plain_arm:
            rows.append({"strategy": PLAIN_RANDOM, "seed": seed, "cycle": cycle, "n_labels": len(seen),
                         **_evaluate(plain, data, given[trained])})
        advance(1)
        unlabeled = np.flatnonzero(~labeled)
        if cycle == cycles or unlabeled.size == 0:
            continue
        rng = np.random.default_rng([seed, cycle + 1])
        if model is None:  # still no trainable model: another cold-start batch
            idx, _, picked_by = cold_start_select(data.pool_docs[unlabeled].tolist(), batch, rng, query.cold_start)
            take(unlabeled, unlabeled[idx], picked_by, batch, cycle + 1, None)
        else:
            proba = modeling.predict_proba(model, data.pool_docs[unlabeled].tolist(), data.classes)
            # what the strategy reads of the labels: all answers, the control slice's too,
            # as a real cycle's query reads them (Store.training_set with its default)
            pool = build_pool(query, proba, model, lambda r: data.pool_docs[unlabeled[r]].tolist(),
                              data.pool_docs[seen].tolist(), given[seen].tolist(), data.classes,
                              model_settings, rng)
            idx, _, picked_by = select(query, pool, batch, rng)
            take(unlabeled, unlabeled[idx], picked_by, batch, cycle + 1, classes[proba.argmax(axis=1)])
    own = [r for r in rows if r["strategy"] == query.strategy]
    if len(own) < cycles + 1:
        advance(cycles + 1 - len(own))
    if checks is not None:
        flipped = given != data.pool_labels
        checks.append({"strategy": query.strategy, "seed": seed, "noise": noise,
                       **label_check_scores(data, model_settings, trained, given, flipped, seed)})
    if estimates is not None:
        in_training = np.zeros(n, dtype=bool)
        in_training[trained] = True
        predicted = np.empty(n, dtype=object)
        predicted[control] = _predict(model, data.pool_docs[control], data, given[trained])
        estimates.append({"strategy": query.strategy, "seed": seed, "automation_bias": automation_bias,
                          "true_accuracy": own[-1]["accuracy"],
                          **control_estimates(data.pool_labels, given, in_training, control, predicted, accepts)})
    return rows


def full_pool_accuracy(data: Dataset, model_settings: ModelSettings) -> float:
    """Test accuracy of the configured model trained on every pool item's gold label."""
    from alflow.tasks import modeling

    model = modeling.fit(model_settings, data.pool_docs.tolist(), data.pool_labels.tolist(),
                         features=pool_features(data, model_settings), corpus=corpus(data, model_settings))
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
    over seeds of the labels until 95% of ``full_accuracy`` (inf if never reached);
    labels_vs_random: labels_to_95 over random's (the same model), labels_vs_best_random:
    over the fewer of random's and :data:`PLAIN_RANDOM`'s (NaN without a random arm that
    reached the target).
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
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    random = summary.set_index("strategy")["labels_to_95"]
    for column, arms in (("labels_vs_random", ["random"]), ("labels_vs_best_random", ["random", PLAIN_RANDOM])):
        base = min((random[a] for a in arms if a in random.index), default=math.inf)
        summary[column] = summary["labels_to_95"] / base if math.isfinite(base) else math.nan
    return summary


def labels_to_pass(curves: pd.DataFrame, accuracy: float) -> float:
    """The first mean n_labels at which a strategy's mean accuracy over seeds (per cycle)
    is above ``accuracy``; NaN if it never is (``curves``: one strategy's rows)."""
    by_cycle = curves.groupby("cycle").agg(n_labels=("n_labels", "mean"), accuracy=("accuracy", "mean"))
    passed = by_cycle.loc[by_cycle["accuracy"] > accuracy, "n_labels"]
    return float(passed.iloc[0]) if len(passed) else math.nan


def with_llm(summary: pd.DataFrame, curves: pd.DataFrame, llm: LLMBaseline) -> pd.DataFrame:
    """``summary`` with :data:`LLM_COLUMNS`: the LLM's figures, and per strategy the labels
    its mean curve needs to pass the LLM's accuracy (:func:`labels_to_pass`)."""
    passes = {name: labels_to_pass(curves[curves["strategy"] == name], llm.accuracy) for name in summary["strategy"]}
    return summary.assign(llm_accuracy=llm.accuracy, llm_macro_f1=llm.macro_f1,
                          labels_to_llm=summary["strategy"].map(passes).astype(float))


def reference_lines(full_accuracy: float, llm: LLMBaseline | None = None) -> list[tuple[float, str, str]]:
    """The horizontal lines of curves.png: (accuracy, legend label, line style) of the
    95%-of-full-pool target and, with ``llm``, of the LLM's zero-shot accuracy."""
    lines = [(TARGET_SHARE * full_accuracy, f"95% of full pool ({full_accuracy:.3f})", "--")]
    if llm is not None:
        lines.append((llm.accuracy, f"LLM zero-shot, {llm.model} ({llm.accuracy:.3f})", ":"))
    return lines


def plot_curves(curves: pd.DataFrame, full_accuracy: float, path: str | Path, title: str = "",
                llm: LLMBaseline | None = None, metric: str = "accuracy") -> Path:
    """``metric`` (a curve column) against labels per strategy: the mean over seeds, a band
    of ±1 standard deviation, and :func:`reference_lines` (the 95%-of-full-pool target;
    the LLM's zero-shot accuracy with ``llm``). Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name in dict.fromkeys(curves["strategy"]):
        own = curves[curves["strategy"] == name]
        by_cycle = own.groupby("cycle")
        x = by_cycle["n_labels"].mean()
        mean, std = by_cycle[metric].mean(), by_cycle[metric].std(ddof=0).fillna(0.0)
        (line,) = ax.plot(x, mean, label=name, linewidth=1.6)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, linewidth=0)
    for y, label, style in reference_lines(full_accuracy, llm):
        ax.axhline(y, color="grey" if style == "--" else "black", linestyle=style, linewidth=1, label=label)
    ax.set_xlabel("labels")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title or "learning curves (mean ± 1 sd over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the (strategy, seed) runs: one after another here, or side by side in worker processes --
# A run still going gets a progress line after this many seconds, and again as often.
PROGRESS_EVERY = 30.0
# What the forkserver imports before it forks the workers: each starts with them loaded.
WORKER_PRELOAD = ["alflow.flows.simulate", "alflow.tasks.modeling", "alflow.tasks.query", "alflow.tasks.control",
                  "alflow.tasks.label_check", "alflow.tasks.strategies"]
_worker: dict = {}  # in a worker process: what its initializer received, for every run it takes


def default_jobs() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1


@dataclass
class PairRun:
    """One (strategy, seed) run: :func:`run_strategy`'s rows (CURVE_COLUMNS), what it
    appended to ``checks`` and ``estimates`` (empty when not asked for), its wall seconds."""

    strategy: str
    seed: int
    rows: list[dict]
    checks: list[dict]
    estimates: list[dict]
    seconds: float


def run_pair(data: Dataset, model_settings: ModelSettings, query: QuerySettings, seed: int, options: dict,
             advance: Callable[[int], None] = lambda n: None) -> PairRun:
    """:func:`run_strategy` for ``seed``; ``options``: its other keyword arguments, with
    ``checks`` and ``estimates`` as booleans (collect them or not)."""
    options = dict(options)
    checks = [] if options.pop("checks") else None
    estimates = [] if options.pop("estimates") else None
    start = time.perf_counter()
    if isinstance(data, TagDataset):
        rows = run_tag_strategy(data, model_settings, query, seed=seed, advance=advance, **options)
    else:
        rows = run_strategy(data, model_settings, query, seed=seed, advance=advance, checks=checks,
                            estimates=estimates, **options)
    return PairRun(query.strategy, seed, rows, checks or [], estimates or [], time.perf_counter() - start)


class PairProgress:
    """Progress of the runs ``pairs`` ((strategy, seed) each, ``cycles + 1`` steps a run):
    each strategy's bar (``advances``: the ``advance`` of its
    :func:`alflow.tasks.progress.track`) and, with ``log``, a line per finished run and one
    every :data:`PROGRESS_EVERY` seconds for a run still going, so that a log file shows
    where a long simulation is."""

    def __init__(self, pairs: Sequence[tuple[str, int]], cycles: int,
                 advances: dict[str, Callable[[int], None]], log: Callable[[str], None] | None = None,
                 metric: str = "accuracy"):
        self.pairs, self.cycles, self.advances, self.log = list(pairs), cycles, advances, log
        self.metric = metric  # the curve column a finished run's line gives
        self.steps = [0] * len(self.pairs)
        self.started = [math.nan] * len(self.pairs)  # time.monotonic() seconds
        self.last_line = [math.nan] * len(self.pairs)
        self.finished = 0

    def start(self, index: int) -> None:
        self.started[index] = self.last_line[index] = time.monotonic()

    def advance(self, index: int, n: int = 1) -> None:
        """``n`` more steps of run ``index`` (any beyond its ``cycles + 1`` are ignored)."""
        n = min(n, self.cycles + 1 - self.steps[index])
        if n <= 0:
            return
        self.steps[index] += n
        strategy, seed = self.pairs[index]
        self.advances[strategy](n)
        now = time.monotonic()
        if self.log is not None and now - self.last_line[index] >= PROGRESS_EVERY:
            self.last_line[index] = now
            self.log(f"simulate: {strategy} seed {seed}: {self.steps[index] - 1}/{self.cycles} cycles, "
                     f"{now - self.started[index]:.0f} s")

    def finish(self, index: int, run: PairRun) -> None:
        strategy, seed = self.pairs[index]
        rest = self.cycles + 1 - self.steps[index]
        if rest > 0:
            self.steps[index] += rest
            self.advances[strategy](rest)
        self.finished += 1
        if self.log is not None:
            last = [row for row in run.rows if row["strategy"] == strategy][-1]
            self.log(f"simulate: {strategy} seed {seed} done: {last['cycle']} cycles, {last['n_labels']} labels, "
                     f"{self.metric} {last[self.metric]:.3f}, {run.seconds:.1f} s "
                     f"({self.finished}/{len(self.pairs)} runs)")


def run_pairs_here(data: Dataset, model_settings: ModelSettings, queries: dict[str, QuerySettings],
                   pairs: Sequence[tuple[str, int]], options: dict, progress: PairProgress) -> list[PairRun]:
    """The runs one after another in this process, in the order of ``pairs``."""
    runs = []
    for index, (name, seed) in enumerate(pairs):
        progress.start(index)
        runs.append(run_pair(data, model_settings, queries[name], seed, options,
                             lambda n, index=index: progress.advance(index, n)))
        progress.finish(index, runs[-1])
    return runs


def _start_worker(data: Dataset, model_settings: ModelSettings, events) -> None:
    """A worker process's initializer: the data set (its :func:`corpus` and
    :func:`pool_features` already computed by the parent) and the model settings arrive
    once, for every run the worker takes; BLAS and OpenMP on one thread, as the workers
    share the cores."""
    from threadpoolctl import threadpool_limits

    _exit_with_parent()
    if data.vectors is not None:
        from alflow.tasks import modeling

        modeling.register_vectors(data.vectors)
    _worker.update(data=data, model_settings=model_settings, events=events, limits=threadpool_limits(limits=1))


def _exit_with_parent() -> None:
    """End this worker as soon as the process that started it ends, killed included: the
    workers hold each other's queue pipes open, so they would otherwise wait on them (and
    keep their forkserver) for good."""
    import threading
    from multiprocessing import parent_process
    from multiprocessing.connection import wait

    parent = parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        wait([parent.sentinel])  # ready when the parent's end of the pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _run_pair_in_worker(index: int, query: QuerySettings, seed: int, options: dict) -> PairRun:
    """Run ``index`` in a worker: its start and each step go to the parent as (index, n)
    events (n = 0: started)."""
    events = _worker["events"]
    events.put((index, 0))
    return run_pair(_worker["data"], _worker["model_settings"], query, seed, options,
                    lambda n: events.put((index, n)))


def _end_workers(pool) -> None:
    """Stop ``pool``'s workers now, not after the runs they are in (a failed or interrupted
    simulation would otherwise wait for them)."""
    pool.shutdown(wait=False, cancel_futures=True)
    if hasattr(pool, "terminate_workers"):  # Python 3.14+
        pool.terminate_workers()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def worker_context():
    """The multiprocessing context the workers come from: a forkserver, started now, that
    imports :data:`WORKER_PRELOAD` in the background (while this process reads the data).
    It lives as long as this process, so a later simulation here forks from it at once.
    Where there is no forkserver (Windows), fresh interpreters (spawn)."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    forkserver.ensure_running()
    return context


def run_pairs_in_processes(data: Dataset, model_settings: ModelSettings, queries: dict[str, QuerySettings],
                           pairs: Sequence[tuple[str, int]], options: dict, progress: PairProgress,
                           jobs: int) -> list[PairRun]:
    """The runs on ``jobs`` worker processes, returned in the order of ``pairs`` whatever
    order they finish in. The workers are forked by a forkserver (a clean process, not
    this one with Prefect's threads), ``data`` is pickled once per worker."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    context = worker_context()
    # A worker writes its events straight into the pipe (no feeder thread), so a run's are
    # all there before its result: its lines come in order, its last cycle's too.
    events = context.SimpleQueue()

    def drain() -> None:
        while not events.empty():
            index, n = events.get()
            if n == 0:
                progress.start(index)
            else:
                progress.advance(index, n)

    runs: list = [None] * len(pairs)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                             initargs=(data, model_settings, events)) as pool:
        futures = {pool.submit(_run_pair_in_worker, index, queries[name], seed, options): index
                   for index, (name, seed) in enumerate(pairs)}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for future in done:
                    index = futures[future]
                    runs[index] = future.result()
                    progress.finish(index, runs[index])
        except BrokenProcessPool:
            _end_workers(pool)
            raise SimulationError(f"--jobs {jobs}: a worker process died (killed, or out of memory?); "
                                  "try fewer jobs") from None
        except BaseException:
            _end_workers(pool)
            raise
    events.close()
    return runs


def run_all(data, model_settings: ModelSettings, queries: dict[str, QuerySettings], pairs: Sequence[tuple[str, int]],
            options: dict, progress: PairProgress, workers: int, full_pool: Callable[[], float]) -> tuple[list, float]:
    """(the runs of ``pairs`` in order, ``full_pool()``): one after another here with one
    worker, else on ``workers`` processes while ``full_pool`` (the full-pool score) is
    computed here meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    if workers == 1:
        return run_pairs_here(data, model_settings, queries, pairs, options, progress), full_pool()
    with ThreadPoolExecutor(1, thread_name_prefix="full-pool") as meanwhile:
        full = meanwhile.submit(full_pool)
        runs = run_pairs_in_processes(data, model_settings, queries, pairs, options, progress, workers)
        return runs, full.result()


def simulate(data_path: str | Path, out_dir: str | Path, *, text_col: str = "text", label_col: str = "label",
             split_col: str | None = None, test_split: float | None = None,
             strategies: Sequence[str] = ("random", "margin", "default"), batch: int = 20, cycles: int = 25,
             init: int = 20, seeds: int = 5, config: str | Path | None = None,
             noise: float = 0.0, automation_bias: float | None = None, jobs: int | None = None,
             log: Callable[[str], None] | None = None, task: str = "single_label",
             labels: Sequence[str] | None = None) -> SimulationResult:
    """Run every strategy for seeds 0..seeds-1 and write ``curves.csv``, ``summary.csv`` and
    ``curves.png`` to ``out_dir``. Deterministic for given arguments, ``jobs`` included.

    ``noise`` > 0: that share of the simulated answers is flipped, and summary.csv gains
    :data:`LABEL_CHECK_COLUMNS` (the label check's flags vs random re-review).
    ``automation_bias`` given (0 included): the annotator accepts an active pick's pre-label
    with that probability; ``estimates.csv`` holds :data:`ESTIMATE_COLUMNS` per strategy
    and seed, and summary.csv gains their means over seeds.

    ``jobs``: worker processes running the (strategy, seed) runs side by side (default
    :func:`default_jobs`; 1: one after another in this process); the corpus' features are
    computed once, here, and the full-pool model is fitted here while the workers run.
    Every run uses one BLAS/OpenMP thread, whichever process it is in. ``log``: where the
    progress lines of :class:`PairProgress` go (none without it).

    ``task = "multi_label"``: ``label_col`` holds tag sets (``;``-joined), ``labels`` the
    tag list (None: inferred); :func:`simulate_tags` runs (no ``noise``, ``automation_bias``
    nor LLM baseline there)."""
    from contextlib import ExitStack

    from threadpoolctl import threadpool_limits

    from alflow.tasks.progress import track

    jobs = default_jobs() if jobs is None else jobs
    for flag, value, low in (("--batch", batch, 1), ("--cycles", cycles, 1), ("--init", init, 1), ("--seeds", seeds, 1),
                             ("--jobs", jobs, 1)):
        if value < low:
            raise SimulationError(f"{flag} {value}: must be at least {low}")
    if not 0.0 <= noise < 0.5:
        raise SimulationError(f"--noise {noise}: must be at least 0 and below 0.5")
    if automation_bias is not None and not 0.0 <= automation_bias < 1.0:
        raise SimulationError(f"--automation-bias {automation_bias}: must be at least 0 and below 1")
    if task not in TASKS:
        raise SimulationError(f"--task {task!r}: choose from {', '.join(TASKS)}")
    if task == "multi_label":
        if noise > 0 or automation_bias is not None:
            raise SimulationError(f"--{'noise' if noise > 0 else 'automation-bias'}: not with --task multi_label")
        return simulate_tags(data_path, Path(out_dir), text_col=text_col, label_col=label_col, split_col=split_col,
                             test_split=test_split, labels=labels, strategies=strategies, batch=batch,
                             cycles=cycles, init=init, seeds=seeds, config=config, jobs=jobs, log=log)
    if labels:
        raise SimulationError("--labels: only with --task multi_label (single-label classes come from --label-col)")
    if min(jobs, len(strategies) * seeds) > 1:  # at most that many runs: start the workers' imports now
        worker_context()
    model_settings, query = read_settings(config)
    names = resolve_strategies(strategies, query)
    pairs = [(name, seed) for name in names for seed in range(seeds)]
    workers = min(jobs, len(pairs))
    llm = read_llm_settings(config)
    data = load_dataset(data_path, text_col, label_col, split_col, test_split)
    if init >= len(data.pool_docs):
        raise SimulationError(f"--init {init}: the pool has only {len(data.pool_docs)} items")
    embed_dataset(data, model_settings, llm)
    baseline = llm_baseline(data, llm) if llm is not None and llm.model else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    queries = {name: query.model_copy(update={"strategy": name}) for name in names}
    options = {"init": init, "batch": batch, "cycles": cycles, "noise": noise, "checks": noise > 0,
               "automation_bias": automation_bias or 0.0, "estimates": automation_bias is not None}
    # One thread each, here as in the workers: N workers do not oversubscribe N cores, and a
    # run's numbers do not depend on where it ran (BLAS's sums differ in the last bits with
    # its thread count, and a margin can tip a pick).
    with threadpool_limits(limits=1), ExitStack() as bars:
        advances = {name: bars.enter_context(track(f"simulate {name}", seeds * (cycles + 1))) for name in names}
        progress = PairProgress(pairs, cycles, advances, log)
        pool_features(data, model_settings)  # shared by every run: computed once, before any
        corpus(data, model_settings)
        runs, full = run_all(data, model_settings, queries, pairs, options, progress, workers,
                             lambda: full_pool_accuracy(data, model_settings))
    rows = [row for run in runs for row in run.rows]
    checks = [check for run in runs for check in run.checks] if noise > 0 else None
    estimates = [estimate for run in runs for estimate in run.estimates] if automation_bias is not None else None
    curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    summary = summarize(curves, full)
    if checks is not None:
        means = pd.DataFrame(checks).groupby("strategy", sort=False)[LABEL_CHECK_COLUMNS].mean()
        summary = summary.join(means, on="strategy").assign(noise=noise)
    if estimates is not None:
        per_seed = pd.DataFrame(estimates, columns=["strategy", "seed", *ESTIMATE_COLUMNS])
        per_seed.to_csv(out / "estimates.csv", index=False)
        means = per_seed.groupby("strategy", sort=False)[ESTIMATE_COLUMNS[1:]].mean()
        summary = summary.assign(automation_bias=automation_bias).join(means, on="strategy")
    if baseline is not None:
        summary = with_llm(summary, curves, baseline)
    curves.to_csv(out / "curves.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plot_curves(curves, full, out / "curves.png", title=f"{Path(data_path).name}: batch {batch}, {seeds} seeds",
                llm=baseline)
    return SimulationResult(curves, summary, full, out, baseline)


# -- multi-label (--task multi_label): tag sets, one-vs-rest, micro F1 --------------------------
# The curve columns of a multi-label run: every metric of alflow.tasks.multilabel.metrics.
TAG_CURVE_COLUMNS = ["strategy", "seed", "cycle", "n_labels", "micro_f1", "macro_f1", "hamming_loss",
                     "subset_accuracy"]
TAG_SUMMARY_COLUMNS = ["strategy", "metric", "aulc_mean", "aulc_std", "final_score", "labels_to_95",
                       "labels_vs_random", "labels_vs_best_random"]
TASKS = ("single_label", "multi_label")  # the values of Settings.task


@dataclass
class TagDataset:
    """A multi-label corpus split into the pool and a fixed test set: docs (n,) str and
    tag matrices (n, t) 0/1, columns in ``tags`` order."""

    pool_docs: np.ndarray
    pool_y: np.ndarray
    test_docs: np.ndarray
    test_y: np.ndarray
    tags: tuple[str, ...]
    vectors: None = None  # no embeddings: the multi-label model reads TF-IDF


def load_tag_dataset(path: str | Path, text_col: str = "text", label_col: str = "labels",
                     split_col: str | None = None, test_split: float | None = None,
                     labels: Sequence[str] | None = None) -> TagDataset:
    """Read a CSV whose ``label_col`` holds each row's tags joined by ``;`` (an empty cell:
    no tag applies, an answer too). ``labels``: the tag list (its order is the columns');
    None: every tag the column names, sorted. The test set is ``split_col`` == ``test`` or
    a random ``test_split`` share (default :data:`TEST_SPLIT`, seed :data:`SPLIT_SEED`).
    Rows without text are dropped."""
    from alflow.tasks.multilabel.tags import check_tags, parse_tags, tag_matrix

    if split_col is not None and test_split is not None:
        raise SimulationError(f"--split-col {split_col!r} and --test-split {test_split}: give one or the other")
    frame = _read_csv(path, {"--text-col": text_col, "--label-col": label_col, "--split-col": split_col})
    frame = frame[frame[text_col].str.strip() != ""]
    try:
        sets = [parse_tags(cell) for cell in frame[label_col]]
        tags = check_tags(labels if labels else sorted(set().union(*sets)))
    except ValueError as exc:
        raise SimulationError(f"--label-col {label_col!r}: {exc}") from None
    if len(tags) < 2:
        raise SimulationError(f"--label-col {label_col!r}: need at least 2 tags, found {list(tags)}")
    unknown = sorted(set().union(*sets) - set(tags))
    if unknown:
        raise SimulationError(f"--labels: tag {unknown[0]!r} of --label-col {label_col!r} is not one of {list(tags)}")
    if split_col is not None:
        is_test = frame[split_col].str.strip().str.lower().eq("test").to_numpy()
        if not is_test.any() or is_test.all():
            raise SimulationError(f"--split-col {split_col!r}: need rows with split 'test' and rows without")
    else:
        test_split = TEST_SPLIT if test_split is None else test_split
        if not 0.0 < test_split < 1.0:
            raise SimulationError(f"--test-split {test_split}: must be between 0 and 1")
        n_test = int(round(test_split * len(frame)))
        if not 0 < n_test < len(frame):
            raise SimulationError(f"--test-split {test_split}: leaves no test or no pool item of {len(frame)} rows")
        is_test = np.zeros(len(frame), dtype=bool)
        is_test[np.random.default_rng(SPLIT_SEED).permutation(len(frame))[:n_test]] = True
    docs = frame[text_col].to_numpy(dtype=object)
    y = tag_matrix(sets, tags)
    return TagDataset(docs[~is_test], y[~is_test], docs[is_test], y[is_test], tags)


def _read_csv(path: str | Path, columns: dict[str, str | None]) -> pd.DataFrame:
    """The CSV at ``path`` as text cells; ``columns``: {flag: column} that must exist (None: not asked)."""
    path = Path(path)
    if not path.is_file():
        raise SimulationError(f"--data {path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # noqa: BLE001 - any parse error, reported in one line
        raise SimulationError(f"--data {path}: not a readable CSV ({type(exc).__name__}: {exc})") from None
    for flag, column in columns.items():
        if column is not None and column not in frame.columns:
            raise SimulationError(f"{flag} {column!r}: no such column in {path} (columns: {', '.join(frame.columns)})")
    return frame


def resolve_tag_strategies(names: Sequence[str], query: QuerySettings) -> list[str]:
    """The multi-label strategy names to run, ``default`` replaced by the configured one
    (``mean_margin`` where the config names a single-label strategy), each once."""
    from alflow.config.settings import TAG_DEFAULTS
    from alflow.tasks.multilabel.strategies import NAMES

    default = query.strategy if query.strategy in NAMES else TAG_DEFAULTS[("query", "strategy")]
    resolved: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        name = default if name == "default" else name
        if name not in NAMES:
            raise SimulationError(f"--strategies: unknown multi-label strategy {raw.strip()!r}; choose from "
                                  f"{', '.join(NAMES)}, default")
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        raise SimulationError("--strategies: no strategy named")
    return resolved


def tag_metric(config: str | Path | None) -> str:
    """``[evaluation] metric`` of ``config`` for a multi-label run (default micro_f1); the
    labels_to_95 target is a share of it, so it must grow with quality."""
    from alflow.config.settings import METRICS, TAG_DEFAULTS

    metric = TAG_DEFAULTS[("evaluation", "metric")]
    if config:
        metric = tomllib.loads(Path(config).read_text(encoding="utf-8")).get("evaluation", {}).get("metric", metric)
    if metric not in METRICS["multi_label"] or metric == "hamming_loss":
        raise SimulationError(f"--config: evaluation.metric {metric!r}: a multi-label simulation reads micro_f1, "
                              "macro_f1 or subset_accuracy (higher is better)")
    return metric


def fit_tags(data: TagDataset, model_settings: ModelSettings, rows: np.ndarray, seed: int, *,
             self_trained: bool | None = None):
    """The multi-label model of the pool ``rows`` (their gold tag sets), as the cycle fits it:
    self-training on (``model.self_training`` not 0; ``self_trained`` overrides) is
    :func:`~alflow.tasks.multilabel.model.fit_self_trained_tagger` on the unlabeled pool
    (:func:`self_training_docs`), else :func:`~alflow.tasks.multilabel.model.fit_tagger` with
    ``model.tag_thresholds``. A :class:`~alflow.tasks.multilabel.model.Tagger`."""
    from alflow.tasks import modeling
    from alflow.tasks.multilabel.model import FOLDS, fit_self_trained_tagger, fit_tagger

    labeled = np.zeros(len(data.pool_docs), dtype=bool)
    labeled[rows] = True
    docs, y = data.pool_docs[rows].tolist(), data.pool_y[rows]
    pool = data.pool_docs.tolist() if model_settings.vectorizer_fit == "pool" else None
    on = model_settings.self_training != 0 if self_trained is None else self_trained
    if on:
        share = modeling.self_training_mode(model_settings)[1]
        unlabeled = self_training_docs(data, labeled, model_settings, seed)
        return fit_self_trained_tagger(model_settings, docs, y, data.tags, unlabeled, share=share,
                                       seed=seed, corpus=corpus(data, model_settings))
    folds = 0 if model_settings.tag_thresholds == "fixed" else FOLDS
    return fit_tagger(model_settings, docs, y, data.tags, folds=folds, seed=seed, pool_docs=pool,
                      corpus=corpus(data, model_settings))


def run_tag_strategy(data: TagDataset, model_settings: ModelSettings, query: QuerySettings, *, init: int,
                     batch: int, cycles: int, seed: int, advance=lambda n: None) -> list[dict]:
    """One multi-label learning curve: ``cycles + 1`` rows (TAG_CURVE_COLUMNS; cycle 0 is a
    random cold start of ``init`` rows, ``default_rng([seed, 0])``). Each cycle the model of
    the labels so far (:func:`fit_tags`) is scored on the test set and ``query.strategy``
    (:func:`alflow.tasks.multilabel.strategies.get_strategy` with ``query.exploration``;
    ``committee``'s members from :func:`alflow.tasks.query.tag_committee`, as a cycle's)
    picks the next ``batch`` with ``default_rng([seed, cycle])``; the annotator answers
    with the gold tag sets. Random, with self-training on, also gives the rows of
    :data:`PLAIN_RANDOM` (the same labels, the model of them alone)."""
    from alflow.tasks.multilabel import metrics as ml_metrics
    from alflow.tasks.multilabel import strategies as ml
    from alflow.tasks.query import tag_committee

    n = len(data.pool_docs)
    order = [int(i) for i in np.random.default_rng([seed, 0]).choice(n, size=min(init, n), replace=False)]
    labeled = np.zeros(n, dtype=bool)
    labeled[order] = True
    strategy = ml.get_strategy(query.strategy, exploration=query.exploration, candidates=query.candidates)
    plain_arm = query.strategy == "random" and model_settings.self_training != 0
    rows = []
    for cycle in range(cycles + 1):
        seen = np.asarray(order, dtype=np.int64)
        tagger = fit_tags(data, model_settings, seen, seed)
        arms = [(query.strategy, tagger)]
        if plain_arm:
            arms.append((PLAIN_RANDOM, fit_tags(data, model_settings, seen, seed, self_trained=False)))
        for name, model in arms:
            scores = ml_metrics.tag_metrics(data.test_y, model.predict(data.test_docs.tolist()))
            rows.append({"strategy": name, "seed": seed, "cycle": cycle, "n_labels": len(seen), **scores})
        advance(1)
        unlabeled = np.flatnonzero(~labeled)
        if cycle == cycles or unlabeled.size == 0:
            continue
        rng = np.random.default_rng([seed, cycle + 1])
        pool = ml.TagPool(tagger.predict_proba(data.pool_docs[unlabeled].tolist()), thresholds=tagger.thresholds,
                          labeled_proba=tagger.predict_proba(data.pool_docs[seen].tolist()),
                          labeled_tags=data.pool_y[seen])
        if query.strategy == "committee":  # as the cycle's query builds it (tag_model_picks)
            pool.committee = tag_committee(model_settings, tagger.model[:-1], data.pool_docs[seen].tolist(),
                                           data.pool_y[seen], lambda r: data.pool_docs[unlabeled[r]].tolist(),
                                           rng.spawn(1)[0])
        picks, _ = strategy(pool, min(batch, unlabeled.size), rng)
        chosen = unlabeled[np.asarray(picks, dtype=np.int64)]
        labeled[chosen] = True
        order.extend(int(i) for i in chosen)
    return rows


def full_pool_score(data: TagDataset, model_settings: ModelSettings, metric: str) -> float:
    """``metric`` on the test set of the multi-label model of every pool item's tags (no
    self-training: there is no unlabeled item left)."""
    from alflow.tasks.multilabel import metrics as ml_metrics

    tagger = fit_tags(data, model_settings, np.arange(len(data.pool_docs)), 0, self_trained=False)
    return float(ml_metrics.tag_metrics(data.test_y, tagger.predict(data.test_docs.tolist()))[metric])


def summarize_tags(curves: pd.DataFrame, full: float, metric: str) -> pd.DataFrame:
    """:func:`summarize` of multi-label curves on ``metric`` (TAG_SUMMARY_COLUMNS:
    ``final_score`` is the mean final ``metric``)."""
    summary = summarize(curves.rename(columns={metric: "accuracy"})[CURVE_COLUMNS[:5]], full)
    summary = summary.rename(columns={"final_accuracy": "final_score"}).assign(metric=metric)
    return summary[TAG_SUMMARY_COLUMNS]


def simulate_tags(data_path: str | Path, out: Path, *, text_col: str, label_col: str, split_col: str | None,
                  test_split: float | None, labels: Sequence[str] | None, strategies: Sequence[str], batch: int,
                  cycles: int, init: int, seeds: int, config: str | Path | None, jobs: int,
                  log: Callable[[str], None] | None) -> SimulationResult:
    """:func:`simulate` with ``task = "multi_label"``: the tag-set data set
    (:func:`load_tag_dataset`), the multi-label strategies and model (:func:`run_tag_strategy`),
    curves of every multi-label metric and the summary on ``[evaluation] metric``
    (:func:`summarize_tags`). Arguments checked by :func:`simulate`."""
    from contextlib import ExitStack

    from threadpoolctl import threadpool_limits

    from alflow.tasks.progress import track

    model_settings, query = read_settings(config)
    if model_settings.features != "tfidf":
        raise SimulationError(f"--config: model.features = {model_settings.features!r}: a multi-label simulation "
                              "reads tfidf only")
    metric = tag_metric(config)
    names = resolve_tag_strategies(strategies, query)
    pairs = [(name, seed) for name in names for seed in range(seeds)]
    workers = min(jobs, len(pairs))
    if workers > 1:  # start the workers' imports while the data is read
        worker_context()
    data = load_tag_dataset(data_path, text_col, label_col, split_col, test_split, labels)
    if init >= len(data.pool_docs):
        raise SimulationError(f"--init {init}: the pool has only {len(data.pool_docs)} items")
    out.mkdir(parents=True, exist_ok=True)
    queries = {name: query.model_copy(update={"strategy": name}) for name in names}
    options = {"init": init, "batch": batch, "cycles": cycles, "checks": False, "estimates": False}
    with threadpool_limits(limits=1), ExitStack() as bars:
        advances = {name: bars.enter_context(track(f"simulate {name}", seeds * (cycles + 1))) for name in names}
        progress = PairProgress(pairs, cycles, advances, log, metric=metric)
        corpus(data, model_settings)  # shared by every run: computed once, before any
        runs, full = run_all(data, model_settings, queries, pairs, options, progress, workers,
                             lambda: full_pool_score(data, model_settings, metric))
    curves = pd.DataFrame([row for run in runs for row in run.rows], columns=TAG_CURVE_COLUMNS)
    summary = summarize_tags(curves, full, metric)
    curves.to_csv(out / "curves.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    plot_curves(curves, full, out / "curves.png", title=f"{Path(data_path).name}: batch {batch}, {seeds} seeds",
                metric=metric)
    return SimulationResult(curves, summary, full, out)


def summary_metric(summary: pd.DataFrame) -> str:
    """What the summary's AULC and labels_to_95 read: a multi-label summary's ``metric``, else accuracy."""
    return str(summary["metric"].iloc[0]) if "metric" in summary else "accuracy"


def summary_markdown(result: SimulationResult) -> str:
    """The summary as a Markdown table, with the full-pool accuracy (a multi-label run's
    metric) and ratios to random."""
    metric = summary_metric(result.summary)
    final = "final_score" if "final_score" in result.summary else "final_accuracy"
    lines = [f"Full-pool {metric}: {result.full_accuracy:.3f} (target {TARGET_SHARE:.0%}: "
             f"{TARGET_SHARE * result.full_accuracy:.3f})", "",
             f"| strategy | AULC mean | AULC sd | final {metric} | labels to 95% | ÷ random | ÷ best random |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result.summary.itertuples(index=False):
        lines.append(f"| {row.strategy} | {row.aulc_mean:.3f} | {row.aulc_std:.3f} | {getattr(row, final):.3f} | "
                     f"{row.labels_to_95:g} | {_figure(row.labels_vs_random, 2)} | "
                     f"{_figure(row.labels_vs_best_random, 2)} |")
    if result.llm is not None:
        lines += ["", llm_caption(result.llm), "", "| strategy | labels to pass the LLM |", "|---|---:|"]
        lines += [f"| {row.strategy} | {_labels(row.labels_to_llm)} |" for row in result.summary.itertuples(index=False)]
    if "flag_precision" in result.summary:
        lines += ["", label_check_caption(result.summary), "",
                  "| strategy | flipped | flags | precision | recall | random precision | random recall |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in result.summary.itertuples(index=False):
            lines.append(f"| {row.strategy} | {row.flipped:.1f} | {row.flags:.1f} | {row.flag_precision:.3f} | "
                         f"{row.flag_recall:.3f} | {row.random_precision:.3f} | {row.random_recall:.3f} |")
    if "control_estimate" in result.summary:
        lines += ["", estimate_caption(result.summary), "", "| " + " | ".join(ESTIMATE_HEADERS) + " |",
                  "|---|" + "---:|" * (len(ESTIMATE_HEADERS) - 1)]
        lines += ["| " + " | ".join(cells) + " |" for cells in estimate_rows(result.summary)]
    return "\n".join(lines)


def llm_caption(llm: LLMBaseline) -> str:
    """One line on the LLM baseline: its zero-shot figures and what asking cost."""
    usage = llm.usage
    unanswered = sum(int(usage.get(k) or 0) for k in ("failed", "outside", "malformed"))
    return (f"LLM zero-shot ({llm.model}) on the {llm.n} test items: accuracy {llm.accuracy:.3f}, macro F1 "
            f"{llm.macro_f1:.3f} ({unanswered} without a class; {int(usage.get('requests') or 0)} requests, "
            f"{float(usage.get('seconds') or 0.0):.1f} s); labels to pass it: the first labels count at which "
            "a strategy's mean accuracy is above it")


def _labels(value: float) -> str:
    return "never" if value is None or math.isnan(value) else f"{value:g}"


def _figure(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def estimate_rows(summary: pd.DataFrame) -> list[list[str]]:
    """The cells of :data:`ESTIMATE_HEADERS` per strategy (means over seeds)."""
    return [[row.strategy, _figure(row.true_accuracy), f"{row.control_n:.1f}",
             f"{_figure(row.control_estimate)} [{_figure(row.control_low)}, {_figure(row.control_high)}]",
             _figure(row.unblinded_estimate), _figure(row.label_error_rate)]
            for row in summary.itertuples(index=False)]


def estimate_caption(summary: pd.DataFrame) -> str:
    """One line on the estimates under --automation-bias (means over seeds)."""
    return (f"Automation bias {summary['automation_bias'].iloc[0]:g}: the final model's test accuracy vs its "
            "estimate on the blind control answers, and had they been shown with the pre-label "
            "(means over seeds; per seed in estimates.csv)")


def label_check_caption(summary: pd.DataFrame) -> str:
    """One line on the label check under --noise (means over seeds)."""
    return (f"Label check with {summary['noise'].iloc[0]:.0%} of the answers flipped: flags on each run's final "
            "labeled set vs re-reviewing as many labeled items at random (means over seeds)")


def simulate_flow_body(**kwargs) -> SimulationResult:
    """:func:`simulate`, then its table and plot as Prefect artifacts of the current run;
    its progress lines go to the run's log."""
    import base64

    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.logging import get_run_logger

    result = simulate(**kwargs, log=get_run_logger().info)
    table = result.summary.replace({math.inf: "inf"}).to_dict("records")
    create_table_artifact(key="simulation-summary", table=table,
                          description=f"Full-pool {summary_metric(result.summary)} {result.full_accuracy:.3f}"
                          + (f"; LLM zero-shot accuracy {result.llm.accuracy:.3f}" if result.llm else ""))
    png = base64.b64encode((result.out_dir / "curves.png").read_bytes()).decode()
    create_markdown_artifact(key="simulation-curves", description="Learning curves (mean ± 1 sd over seeds)",
                             markdown=summary_markdown(result) + f"\n\n![learning curves](data:image/png;base64,{png})")
    return result


@flow(name="simulate")
def simulate_flow(data: str, out: str, text_col: str = "text", label_col: str = "label",
                  split_col: str | None = None, test_split: float | None = None,
                  strategies: list[str] = ["random", "margin", "default"],  # noqa: B006 - Prefect parameter
                  batch: int = 20, cycles: int = 25, init: int = 20, seeds: int = 5,
                  config: str | None = None, noise: float = 0.0, automation_bias: float | None = None,
                  jobs: int | None = None, task: str = "single_label", labels: list[str] | None = None) -> dict:
    """Replay the loop per strategy with a simulated annotator; curves and summary as
    files in ``out`` and as artifacts of this run. ``jobs``: worker processes (default:
    every core); ``task``/``labels``: as :func:`simulate`."""
    result = simulate_flow_body(data_path=data, out_dir=out, text_col=text_col, label_col=label_col,
                                split_col=split_col, test_split=test_split, strategies=strategies,
                                batch=batch, cycles=cycles, init=init, seeds=seeds, config=config, noise=noise,
                                automation_bias=automation_bias, jobs=jobs, task=task, labels=labels)
    return {"full_accuracy": result.full_accuracy, "out": str(result.out_dir),
            "llm_accuracy": result.llm.accuracy if result.llm else None,
            "summary": result.summary.replace({math.inf: "inf"}).to_dict("records")}
