"""The model: build, fit, predict aligned to the configured labels, evaluate, save, load.

Models are files written by skops, never pickle. Loading trusts exactly the types the
*configured* model needs (:func:`trusted_types`: what skops does not trust by itself in a
pipeline built from ``[model]`` and fitted on a tiny probe corpus; none for the default
TF-IDF + LogisticRegression) and refuses a file holding any other type, so a model file
cannot run code when it is opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline

from alflow.config import ModelSettings, import_object
from alflow.tasks import strategies


class ModelError(RuntimeError):
    """A model cannot be trained or loaded; the message says why."""


class ModelFileError(ModelError):
    """A model file is missing or cannot be read (deleted, truncated, not a skops file)."""


class UntrustedModelError(ModelError):
    """A model file holds types the configured model does not need; it is not opened."""


def _vectorizer_params(params: dict) -> dict:
    params = dict(params)
    if "ngram_range" in params:  # TOML has no tuples
        params["ngram_range"] = tuple(params["ngram_range"])
    return params


def build_model(settings: ModelSettings) -> Pipeline:
    """An unfitted ``Pipeline(tfidf, [lsa,] classifier)`` from the model settings.

    ``lsa`` (only with ``svd_components``) appends that many LSA dimensions to the TF-IDF
    row: ``[tfidf | normalize(TruncatedSVD(tfidf))]``, sparse (n, vocabulary + components).
    """
    classifier = import_object(settings.classifier)(**settings.classifier_params)
    steps = [("tfidf", TfidfVectorizer(**_vectorizer_params(settings.vectorizer_params)))]
    if settings.svd_components:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.pipeline import FeatureUnion
        from sklearn.preprocessing import FunctionTransformer, Normalizer

        svd = Pipeline([("svd", TruncatedSVD(settings.svd_components, random_state=0)), ("norm", Normalizer())])
        steps.append(("lsa", FeatureUnion([("words", FunctionTransformer(accept_sparse=True)), ("svd", svd)])))
    return Pipeline(steps + [("clf", classifier)])


def fit_features(settings: ModelSettings, docs: Sequence[str], seed: int = 0) -> Pipeline:
    """The model's feature steps (``build_model(settings)[:-1]``) fitted on ``docs``, without
    labels: TF-IDF (and LSA) of the corpus. Beyond ``vectorizer_sample`` docs, a sample
    drawn with ``seed``. Returns a fitted Pipeline: docs -> (n, d) sparse rows."""
    docs = list(docs)
    if len(docs) > settings.vectorizer_sample:
        rows = np.sort(np.random.default_rng(seed).choice(len(docs), settings.vectorizer_sample, replace=False))
        docs = [docs[i] for i in rows]
    if not docs:
        raise ModelError("no documents to fit the vectorizer on")
    features = build_model(settings)[:-1]
    tfidf = features.named_steps["tfidf"].fit(docs)
    if "lsa" in features.named_steps:
        x = tfidf.transform(docs)
        # TruncatedSVD needs fewer components than documents and terms (tiny pools, tests).
        n = max(1, min(settings.svd_components, x.shape[0] - 1, x.shape[1] - 1))
        lsa = features.named_steps["lsa"]
        lsa.set_params(svd__svd__n_components=n)
        lsa.fit(x)
    return features


def class_counts(labels: Sequence[str]) -> dict[str, int]:
    values, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}


def trainable(labels: Sequence[str]) -> str | None:
    """None if a classifier can be fitted on ``labels``, else the reason it cannot."""
    counts = class_counts(labels)
    if len(counts) < 2:
        return f"need labels of at least 2 classes, have {counts or 'none'}"
    return None


def fit(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
        pool_docs: Sequence[str] | None = None, features: Pipeline | None = None) -> Pipeline:
    """A fitted pipeline. ``docs``: n texts; ``labels``: n class names.

    With ``vectorizer_fit = "pool"`` the features are not fitted on ``docs`` alone:
    ``features`` (already fitted by :func:`fit_features`, reused as is) or else fitted on
    ``pool_docs`` + ``docs``; only the classifier learns from the labels.
    """
    reason = trainable(labels)
    if reason:
        raise ModelError(reason)
    if settings.vectorizer_fit == "labeled":
        model = build_model(settings)
        model.fit(list(docs), list(labels))
        return model
    if features is None:
        features = fit_features(settings, (list(pool_docs) if pool_docs is not None else []) + list(docs))
    classifier = build_model(settings).steps[-1][1]
    classifier.fit(features.transform(list(docs)), list(labels))
    return Pipeline(list(features.steps) + [("clf", classifier)])


def confident_picks(predicted: Sequence[str], confidence: np.ndarray, label_counts: Mapping[str, int],
                    share: float) -> np.ndarray:
    """Self-training's pseudo-labels: which unlabeled pool rows to train on as predicted.

    ``predicted`` (n,): the current model's class per pool row; ``confidence`` (n,): its
    probability of that class; ``label_counts``: human labels per class. For each class c,
    the ``share * label_counts[c]`` (halves rounded up) rows predicted as c with the
    highest confidence (ties: the lower row). Returns row indices (m,), grouped by class in ``label_counts``
    order, most confident first.

    Why: uncertainty sampling labels the boundary between classes and never the items
    deep inside a class, so the model's picture of each class is skewed towards its
    edge. The items the model is surest of fill that in for free. Per class, mirroring the
    human labels, so pseudo-labels never drown a rare class in the common one's.
    """
    if share < 0:
        raise ValueError(f"self_training share must be >= 0, got {share}")
    predicted = np.asarray(predicted, dtype=object)
    confidence = np.asarray(confidence, dtype=float)
    if predicted.shape != confidence.shape:
        raise ValueError(f"predicted {predicted.shape} and confidence {confidence.shape} differ in shape")
    picks = []
    for label, count in label_counts.items():
        quota = int(np.floor(share * count + 0.5))  # halves round up, never to even
        if quota <= 0:
            continue
        members = np.flatnonzero(predicted == label)
        order = np.lexsort((members, -confidence[members]))
        picks.append(members[order[:quota]])
    return np.concatenate(picks).astype(np.int64) if picks else np.empty(0, dtype=np.int64)


def fit_self_trained(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
                     pool_docs: Sequence[str] | None, features: Pipeline | None = None,
                     ) -> tuple[Pipeline, tuple[list[str], list[str]]]:
    """:func:`fit` on the human labels, then, with ``settings.self_training`` > 0, again on
    them plus the pseudo-labels that first model is surest of among ``pool_docs``
    (unlabeled items, e.g. a seeded pool sample; :func:`confident_picks`).

    Returns (model, (pseudo_docs, pseudo_labels)). The pseudo-labels always come from a
    model of human labels only, never from one that itself learned from pseudo-labels,
    so a mistake is not fed back cycle after cycle.
    """
    base = fit(settings, docs, labels, features=features)
    if not settings.self_training or pool_docs is None or not len(pool_docs):
        return base, ([], [])
    pool_docs = list(pool_docs)
    classes = sorted(set(labels))
    proba = predict_proba(base, pool_docs, classes)
    predicted = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    picks = confident_picks(predicted, proba.max(axis=1), class_counts(labels), settings.self_training)
    if picks.size == 0:
        return base, ([], [])
    extra_docs, extra_labels = [pool_docs[i] for i in picks], predicted[picks].tolist()
    model = fit(settings, list(docs) + extra_docs, list(labels) + extra_labels, features=features)
    return model, (extra_docs, extra_labels)


def predict_proba(model, docs: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """(n_docs, len(classes)) probabilities in the order of ``classes``.

    A class the model never saw in training gets probability 0.
    """
    raw = model.predict_proba(list(docs))
    aligned = np.zeros((raw.shape[0], len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for j, cls in enumerate(model.classes_):
        if cls not in index:
            raise ModelError(f"the model predicts class {cls!r}, which is not in labels {list(classes)}")
        aligned[:, index[cls]] = raw[:, j]
    return aligned


def score_chunk(model, docs: Sequence[str], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Pre-labels for a chunk: label (n,), proba (n, c) and the three uncertainty measures."""
    proba = predict_proba(model, docs, classes)
    return {
        "label": np.asarray(classes, dtype=object)[proba.argmax(axis=1)],
        "proba": proba,
        "least_confidence": strategies.least_confidence(proba),
        "margin": strategies.margin(proba),
        "entropy": strategies.entropy(proba),
    }


def metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


def out_of_fold(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str], splitter, seed: int,
                features: Pipeline | None = None, method: str = "predict",
                pool_docs: Sequence[str] | None = None) -> np.ndarray:
    """The configured model's out-of-fold ``method`` over the folds of ``splitter``: (n,)
    predictions, or with ``method="predict_proba"`` (n, c) probabilities whose columns are
    the sorted classes of ``labels``. With ``vectorizer_fit = "pool"``, ``features`` (else
    features fitted on ``docs``, without labels) stay fixed and only the classifier is
    refitted per fold. ``pool_docs``: unlabeled items for self-training; each fold's model
    is then :func:`fit_self_trained` on its own training labels, as the real model is."""
    if settings.vectorizer_fit == "pool":
        features = features if features is not None else fit_features(settings, docs, seed)
    if settings.self_training and pool_docs is not None and len(pool_docs):
        docs, labels = np.asarray(list(docs), dtype=object), np.asarray(list(labels), dtype=object)
        classes = sorted(set(labels.tolist()))
        out = np.empty(len(docs), dtype=object) if method == "predict" else np.zeros((len(docs), len(classes)))
        for train, test in splitter.split(docs, labels):
            model, _ = fit_self_trained(settings, docs[train].tolist(), labels[train].tolist(), pool_docs,
                                        features=features)
            out[test] = (model.predict(docs[test].tolist()) if method == "predict"
                         else predict_proba(model, docs[test].tolist(), classes))
        return out
    if settings.vectorizer_fit == "pool":
        return cross_val_predict(build_model(settings).steps[-1][1], features.transform(list(docs)),
                                 list(labels), cv=splitter, method=method)
    return cross_val_predict(build_model(settings), list(docs), list(labels), cv=splitter, method=method)


def evaluate_cv(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
                folds: int, seed: int, features: Pipeline | None = None,
                pool_docs: Sequence[str] | None = None) -> tuple[dict | None, np.ndarray | None, str | None]:
    """Stratified k-fold estimates on the labeled set. With ``vectorizer_fit = "pool"``,
    ``features`` (the model's pool-fitted features, unsupervised, so no label leaks) are
    kept and only the classifier is refitted per fold. ``pool_docs``: the unlabeled sample
    self-training draws from (:func:`out_of_fold`); only human labels are scored.

    Returns (metrics, out_of_fold_predictions (n,), None), or (None, None, reason) when
    the labels are too few. The fold count drops to the smallest class's size.
    """
    counts = class_counts(labels)
    smallest = min(counts.values()) if counts else 0
    k = min(folds, smallest)
    if len(counts) < 2 or k < 2:
        return None, None, f"cross-validation needs 2 labels in each of 2 classes, have {counts}"
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    predicted = out_of_fold(settings, docs, labels, splitter, seed, features, pool_docs=pool_docs)
    result = metrics(labels, predicted)
    result.update({"method": "cv", "folds": k, "n_eval": len(labels)})
    return result, predicted, None


def evaluate_holdout(model, docs: Sequence[str], labels: Sequence[str]) -> dict:
    """Metrics of a fitted model on held-out gold items."""
    if len(docs) == 0:
        raise ModelError("the holdout set is empty: no source has gold labels (set label_column)")
    result = metrics(labels, model.predict(list(docs)))
    result.update({"method": "holdout", "n_eval": len(labels)})
    return result


# -- persistence ------------------------------------------------------------------------------
def save_model(model, path: str | Path) -> Path:
    import skops.io as sio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    sio.dump(model, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written model file
    return path


def _probe_corpus(classes: Sequence[str], per_class: int = 10) -> tuple[list[str], list[str]]:
    """A tiny synthetic corpus: ``per_class`` short texts per class, separable by one word."""
    docs, labels = [], []
    for k, cls in enumerate(classes):
        for i in range(per_class):
            docs.append(f"probe{k} word{i % 3} shared{(i + k) % 4} common text {'extra ' * (i % 2)}")
            labels.append(cls)
    return docs, labels


_TRUSTED: dict[str, frozenset[str]] = {}


def trusted_types(settings: ModelSettings, classes: Sequence[str]) -> frozenset[str]:
    """The types a model file may hold beyond what skops trusts by itself (scikit-learn,
    NumPy, SciPy basics): exactly those of a pipeline built from ``settings`` and fitted on a
    probe corpus of ``classes``. Cached per (settings, classes).

    Empty for the default TF-IDF + LogisticRegression. If the probe cannot be fitted, the
    unfitted pipeline's types plus the classifier's own class.
    """
    import skops.io as sio

    key = json.dumps([settings.model_dump(mode="json"), list(classes)], sort_keys=True, default=str)
    if key not in _TRUSTED:
        try:
            model = fit(settings, *_probe_corpus(classes))
            found = set(sio.get_untrusted_types(data=sio.dumps(model)))
        except Exception:  # noqa: BLE001 - a classifier the probe cannot fit
            model = build_model(settings)
            clf = type(model.named_steps["clf"])
            found = set(sio.get_untrusted_types(data=sio.dumps(model))) | {f"{clf.__module__}.{clf.__qualname__}"}
        _TRUSTED[key] = frozenset(found)
    return _TRUSTED[key]


def load_model(path: str | Path, trusted: Iterable[str]):
    """Load a fitted classifier from a skops file, trusting only the types in ``trusted``
    (see :func:`trusted_types`) beyond those skops trusts by itself.

    Raises :class:`ModelFileError` if the file is missing or unreadable and
    :class:`UntrustedModelError` (naming the file and the types) if it holds other types.
    """
    import skops.io as sio

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} is missing")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001 - truncated, not a zip, not a skops file
        raise ModelFileError(f"model file {path} cannot be read ({type(exc).__name__}: {exc})") from None
    refused = sorted(set(untrusted) - set(trusted))
    if refused:
        raise UntrustedModelError(
            f"model file {path} refused: it holds types the configured model does not need: {', '.join(refused)}"
        )
    try:
        model = sio.load(path, trusted=list(untrusted))
    except Exception as exc:  # noqa: BLE001
        raise ModelFileError(f"model file {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not (hasattr(model, "predict_proba") and hasattr(model, "classes_")):
        raise ModelFileError(f"model file {path} does not hold a fitted classifier ({type(model).__name__})")
    return model


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str


def should_promote(new: float | None, current: float | None, metric: str, n_compared: int) -> Promotion:
    """Promote unless the new model scores lower than the current one on the same items.

    ``new`` and ``current`` are the two models' ``metric`` on one evaluation set of
    ``n_compared`` items; ``current`` is None when there is no current model.
    """
    if current is None:
        return Promotion(True, "first model")
    if new is None:
        return Promotion(False, f"no {metric} for the new model")
    if n_compared == 0:
        return Promotion(True, "no new labels to compare on; same data, newer model")
    if new >= current:
        return Promotion(True, f"{metric} {new:.3f} >= current {current:.3f} on {n_compared} items")
    return Promotion(False, f"{metric} {new:.3f} < current {current:.3f} on {n_compared} items")
