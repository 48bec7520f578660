"""The model: build, fit, predict aligned to the configured labels, evaluate, save, load.

Models are files written by skops, never pickle. Loading trusts exactly the types the
*configured* model needs (:func:`trusted_types`: what skops does not trust by itself in a
pipeline built from ``[model]`` and fitted on a tiny probe corpus; none for the default
TF-IDF + LogisticRegression) and refuses a file holding any other type, so a model file
cannot run code when it is opened.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.base import BaseEstimator, TransformerMixin
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
    """An unfitted pipeline from the model settings, by ``features``:

    * ``"tfidf"``: ``Pipeline(tfidf, [lsa,] clf)``; ``lsa`` (only with ``svd_components``)
      appends that many LSA dimensions to the TF-IDF row: ``[tfidf | normalize(TruncatedSVD(tfidf))]``,
      sparse (n, vocabulary + components);
    * ``"embeddings"``: ``Pipeline(embeddings, clf)``: (n, d) dense rows of the text's vector
      (:class:`EmbeddingFeatures`);
    * ``"tfidf+embeddings"``: ``Pipeline(features, clf)``, ``features`` a FeatureUnion of the
      two side by side, sparse (n, vocabulary + d).
    """
    classifier = import_object(settings.classifier)(**settings.classifier_params)
    if settings.features == "embeddings":
        return Pipeline([("embeddings", EmbeddingFeatures()), ("clf", classifier)])
    tfidf = TfidfVectorizer(**_vectorizer_params(settings.vectorizer_params))
    if settings.features == "tfidf+embeddings":
        from sklearn.pipeline import FeatureUnion

        union = FeatureUnion([("tfidf", tfidf), ("embeddings", EmbeddingFeatures())])
        return Pipeline([("features", union), ("clf", classifier)])
    steps = [("tfidf", tfidf)]
    if settings.svd_components:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.pipeline import FeatureUnion
        from sklearn.preprocessing import FunctionTransformer, Normalizer

        svd = Pipeline([("svd", TruncatedSVD(settings.svd_components, random_state=0)), ("norm", Normalizer())])
        steps.append(("lsa", FeatureUnion([("words", FunctionTransformer(accept_sparse=True)), ("svd", svd)])))
    return Pipeline(steps + [("clf", classifier)])


# -- embeddings as features --------------------------------------------------------------------
# Where a model's embedding step finds the vectors of the texts it is given: a source per
# embedding model, registered by the process that owns them (alflow.tasks.embeddings: the
# store's vectors, read in the flow's process; simulate: its data set's, in memory), and a
# source for this thread alone over it (the trust probe's). The model file holds no vector
# and no source: only which embedding model it reads and the dimension.
_SOURCES: dict[str, "VectorSource"] = {}
_ACTIVE: list[str] = []  # the embedding model a step fitted now reads: the last registered
_THREAD = threading.local()


class VectorSource(Protocol):
    """Vectors of texts under one embedding model: ``source(docs)`` -> (n, d) float32."""

    model: str

    def __call__(self, docs: Sequence[str]) -> np.ndarray: ...


def register_vectors(source: VectorSource) -> None:
    """Make ``source`` where every embedding step of its embedding model, in every thread of
    this process, finds its vectors; and the one a step fitted from now on reads."""
    _SOURCES[source.model] = source
    _ACTIVE[:] = [source.model]


@contextmanager
def thread_vectors(source: VectorSource):
    """For the block, in this thread only, every embedding step reads ``source``."""
    before = getattr(_THREAD, "source", None)
    _THREAD.source = source
    try:
        yield source
    finally:
        _THREAD.source = before


def vector_source(embedding_model: str | None = None) -> VectorSource:
    """The source of ``embedding_model`` (None: the one a step being fitted reads)."""
    local = getattr(_THREAD, "source", None)
    if local is not None and embedding_model in (None, local.model):
        return local
    name = embedding_model if embedding_model is not None else (_ACTIVE[0] if _ACTIVE else None)
    if name is None or name not in _SOURCES:
        wanted = f"embedding model {embedding_model!r}" if embedding_model else "an embedding model"
        raise ModelError(f"no vectors of {wanted} in this process: set [llm] base_url and embedding_model "
                         "(features with embeddings are scored where the store is, not on Dask workers)")
    return _SOURCES[name]


class EmbeddingFeatures(TransformerMixin, BaseEstimator):
    """Texts -> their embedding vectors, (n, d) float64 rows times ``weight``.

    ``fit`` records which embedding model the vectors come from (``embedding_model_``) and
    their dimension (``dim_``); ``transform`` reads them from that model's
    :class:`VectorSource` (:func:`register_vectors`) and refuses vectors of another
    dimension. The rows are L2-normalised as the endpoint's client returns them, so beside
    TF-IDF rows (norm 1) each block weighs alike at ``weight = 1``.
    """

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def fit(self, docs, y=None):
        source = vector_source()
        docs = list(docs)
        self.embedding_model_ = source.model
        self.dim_ = int(np.asarray(source(docs[:1])).shape[1]) if docs else 0
        return self

    def transform(self, docs):
        x = np.asarray(vector_source(self.embedding_model_)(list(docs)), dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim_:
            raise ModelError(f"embeddings of {self.embedding_model_!r} have {x.shape[-1]} dimensions, the model "
                             f"was trained on {self.dim_}")
        return x * self.weight if self.weight != 1.0 else x


class VectorTable:
    """A :class:`VectorSource` held in memory: ``docs`` (n,) and their ``vectors`` (n, d),
    looked up by text (simulate's data set, embedded once)."""

    def __init__(self, model: str, docs: Sequence[str], vectors: np.ndarray):
        self.model = model
        self.vectors = np.asarray(vectors, dtype=np.float32)
        self.index: dict[str, int] = {}
        for i, doc in enumerate(docs):
            self.index.setdefault(doc, i)

    def __call__(self, docs: Sequence[str]) -> np.ndarray:
        rows = [self.index.get(doc, -1) for doc in docs]
        missing = sum(1 for r in rows if r < 0)
        if missing:
            raise ModelError(f"{missing} of {len(rows)} texts have no embedding of {self.model!r}")
        return self.vectors[rows] if rows else np.empty((0, self.vectors.shape[1]), np.float32)


class _ProbeVectors:
    """Deterministic vectors for any text (the trust probe: fitting needs some)."""

    model = "probe"

    def __call__(self, docs: Sequence[str]) -> np.ndarray:
        return np.asarray([[len(d) % 7 + 1.0, d.count(" ") + 1.0, 1.0] for d in docs], dtype=np.float32)


def embedding_steps(model) -> list[EmbeddingFeatures]:
    """The embedding steps of a pipeline (at its top or in a FeatureUnion of it)."""
    found = []
    for _, step in getattr(model, "steps", []):
        if isinstance(step, EmbeddingFeatures):
            found.append(step)
        for _, inner in getattr(step, "transformer_list", []):
            if isinstance(inner, EmbeddingFeatures):
                found.append(inner)
    return found


def embeddings_needed(model) -> tuple[str, int] | None:
    """(embedding model, dimension) a fitted pipeline reads, or None for a TF-IDF model."""
    steps = [s for s in embedding_steps(model) if hasattr(s, "embedding_model_")]
    return (steps[0].embedding_model_, int(steps[0].dim_)) if steps else None


def similarity_features(model) -> Callable[[Sequence[str]], object]:
    """``texts -> rows`` whose cosine says how alike texts are (near-duplicates, badge):
    the model's TF-IDF step where it has one (the words), else its embedding rows."""
    steps = model.named_steps
    if "tfidf" in steps:
        return steps["tfidf"].transform
    if "features" in steps:
        tfidf = dict(steps["features"].transformer_list)["tfidf"]
        return tfidf.transform
    return steps["embeddings"].transform


def _tfidf_of(features: Pipeline):
    """The TF-IDF step of fitted-or-not feature steps, wherever it sits; None without one."""
    steps = features.named_steps
    if "tfidf" in steps:
        return steps["tfidf"]
    if "features" in steps:
        return dict(steps["features"].transformer_list).get("tfidf")
    return None


def _fit_embeddings(features: Pipeline, docs: Sequence[str]) -> None:
    for step in embedding_steps(features):
        step.fit(docs)


def _vstack(a, b):
    """Rows of ``a`` then ``b``: sparse if either is, else dense."""
    import scipy.sparse as sp

    if sp.issparse(a) or sp.issparse(b):
        return sp.vstack([a, b]).tocsr()
    return np.vstack([a, b])


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
    _fit_embeddings(features, docs)
    tfidf = _tfidf_of(features)
    if tfidf is None:
        return features
    tfidf.fit(docs)
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
        pool_docs: Sequence[str] | None = None, features: Pipeline | None = None,
        corpus: "Corpus | None" = None) -> Pipeline:
    """A fitted pipeline. ``docs``: n texts; ``labels``: n class names.

    With ``vectorizer_fit = "pool"`` the features are not fitted on ``docs`` alone:
    ``features`` (already fitted by :func:`fit_features`, reused as is) or else fitted on
    ``pool_docs`` + ``docs``; only the classifier learns from the labels. ``corpus``: the
    token counts of every doc, computed once (:class:`Corpus`; simulate), so fitting and
    transforming read them instead of tokenizing again (same features).
    """
    reason = trainable(labels)
    if reason:
        raise ModelError(reason)
    if features is None:
        features = (labeled_features(settings, docs, corpus) if settings.vectorizer_fit == "labeled"
                    else fit_features(settings, (list(pool_docs) if pool_docs is not None else []) + list(docs)))
    classifier = build_model(settings).steps[-1][1]
    classifier.fit(features.transform(list(docs)), list(labels))
    return Pipeline(list(features.steps) + [("clf", classifier)])


def labeled_features(settings: ModelSettings, docs: Sequence[str], corpus: "Corpus | None" = None) -> Pipeline:
    """The feature steps of ``vectorizer_fit = "labeled"`` fitted on ``docs``: TF-IDF of
    the labeled items (from ``corpus``' counts when it has them all, the same features)."""
    if settings.features == "tfidf" and corpus is not None and corpus.serves(settings, docs):
        return Pipeline([("tfidf", CorpusTfidf(corpus).fit(docs))])
    features = build_model(settings)[:-1]
    _fit_embeddings(features, list(docs))
    tfidf = _tfidf_of(features)
    if tfidf is not None:
        tfidf.fit(list(docs))
    return features


class Corpus:
    """Every doc of a fixed corpus (simulate's pool and test set) tokenized once: the
    n-gram counts of the configured TF-IDF over the whole corpus (sorted vocabulary, as
    scikit-learn's). A TF-IDF fitted on any subset of it is then a column selection and a
    re-weighting of these rows (:class:`CorpusTfidf`), the same features as
    ``TfidfVectorizer(**vectorizer_params).fit(subset)`` without tokenizing again."""

    # vectorizer_params under which the equivalence holds (no df cut-offs, no vocabulary cap)
    SAFE = {"ngram_range", "sublinear_tf", "lowercase", "token_pattern", "stop_words", "strip_accents",
            "norm", "use_idf", "smooth_idf", "binary", "analyzer"}

    def __init__(self, settings: ModelSettings, docs: Sequence[str]):
        from sklearn.feature_extraction.text import CountVectorizer

        params = _vectorizer_params(settings.vectorizer_params)
        self.params = params
        self.usable = set(params) <= self.SAFE and isinstance(params.get("analyzer", "word"), str)
        self.key = json.dumps(settings.vectorizer_params, sort_keys=True, default=str)
        self.index: dict[str, int] = {}
        if not self.usable:
            return
        count_params = {k: v for k, v in params.items()
                        if k not in {"sublinear_tf", "norm", "use_idf", "smooth_idf"}}
        self.vectorizer = CountVectorizer(**count_params)
        docs = list(docs)
        self.counts = self.vectorizer.fit_transform(docs).tocsr()
        self.counts.sort_indices()
        for i, doc in enumerate(docs):
            self.index.setdefault(doc, i)

    def serves(self, settings: ModelSettings, docs: Sequence[str]) -> bool:
        return (self.usable and settings.vectorizer_fit == "labeled"
                and json.dumps(settings.vectorizer_params, sort_keys=True, default=str) == self.key
                and all(d in self.index for d in docs))

    def rows(self, docs: Sequence[str]):
        """Count rows of ``docs`` (a doc outside the corpus is tokenized now)."""
        import scipy.sparse as sp

        docs = list(docs)
        known = [self.index.get(d, -1) for d in docs]
        if min(known, default=0) >= 0:
            return self.counts[known]
        return sp.vstack([self.counts[k] if k >= 0 else self.vectorizer.transform([d])
                          for d, k in zip(docs, known)]).tocsr()


class CorpusTfidf(TransformerMixin, BaseEstimator):
    """A TF-IDF step over a :class:`Corpus`: ``fit(docs)`` keeps the columns of the terms
    ``docs`` use and their IDF, ``transform(docs)`` re-weights their count rows; the same
    matrix ``TfidfVectorizer`` would give, in the same column order."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus

    def fit(self, docs, y=None):
        counts = self.corpus.rows(docs)
        df = np.bincount(counts.indices, minlength=counts.shape[1])
        self.columns_ = np.flatnonzero(df)
        n, df = counts.shape[0], df[self.columns_].astype(float)
        params = self.corpus.params
        if params.get("use_idf", True):
            smooth = int(params.get("smooth_idf", True))
            self.idf_ = np.log((n + smooth) / (df + smooth)) + 1.0
        else:
            self.idf_ = None
        return self

    def transform(self, docs):
        from sklearn.preprocessing import normalize

        x = self.corpus.rows(docs)[:, self.columns_].astype(np.float64)
        params = self.corpus.params
        if params.get("sublinear_tf", False):
            np.log(x.data, out=x.data)
            x.data += 1.0
        if self.idf_ is not None:
            x = x.multiply(self.idf_).tocsr()
        norm = params.get("norm", "l2")
        return normalize(x, norm=norm, copy=False) if norm else x

    def fit_transform(self, docs, y=None):
        return self.fit(docs).transform(docs)


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


# Self-training "auto": the share it uses when it is used, and how far its out-of-fold score
# must beat the plain model's, in standard errors of the paired difference, to be used. One
# SE, not two: the out-of-fold items are the ones the query picked, hard boundary items, so
# the evidence understates what pseudo-labels add to a class's interior; on AG News two SE
# kept it off through the first 120-220 labels and margin needed 620 labels instead of 570
# (README, Performance). Before every class has two labels there are no folds, hence no
# evidence: then it is used (AUTO_WITHOUT_EVIDENCE); on an imbalanced AG News, where a rare
# class has one label for the first cycles, that took the AULC from 0.832 to 0.838.
AUTO_SHARE = 1.0
AUTO_MARGIN_SE = 1.0
AUTO_WITHOUT_EVIDENCE = True
AUTO_FOLDS = 5
AUTO_BOOTSTRAP = 200
# Evidence is gathered again once the human labels have grown by this factor since the
# evidence the last decision rests on (else that decision stands): a retrain after a batch
# of 20 on top of 1,000 labels would decide on nearly the same folds again.
AUTO_REFRESH = 1.5
# The self-trained fit (warm-started, lbfgs) stops once no gradient component exceeds this,
# not at the configured 1e-4. With it (and the picking model by newton-cg) `alflow simulate`
# on AG News takes 1.1x the CPU time of the same command without self-training, not 2.0x,
# for the same labels to 95% (margin: 520); the exact optimum (newton-cg) needed 670 and
# 1e-3 needed 620 (3 seeds; benchmarks/results/self_training_auto/cost_variants.md). lbfgs
# at C = 10 stops before the weights of rare terms fit the last label, and that is worth
# accuracy.
SELF_TRAINED_TOL = 3e-4


def self_training_mode(settings: ModelSettings) -> tuple[str, float]:
    """("auto" | "on" | "off", the share of pseudo-labels per human label when used)."""
    value = settings.self_training
    if value == "auto":
        return "auto", AUTO_SHARE
    return ("on" if float(value) > 0 else "off"), float(value)


@dataclass
class SelfTrained:
    """What :func:`self_train` fitted: the model, its pseudo-labels, and the decision
    (``mode``, ``used``, ``share``, ``oof_with``/``oof_without``/``se``: the out-of-fold
    ``metric`` of the labels with and without pseudo-labels and the standard error of
    their paired difference (auto only), ``reason``)."""

    model: Pipeline
    pseudo_docs: list
    pseudo_labels: list
    decision: dict
    # the configured classifier's model of the human labels alone (== model when not used); None
    # when self-training was used: its pseudo-labels came from that model solved by the faster
    # solver of _extra_clf, so a caller that needs the plain model fits it (fit)
    plain: Pipeline | None = None


def _clf(settings: ModelSettings):
    return build_model(settings).steps[-1][1]


def _extra_clf(settings: ModelSettings):
    """The classifier of the models that are not the retrain's result: the evidence's fold
    models and, where self-training is used, the model of the human labels whose surest
    predictions become pseudo-labels. The configured one, except that a LogisticRegression
    on scikit-learn's default solver (lbfgs) is solved with newton-cg: the same
    L2-regularised objective, about 6x faster on wide sparse TF-IDF rows (AG News, 700
    labels, 27k terms: 0.05 s vs 0.29 s). Neither use needs the configured solver's exact
    stopping point (picked by newton-cg's model, AG News margin: AULC 0.810 and 520 labels,
    0.812 and 520 by lbfgs's; 3 seeds, benchmarks/results/self_training_auto/cost_variants.md)."""
    from sklearn.linear_model import LogisticRegression

    clf = _clf(settings)
    if type(clf) is LogisticRegression and clf.get_params().get("solver") == "lbfgs":
        clf.set_params(solver="newton-cg")
    return clf


def _terms(features: Pipeline) -> np.ndarray | None:
    step = features.steps[0][1]
    if isinstance(step, CorpusTfidf):
        return step.columns_
    vocabulary = getattr(step, "vocabulary_", None)
    if vocabulary is None or len(features.steps) > 1:
        return None
    terms = np.empty(len(vocabulary), dtype=object)
    for term, column in vocabulary.items():
        terms[column] = term
    return terms


def _final_clf(settings: ModelSettings, base, base_features: Pipeline, final_features: Pipeline,
               warm: Pipeline | None = None):
    """The classifier of the self-trained model: the configured one (not the faster solver
    of :func:`_extra_clf`: on AG News newton-cg's self-trained models scored 0.004 AULC
    below lbfgs's, on an imbalanced AG News they needed 220 labels instead of 180); a
    LogisticRegression starts from the coefficients of ``warm`` (the last retrain's
    self-trained model, same classes) or else of ``base`` (the model that picked the
    pseudo-labels), mapped term by term (a term the start never saw starts at 0), which saves a fifth to a half of its iterations,
    and stops at a gradient of :data:`SELF_TRAINED_TOL` where its ``tol`` is tighter, which
    on AG News nearly halves them again (a run's lbfgs iterations: 579 at 1e-4, 310)."""
    from sklearn.linear_model import LogisticRegression

    clf = _clf(settings)
    if (warm is not None and type(warm.steps[-1][1]) is LogisticRegression
            and list(warm.steps[-1][1].classes_) == list(base.classes_) and _terms(Pipeline(warm.steps[:-1])) is not None):
        base, base_features = warm.steps[-1][1], Pipeline(warm.steps[:-1])
    old, new = _terms(base_features), _terms(final_features)
    if type(clf) is not LogisticRegression or old is None or new is None:
        return clf
    index = {t: i for i, t in enumerate(new.tolist())}
    coef = np.zeros((base.coef_.shape[0], len(new)))
    cols = np.array([index.get(t, -1) for t in old.tolist()])
    keep = cols >= 0
    coef[:, cols[keep]] = base.coef_[:, keep]
    # started this close, the configured tol mostly polishes what no prediction reads
    clf.set_params(warm_start=True, tol=max(clf.tol, SELF_TRAINED_TOL))
    clf.coef_, clf.intercept_ = coef, base.intercept_.copy()
    return clf


def _paired_scores(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_classes: int, metric: str,
                   weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``metric`` of predictions ``a`` and ``b`` (int codes) against ``y``, once per row of
    ``weights`` (resample counts per item): two (B,) arrays."""
    def score(pred):
        hit = (pred == y).astype(float)
        if metric == "accuracy":
            return weights @ hit / weights.sum(axis=1)
        f1 = np.zeros((weights.shape[0], n_classes))
        present = np.zeros((weights.shape[0], n_classes), dtype=bool)
        for c in range(n_classes):
            tp = weights @ ((pred == c) & (y == c)).astype(float)
            fp = weights @ ((pred == c) & (y != c)).astype(float)
            fn = weights @ ((pred != c) & (y == c)).astype(float)
            denom = 2 * tp + fp + fn
            f1[:, c] = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
            present[:, c] = denom > 0  # scikit-learn's macro F1 averages the labels present
        return (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)

    return score(a), score(b)


def self_training_evidence(settings: ModelSettings, x, y: np.ndarray, pool_x, share: float, metric: str,
                           seed: int, folds: int = AUTO_FOLDS) -> dict:
    """Out-of-fold evidence for self-training on the labeled rows ``x`` (features already
    fitted: the final model's), labels ``y``: stratified folds; in each, a model of the
    fold's training labels predicts the held-out fold (``without``), and the same model's
    surest predictions among ``pool_x`` (:func:`confident_picks`) train a second one that
    predicts it too (``with``). Only human labels are scored.

    Returns {oof_with, oof_without, se, folds}: the two ``metric`` figures and the
    bootstrap standard error of their paired difference (items resampled, both arms on
    the same resample); or {reason} when the labels are too few for folds.
    """
    from sklearn.linear_model import LogisticRegression

    classes, codes = np.unique(np.asarray(y, dtype=object).astype(str), return_inverse=True)
    counts = np.bincount(codes)
    k = min(folds, int(counts.min()))
    if len(classes) < 2 or k < 2:
        return {"reason": f"too few labels for out-of-fold evidence (smallest class has {int(counts.min())})"}
    y = np.asarray(y, dtype=object)
    without = np.empty(len(y), dtype=np.int64)
    with_ = np.empty(len(y), dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), codes):
        base = _extra_clf(settings).fit(x[train], y[train])
        without[test] = [index[str(c)] for c in base.predict(x[test])]
        proba = base.predict_proba(pool_x)
        fold_classes = np.asarray(base.classes_, dtype=object)
        predicted = fold_classes[proba.argmax(axis=1)]
        picks = confident_picks(predicted, proba.max(axis=1), class_counts(y[train].tolist()), share)
        if picks.size == 0:
            with_[test] = without[test]
            continue
        st = _extra_clf(settings)
        if type(st) is LogisticRegression:  # started at the fold's plain model: the same optimum, sooner
            st.set_params(warm_start=True)
            st.coef_, st.intercept_ = base.coef_.copy(), base.intercept_.copy()
        st = st.fit(_vstack(x[train], pool_x[picks]), np.concatenate([y[train], predicted[picks]]))
        with_[test] = [index[str(c)] for c in st.predict(x[test])]
    weights = np.random.default_rng([seed, 26]).multinomial(len(y), np.full(len(y), 1.0 / len(y)),
                                                             size=AUTO_BOOTSTRAP).astype(float)
    full_with, full_without = _paired_scores(codes, with_, without, len(classes), metric, np.ones((1, len(y))))
    boot_with, boot_without = _paired_scores(codes, with_, without, len(classes), metric, weights)
    return {"oof_with": float(full_with[0]), "oof_without": float(full_without[0]),
            "se": float(np.std(boot_with - boot_without, ddof=1)), "folds": k}


def self_train(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
               pool_docs: Sequence[str] | None, features: Pipeline | None = None, *,
               metric: str = "macro_f1", seed: int = 0, corpus: "Corpus | None" = None,
               previous: Mapping | None = None, warm: Pipeline | None = None,
               weak: tuple[Sequence[str], Sequence[str]] | None = None) -> SelfTrained:
    """The model of a retrain, self-trained or not as ``settings.self_training`` says.

    The features are fitted once (``features`` as given with ``vectorizer_fit = "pool"``;
    else the TF-IDF of the human-labeled ``docs``) and every fit and the evidence read them.
    Without self-training the model is the configured classifier on the human labels, the
    one fit. With it, a model of the human labels (solved by :func:`_extra_clf`'s faster
    solver: it only picks) predicts ``pool_docs`` (unlabeled items, transformed once, and
    only when read) and its surest predictions (:func:`confident_picks`) train the final
    model beside the human labels: the configured classifier, its TF-IDF, with
    ``"labeled"``, refitted on both texts, started from ``warm`` (the last self-trained
    model, else the picking one) and stopped at :data:`SELF_TRAINED_TOL`. The
    pseudo-labels always come from a model of human labels only, so a mistake is not fed
    back cycle after cycle. ``corpus``: the token counts of every doc (:class:`Corpus`,
    simulate).

    ``"auto"``: self-trained only where :func:`self_training_evidence` (out-of-fold
    ``metric`` on the human labels with and without pseudo-labels) says it wins by more
    than :data:`AUTO_MARGIN_SE` standard errors of the difference; a number forces it
    (0: off; > 0: on with that share). ``previous``: the last retrain's decision (its
    ``decision`` dict); its evidence stands until the labels have grown :data:`AUTO_REFRESH`
    times past the count it was gathered on (``evidence_labels``).

    ``weak``: (docs, labels) of weak labels (the LLM's surest pre-labels of pool items,
    ``[llm] weak_label_confidence``): rows of the final model beside the pseudo-labels,
    self-trained or not; never read by the evidence nor by the model that picks the
    pseudo-labels, so only human labels judge and pick. ``pool_docs`` should leave them out.

    BLAS runs on one thread here: the fits are many small dense products on coefficient
    matrices, which threads do not speed up and, on a busy machine, slow down many times
    over (one retrain on 200 AG News labels: 0.26 s on one thread, 6.9 s on two busy cores
    with OpenBLAS's default).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _self_train(settings, docs, labels, pool_docs, features, metric=metric, seed=seed, corpus=corpus,
                           previous=previous, warm=warm, weak=weak)


def _self_train(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
                pool_docs: Sequence[str] | None, features: Pipeline | None = None, *,
                metric: str = "macro_f1", seed: int = 0, corpus: "Corpus | None" = None,
                previous: Mapping | None = None, warm: Pipeline | None = None,
                weak: tuple[Sequence[str], Sequence[str]] | None = None) -> SelfTrained:
    """The body of :func:`self_train`."""
    mode, share = self_training_mode(settings)
    reason = trainable(labels)
    if reason:
        raise ModelError(reason)
    docs, y = list(docs), np.asarray(list(labels), dtype=object)
    if features is None:
        features = (labeled_features(settings, docs, corpus) if settings.vectorizer_fit == "labeled"
                    else fit_features(settings, docs))
    x = features.transform(docs)
    weak_docs, weak_y = (list(weak[0]), np.asarray(list(weak[1]), dtype=object)) if weak else ([], None)
    decision = {"mode": mode, "used": False, "share": share}
    if weak_docs:
        decision["weak_labels"] = len(weak_docs)

    def plain(why: str | None = None) -> SelfTrained:
        """The configured classifier on the human labels (and the weak ones): the retrain's model."""
        decided = dict(decision, **({"reason": why} if why else {}))
        if not weak_docs:
            model = Pipeline(list(features.steps) + [("clf", _clf(settings).fit(x, y))])
            return SelfTrained(model, [], [], decided, model)
        final_features, train_x = _with_extra(settings, features, x, docs, weak_docs, corpus)
        model = Pipeline(list(final_features.steps)
                         + [("clf", _clf(settings).fit(train_x, np.concatenate([y, weak_y])))])
        return SelfTrained(model, [], [], decided, None)

    if mode == "off":
        return plain("self_training = 0")
    if pool_docs is None or not len(pool_docs):
        return plain("no unlabeled pool items")
    pool_docs = list(pool_docs)
    pool = {}

    def pool_x():  # transformed once, and only where something reads it
        if "x" not in pool:
            pool["x"] = features.transform(pool_docs)
        return pool["x"]

    if mode == "auto":
        reusable = (previous is not None and previous.get("mode") == "auto" and previous.get("metric") == metric
                    and "oof_with" in previous
                    and int(previous.get("evidence_labels") or 0) <= len(y)
                    < AUTO_REFRESH * int(previous.get("evidence_labels") or 0))
        if reusable:
            evidence = {k: previous[k] for k in ("oof_with", "oof_without", "se", "folds", "evidence_labels")}
        else:
            evidence = self_training_evidence(settings, x, y, pool_x(), share, metric, seed)
            evidence["evidence_labels"] = len(y)
        decision.update(evidence, metric=metric)
        if "reason" in evidence:  # no folds yet
            if not AUTO_WITHOUT_EVIDENCE:
                return plain()
            decision["reason"] = f"{evidence['reason']}: used until there is"
        else:
            gain = evidence["oof_with"] - evidence["oof_without"]
            margin = AUTO_MARGIN_SE * evidence["se"]
            figures = (f"out-of-fold {metric} {evidence['oof_with']:.3f} with, {evidence['oof_without']:.3f} "
                       f"without on {evidence['evidence_labels']} labels")
            if not gain > margin:
                return plain(f"{figures}: {gain:+.3f}, it hurts (noise ±{margin:.3f})" if gain < -margin
                             else f"{figures}: {gain:+.3f} is within its noise (±{margin:.3f})")
            decision["reason"] = f"{figures}: {gain:+.3f} beats its noise ({margin:.3f})"
    else:
        decision["reason"] = f"self_training = {share:g}"
    # the model of the human labels only picks the pseudo-labels: the faster solver will do
    picker = _extra_clf(settings).fit(x, y)
    proba = picker.predict_proba(pool_x())
    predicted = np.asarray(picker.classes_, dtype=object)[proba.argmax(axis=1)]
    picks = confident_picks(predicted, proba.max(axis=1), class_counts(y.tolist()), share)
    if picks.size == 0:
        return plain("no confident pool predictions")
    extra_docs = [pool_docs[i] for i in picks]
    if settings.vectorizer_fit == "labeled":
        # the final model's TF-IDF also reads the pseudo-labeled texts, their words too (with
        # the plain model's TF-IDF, AG News margin: AULC 0.806 and 620 labels, not 0.812 and 570)
        final_features = labeled_features(settings, docs + extra_docs + weak_docs, corpus)
        train_x = final_features.transform(docs + extra_docs + weak_docs)
    else:
        final_features, train_x = features, _vstack(x, pool_x()[picks])
        if weak_docs:
            train_x = _vstack(train_x, features.transform(weak_docs))
    final = _final_clf(settings, picker, features, final_features, warm)
    final.fit(train_x, np.concatenate([y, predicted[picks]] + ([weak_y] if weak_docs else [])))
    if getattr(final, "warm_start", False):
        final.set_params(warm_start=False)
    decision["used"] = True
    model = Pipeline(list(final_features.steps) + [("clf", final)])
    return SelfTrained(model, extra_docs, predicted[picks].tolist(), dict(decision), None)


def _with_extra(settings: ModelSettings, features: Pipeline, x, docs: list[str], extra: list[str],
                corpus: "Corpus | None"):
    """(features, rows) of ``docs`` then ``extra``: with ``vectorizer_fit = "labeled"`` the
    features refitted on both (the words of the extra texts count too), else ``features``
    as they are, with the extra rows under ``x``."""
    if settings.vectorizer_fit == "labeled":
        final = labeled_features(settings, docs + extra, corpus)
        return final, final.transform(docs + extra)
    return features, _vstack(x, features.transform(extra))


def self_training_note(decision: Mapping | None) -> str | None:
    """What a cycle says of its retrain's self-training (a model's ``metrics["self_training"]``):
    "+N self-training pseudo-labels", with "auto" why (the two out-of-fold figures), or
    "no self-training: why"; None when it was off by configuration (or never recorded)."""
    decision = decision or {}
    pseudo = decision.get("pseudo_labels")
    weak = f", +{decision['weak_labels']} LLM weak labels" if decision.get("weak_labels") else ""
    why = f": {decision['reason']}" if decision.get("mode") == "auto" and decision.get("reason") else ""
    if pseudo:
        return f"+{pseudo} self-training pseudo-labels{weak}{why}"
    if weak:
        return f"no self-training{weak}{why}"
    return f"no self-training{why}" if why else None


def fit_self_trained(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
                     pool_docs: Sequence[str] | None, features: Pipeline | None = None,
                     ) -> tuple[Pipeline, tuple[list[str], list[str]]]:
    """:func:`self_train`, returning (model, (pseudo_docs, pseudo_labels))."""
    trained = self_train(settings, docs, labels, pool_docs, features=features)
    return trained.model, (trained.pseudo_docs, trained.pseudo_labels)


def predict_proba(model, docs: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """(n_docs, len(classes)) probabilities in the order of ``classes``.

    A class the model never saw in training gets probability 0. A multi-label model gives
    its per-tag probabilities (rows need not sum to 1), tags in ``classes`` order.
    """
    from alflow.tasks.multilabel.model import is_tag_model, model_tags, tag_proba

    if is_tag_model(model):
        if model_tags(model) != list(classes):
            raise ModelError(f"the model's tags {model_tags(model)} are not labels {list(classes)}")
        return tag_proba(model, list(docs))
    raw = model.predict_proba(list(docs))
    aligned = np.zeros((raw.shape[0], len(classes)))
    index = {c: i for i, c in enumerate(classes)}
    for j, cls in enumerate(model.classes_):
        if cls not in index:
            raise ModelError(f"the model predicts class {cls!r}, which is not in labels {list(classes)}")
        aligned[:, index[cls]] = raw[:, j]
    return aligned


def score_chunk(model, docs: Sequence[str], classes: Sequence[str]) -> dict[str, np.ndarray]:
    """Pre-labels for a chunk: label (n,), proba (n, c) and the three uncertainty measures.
    A multi-label model gives its tag sets and per-tag probabilities
    (:func:`alflow.tasks.multilabel.model.score_tags`)."""
    from alflow.tasks.multilabel.model import is_tag_model, score_tags

    if is_tag_model(model):
        return score_tags(model, docs, classes)
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
                vocabulary: Sequence[str] | None = None, method: str = "predict",
                pool_docs: Sequence[str] | None = None) -> np.ndarray:
    """The configured model's out-of-fold ``method`` over the folds of ``splitter``: (n,)
    predictions, or with ``method="predict_proba"`` (n, c) probabilities whose columns are
    the sorted classes of ``labels``. Each fold's model is fitted without its test fold:
    with ``vectorizer_fit = "pool"`` its features too, on ``vocabulary`` (the unlabeled
    pool sample the real model's features read) plus the fold's training docs, so no fold
    is scored with features that have read its own test items. ``pool_docs``: unlabeled
    items for self-training; each fold's model is then :func:`fit_self_trained` on its own
    training labels, as the real model is."""
    docs, labels = np.asarray(list(docs), dtype=object), np.asarray(list(labels), dtype=object)
    classes = sorted(set(labels.tolist()))
    pool_fit = settings.vectorizer_fit == "pool"
    self_train = self_training_mode(settings)[0] != "off" and pool_docs is not None and len(pool_docs) > 0
    if not (pool_fit or self_train):
        return cross_val_predict(build_model(settings), docs.tolist(), labels.tolist(), cv=splitter, method=method)
    out = np.empty(len(docs), dtype=object) if method == "predict" else np.zeros((len(docs), len(classes)))
    for train, test in splitter.split(docs, labels):
        features = fit_features(settings, list(vocabulary or []) + docs[train].tolist(), seed) if pool_fit else None
        if self_train:
            model, _ = fit_self_trained(settings, docs[train].tolist(), labels[train].tolist(), pool_docs,
                                        features=features)
        else:
            model = fit(settings, docs[train].tolist(), labels[train].tolist(), features=features)
        out[test] = (model.predict(docs[test].tolist()) if method == "predict"
                     else predict_proba(model, docs[test].tolist(), classes))
    return out


def evaluate_cv(settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
                folds: int, seed: int, vocabulary: Sequence[str] | None = None,
                pool_docs: Sequence[str] | None = None) -> tuple[dict | None, np.ndarray | None, str | None]:
    """Stratified k-fold estimates on the labeled set; every fold refitted without its test
    items (:func:`out_of_fold`; ``vocabulary``: the pool sample pool-fitted features read).
    ``pool_docs``: the unlabeled sample self-training draws from; only human labels are
    scored.

    Returns (metrics, out_of_fold_predictions (n,), None), or (None, None, reason) when
    the labels are too few. The fold count drops to the smallest class's size.
    """
    counts = class_counts(labels)
    smallest = min(counts.values()) if counts else 0
    k = min(folds, smallest)
    if len(counts) < 2 or k < 2:
        return None, None, f"cross-validation needs 2 labels in each of 2 classes, have {counts}"
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    predicted = out_of_fold(settings, docs, labels, splitter, seed, vocabulary, pool_docs=pool_docs)
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


def trusted_types(settings: ModelSettings, classes: Sequence[str], task: str = "single_label") -> frozenset[str]:
    """The types a model file may hold beyond what skops trusts by itself (scikit-learn,
    NumPy, SciPy basics): exactly those of a pipeline built from ``settings`` and fitted on a
    probe corpus of ``classes``, and with ``task = "multi_label"`` scikit-learn's stand-in
    for a one-vs-rest tag no answer carries. Cached per (settings, classes, task).

    Empty for the default TF-IDF + LogisticRegression. If the probe cannot be fitted, the
    unfitted pipeline's types plus the classifier's own class.
    """
    import skops.io as sio

    key = json.dumps([settings.model_dump(mode="json"), list(classes), task], sort_keys=True, default=str)
    if key not in _TRUSTED:
        try:
            with thread_vectors(_ProbeVectors()):
                model = fit(settings, *_probe_corpus(classes))
            found = set(sio.get_untrusted_types(data=sio.dumps(model)))
        except Exception:  # noqa: BLE001 - a classifier the probe cannot fit
            model = build_model(settings)
            clf = type(model.named_steps["clf"])
            found = set(sio.get_untrusted_types(data=sio.dumps(model))) | {f"{clf.__module__}.{clf.__qualname__}"}
        if task == "multi_label":
            # a one-vs-rest tag no answer carries (or every one does) is this constant
            # predictor until the tag gets both kinds of answer
            found.add("sklearn.multiclass._ConstantPredictor")
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
