"""Query: choose the next batch for review and record it in ``batches`` / ``batch_items``.

:func:`select` and :func:`cold_start_select` are the selection itself, over plain arrays;
a real cycle (:func:`query_batch`) and ``alflow simulate`` both call them, so a simulation
replays exactly what a run would ask.

With an LLM (``[llm]``, :mod:`alflow.tasks.llm`), the cycle asks it about candidates before
the query and hands its answers (``opinions``) in: a cold start picks, in each coverage
cluster, the candidate the LLM is least sure of and pre-labels the batch with its answers;
a model's query ranks first the items where the LLM names another class (the second
opinion). Without an LLM, or when it could not be used, nothing changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import pandas as pd
from prefect import task
from prefect.cache_policies import NONE
from sklearn.feature_extraction.text import TfidfVectorizer

from alflow.config import ModelSettings, QuerySettings, Settings
from alflow.tasks import strategies
from alflow.tasks.control import compose_batch
from alflow.tasks.faults import fault_point
from alflow.tasks.retrying import is_transient
from alflow.tasks.review import plan_review
from alflow.tasks.store import Store
from alflow.tasks.store.batches import PoolChangedError

if TYPE_CHECKING:
    from alflow.tasks.llm import Opinions

# How often the query picks again when another cycle took some of its picks meanwhile.
QUERY_ATTEMPTS = 3
# Members of the bagged committee of the ``committee`` strategy.
COMMITTEE_SIZE = 5
# A multi-label committee bags at least this many answers (fewer: the strategy's fallback).
MIN_COMMITTEE_LABELS = 2
# The query reads k * CANDIDATE_FACTOR of the most uncertain pool items out of DuckDB (and
# as many sampled at random for exploration), never the whole pool: room for the
# near-duplicate filter to drop a few doublings' worth before a batch falls short.
CANDIDATE_FACTOR = 8
# What ``picked_by`` says for a strategy's own (non-random) picks.
PICKED_BY = {"badge": "diversity", "class_balanced": "class_balance", "committee": "committee",
             "cluster_margin": "diversity"}
# What ``picked_by`` says for a pick ranked first because the LLM names another class than the model.
DISAGREEMENT = "disagreement"


def batch_rng(seed: int, store: Store) -> np.random.Generator:
    """A generator seeded by (seed, batches so far): each cycle differs, a replay repeats."""
    n_batches = int(store.scalar("SELECT count(*) FROM batches"))
    return np.random.default_rng([seed, n_batches])


def batch_k(settings: Settings, budget_left: int | None) -> int:
    """How many items the next batch asks: query.batch_size, fewer when the budget is short."""
    return settings.query.batch_size if budget_left is None else min(settings.query.batch_size, budget_left)


def strategy_label(settings: Settings, model_version: int | None, llm: bool = False) -> str:
    """The batch's ``strategy``: 'cold-start:coverage', 'margin+exploration(0.1)'; with the
    LLM's answers used (``llm``), 'cold-start:coverage+llm', 'margin+second_opinion+...'."""
    q = settings.query
    if model_version is None:
        return f"cold-start:{q.cold_start}" + ("+llm" if llm else "")
    name = f"{q.strategy}+second_opinion" if llm and q.strategy != "random" else q.strategy
    if q.strategy == "random" or q.exploration == 0:
        return name
    return f"{name}+exploration({q.exploration:g})"


# -- the selection, shared by a real cycle and `alflow simulate` ------------------------------
def cold_start_select(docs: Sequence[str], k: int, rng: np.random.Generator,
                      cold_start: str) -> tuple[np.ndarray, np.ndarray, str]:
    """No model yet: (indices into ``docs``, scores, picked_by) for a coverage batch (one
    item per TF-IDF cluster) or a random one."""
    if cold_start == "coverage":
        features = TfidfVectorizer(sublinear_tf=True, min_df=1).fit_transform(list(docs))
        idx, scores = strategies.coverage(features, k, rng)
        return idx, scores, "coverage"
    idx, scores = strategies.random_sampling(np.zeros((len(docs), 2)), k, rng)
    return idx, scores, "random"


def _committee(model_settings: ModelSettings, docs: Sequence[str], labels: Sequence[str],
               classes: Sequence[str], rng: np.random.Generator, features=None) -> list:
    """COMMITTEE_SIZE models fitted on bootstrap samples of the labels, drawn per class so
    every member sees every class that has labels. ``features``: the current model's
    fitted feature steps, shared by the members when they are pool-fitted."""
    from alflow.tasks import modeling

    labels = np.asarray(labels, dtype=object)
    by_class = [np.flatnonzero(labels == c) for c in classes if (labels == c).any()]
    docs = list(docs)
    members = []
    for _ in range(COMMITTEE_SIZE):
        rows = np.concatenate([rng.choice(idx, size=idx.size, replace=True) for idx in by_class])
        members.append(modeling.fit(model_settings, [docs[i] for i in rows], labels[rows].tolist(),
                                    features=features))
    return members


def tag_committee(model_settings: ModelSettings, features, labeled_docs: Sequence[str], labeled_y: np.ndarray,
                  docs_of: Callable[[np.ndarray], list[str]], rng: np.random.Generator):
    """The ``committee`` of a multi-label :class:`~alflow.tasks.multilabel.strategies.TagPool`:
    ``rows -> (COMMITTEE_SIZE, len(rows), n_tags)`` per-tag probabilities of the pool rows
    ``docs_of(rows)``, from :func:`~alflow.tasks.multilabel.model.fit_committee` of the
    answers ``labeled_docs`` (L,) / ``labeled_y`` (L, n_tags) over the current model's
    fitted ``features``, drawn with ``rng`` and fitted at the first call (only a committee
    strategy that reaches its candidates pays for it). None with fewer than
    :data:`MIN_COMMITTEE_LABELS` answers: nothing to bag, the strategy falls back to mean_margin."""
    from alflow.tasks.multilabel.model import fit_committee

    if len(labeled_docs) < MIN_COMMITTEE_LABELS:
        return None
    fitted = []

    def committee(rows):
        if not fitted:
            fitted.append(fit_committee(model_settings, labeled_docs, labeled_y, features, COMMITTEE_SIZE, rng))
        return fitted[0].predict_proba(docs_of(np.asarray(rows)))

    return committee


def build_pool(q: QuerySettings, proba: np.ndarray, model, docs_of: Callable[[np.ndarray], list[str]],
               labeled_docs: Sequence[str], labeled_labels: Sequence[str], classes: Sequence[str],
               model_settings: ModelSettings, rng: np.random.Generator) -> strategies.Pool:
    """The :class:`~alflow.tasks.strategies.Pool` the configured strategy needs.

    ``proba`` (n, c): the current model's probabilities for the n pool items, columns in
    ``classes`` order; ``model``: that fitted pipeline (its TF-IDF step gives the features,
    its LSA step, if any, the embedding cluster_margin clusters on);
    ``docs_of(rows)``: the texts of those pool rows (only candidates are ever read);
    ``labeled_docs`` / ``labeled_labels``: the labels so far. Features and committee are
    computed lazily, for the rows a strategy asks about.
    """
    from alflow.tasks import modeling

    needs_features = q.near_duplicate is not None or q.strategy in ("badge", "cluster_margin")
    # TF-IDF rows: near-duplicates are about the words (not the LSA topic dimensions); a
    # model without TF-IDF (features = "embeddings") gives its embedding rows.
    vectorize = modeling.similarity_features(model) if needs_features else None
    features = (lambda rows: vectorize(docs_of(np.asarray(rows)))) if needs_features else None
    embedding = None
    if q.strategy == "cluster_margin" and "lsa" in model.named_steps:
        lsa = model.named_steps["lsa"].named_transformers["svd"]
        embedding = lambda rows: lsa.transform(vectorize(docs_of(np.asarray(rows))))  # noqa: E731
    labeled_features = None
    if q.near_duplicate is not None and len(labeled_docs):
        labeled_features = vectorize(list(labeled_docs))
    counts = np.asarray([sum(1 for label in labeled_labels if label == c) for c in classes], dtype=float)
    committee = None
    if q.strategy == "committee":
        members: list = []

        def committee(rows):
            if not members:
                members.extend(_committee(model_settings, labeled_docs, labeled_labels, classes, rng,
                                          model[:-1]))
            docs = docs_of(np.asarray(rows))
            return np.stack([modeling.predict_proba(m, docs, classes) for m in members])

    return strategies.Pool(proba, features=features, labeled_features=labeled_features,
                           labeled_counts=counts, committee=committee, embedding=embedding)


def select(q: QuerySettings, pool: strategies.Pool, k: int,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The configured strategy's batch: (indices into the pool, scores, picked_by).

    With ``pool.second_opinion`` (the LLM's answers), the items where it names another
    class than the model come first (:func:`~alflow.tasks.strategies.with_second_opinion`),
    picked_by 'disagreement'."""
    second = pool.second_opinion is not None and q.strategy != "random"
    strategy = strategies.get_strategy(q.strategy, q.exploration, q.near_duplicate, q.candidates,
                                       second_opinion=second)
    idx, scores = strategy(pool, k, rng)
    if q.strategy == "random":
        picked_by = ["random"] * len(idx)
    else:
        own = PICKED_BY.get(q.strategy, "uncertainty")
        picked_by = ["exploration" if np.isnan(s) else own for s in scores]
    if second and len(idx):
        differ = strategies.disagreement(pool.proba[idx], pool.second_opinion[idx]) == 1.0
        picked_by = [DISAGREEMENT if d and p != "exploration" else p for d, p in zip(differ, picked_by)]
    return idx, scores, picked_by


# -- a real cycle: the same selection over the store ------------------------------------------
def cold_start_candidates(store: Store, settings: Settings, k: int, rng: np.random.Generator,
                          holdout: float | None, m: int) -> pd.DataFrame:
    """No model yet, an LLM to ask: about ``m`` candidates for a batch of ``k``, as
    (item_id, doc, group), in the order to ask them (every group's first, then every
    group's second, ...). With query.cold_start = "coverage" a seeded sample of the pool
    (query.coverage_sample) is clustered into k groups and each gives its max(1, m // k)
    members nearest its centre (:func:`~alflow.tasks.strategies.coverage_groups`); with
    "random", max(m, k) items of the sample, all in group 0. :func:`llm_cold_start_picks`
    then takes from each group the candidate the LLM is least sure of."""
    sample = store.sample_pool(settings.query.coverage_sample, int(rng.integers(2**31 - 1)), holdout)
    if sample.empty or k <= 0:
        return pd.DataFrame({"item_id": [], "doc": [], "group": []})
    if settings.query.cold_start == "coverage":
        features = TfidfVectorizer(sublinear_tf=True, min_df=1).fit_transform(sample["doc"].tolist())
        rows, groups = strategies.coverage_groups(features, k, max(1, m // k), rng)
        order = np.lexsort((np.arange(rows.size), groups, _turns(groups)))
        rows, groups = rows[order], groups[order]
    else:
        rows = rng.choice(len(sample), size=min(len(sample), max(m, k)), replace=False)
        groups = np.zeros(rows.size, dtype=np.int64)
    return pd.DataFrame({"item_id": sample["item_id"].to_numpy()[rows], "doc": sample["doc"].to_numpy()[rows],
                         "group": groups})


def _turns(groups: np.ndarray) -> np.ndarray:
    """Each row's place within its group (0 = first), a group's rows being consecutive."""
    turns = np.zeros(groups.size, dtype=np.int64)
    for i in range(1, groups.size):
        turns[i] = turns[i - 1] + 1 if groups[i] == groups[i - 1] else 0
    return turns


def llm_cold_start_picks(store: Store, settings: Settings, k: int, holdout: float | None,
                         opinions: "Opinions") -> pd.DataFrame:
    """No model yet, the LLM's answers about the cold-start candidates in hand: from each
    group (:func:`cold_start_candidates`), the candidate still in the pool that the LLM is
    least sure of (1 - margin of its probabilities; where it gave no confidence, the one
    nearest the group's centre), pre-labeled with its answer (prelabel_by 'llm').

    Coverage and uncertainty together: each cluster of the pool gives one item, so the
    first batch still spans the pool's topics, and within a cluster the item the LLM finds
    hardest is where a person's answer adds most (its sure answers are cheap to confirm
    and teach the first model little). Clustering first keeps k near-copies of one
    confusing kind of text out of the batch."""
    ids = np.asarray(opinions.item_ids, dtype=object)
    keep = np.isin(ids, store.pool_members(ids.tolist(), holdout))
    uncertainty = opinions.uncertainty()
    rows = np.flatnonzero(keep)[strategies.least_confident_per_group(opinions.groups[keep], uncertainty[keep], k)]
    labels = opinions.labels[rows]
    return pd.DataFrame({
        "item_id": ids[rows],
        "score": uncertainty[rows],
        "prelabel": labels,
        "confidence": opinions.confidence[rows],
        "picked_by": settings.query.cold_start,
        "prelabel_by": ["llm" if isinstance(label, str) else None for label in labels],
    })


def cold_start_picks(store: Store, settings: Settings, k: int, rng: np.random.Generator,
                     holdout: float | None) -> pd.DataFrame:
    """No model yet: :func:`cold_start_select` over a seeded sample of the pool."""
    sample = store.sample_pool(settings.query.coverage_sample, int(rng.integers(2**31 - 1)), holdout)
    if sample.empty:
        return pd.DataFrame()
    idx, scores, picked_by = cold_start_select(sample["doc"].tolist(), k, rng, settings.query.cold_start)
    return pd.DataFrame({
        "item_id": sample["item_id"].to_numpy()[idx],
        "score": scores,
        "prelabel": None,
        "confidence": np.nan,
        "picked_by": picked_by,
    })


def _load_model(store: Store, settings: Settings, model_version: int):
    from alflow.tasks import modeling
    from alflow.tasks.train import model_file

    row = store.model_row(model_version)
    return modeling.load_model(model_file(settings, row),
                               modeling.trusted_types(settings.model, settings.labels, settings.task))


def candidate_plan(q: QuerySettings, k: int) -> tuple[str | None, bool, int]:
    """Where the configured strategy looks, read from the store instead of the whole pool:
    (stored measure to rank by or None for none, ranked per predicted label?, how many).

    Uncertainty strategies need the top k; badge, committee and cluster_margin the
    ``k * candidates`` smallest margins; class_balanced the smallest margins of each predicted label; random
    only a uniform sample. The factors leave room for the near-duplicate filter's doublings.
    """
    if q.strategy == "random":
        return None, False, k * CANDIDATE_FACTOR
    if q.strategy in ("badge", "committee", "cluster_margin"):
        return "margin", False, k * max(CANDIDATE_FACTOR, 2 * q.candidates)
    if q.strategy == "class_balanced":
        return "margin", True, k * CANDIDATE_FACTOR
    return q.strategy, False, k * CANDIDATE_FACTOR


def read_candidates(store: Store, model_version: int, n_classes: int, q: QuerySettings, m: int,
                    seed: int, holdout: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """The rows a strategy may pick from, out of DuckDB: the ``m`` most uncertain pool items
    (:func:`candidate_plan`) first, then a seeded uniform sample of ``m`` more for
    exploration. Returns (item_ids, proba (n, c), labels, explore rows, whole pool read?)."""
    by, per_label, _ = candidate_plan(q, 1)
    sample = store.sample_predictions(model_version, n_classes, m, seed, holdout)
    if by is None:
        top = (sample[0][:0], sample[1][:0], sample[2][:0])
    else:
        top = store.top_predictions(model_version, n_classes, by, m, holdout, per_label=per_label)
    extra = ~np.isin(sample[0], top[0])
    item_ids, proba, labels = (np.concatenate([t, s[extra]]) for t, s in zip(top, sample))
    explore = np.flatnonzero(np.isin(item_ids, sample[0]))
    whole = len(sample[0]) < m  # the sample took every scored pool item
    return item_ids, proba, labels, explore, whole


def second_opinion_candidates(store: Store, settings: Settings, model_version: int, k: int,
                              holdout: float | None) -> list[str]:
    """The model's most uncertain pool items, most uncertain first: the candidates the
    query ranks (:func:`candidate_plan`, without its exploration sample), where a second
    opinion can change the batch; none for the random strategy, which ranks nothing."""
    by, per_label, n = candidate_plan(settings.query, k)
    if by is None:
        return []
    item_ids, _, _ = store.top_predictions(model_version, len(settings.labels), by, n, holdout, per_label=per_label)
    return item_ids.tolist()


def model_picks(store: Store, settings: Settings, model_version: int, k: int,
                rng: np.random.Generator, holdout: float | None, opinions: "Opinions | None" = None) -> pd.DataFrame:
    """:func:`select` over candidates read from the stored predictions (never the whole
    pool); candidates' texts come from DuckDB. A batch left short (the near-duplicate filter
    spent the candidates) reads twice as many and picks again, with the same draws.
    ``opinions``: the LLM's answers about some candidates, the pool's second opinion."""
    from alflow.tasks.store import document

    q = settings.query
    model = None
    labeled = pd.DataFrame({"doc": [], "label": []})
    if q.near_duplicate is not None or q.strategy in ("badge", "committee", "class_balanced", "cluster_margin"):
        labeled, _ = store.training_set(holdout)
        if q.near_duplicate is not None or q.strategy in ("badge", "committee", "cluster_margin"):
            model = _load_model(store, settings, model_version)
    seed = int(rng.integers(2**31 - 1))
    start = rng.bit_generator.state
    m = candidate_plan(q, k)[2]
    while True:
        item_ids, proba, labels, explore, whole = read_candidates(
            store, model_version, len(settings.labels), q, m, seed, holdout)
        if len(item_ids) == 0:
            return pd.DataFrame()

        def docs_of(rows: np.ndarray, item_ids=item_ids) -> list[str]:
            frame = store.items(item_ids[rows].tolist())
            return [document(t, x) for t, x in zip(frame["title"], frame["text"])]

        rng.bit_generator.state = start
        pool = build_pool(q, proba, model, docs_of, labeled["doc"].tolist(), labeled["label"].tolist(),
                          settings.labels, settings.model, rng)
        pool.explore = None if whole else explore
        if opinions is not None:
            pool.second_opinion = opinions.proba_for(item_ids)
        idx, scores, picked_by = select(q, pool, k, rng)
        if len(idx) >= k or whole:
            break
        m *= 2
    return pd.DataFrame({
        "item_id": item_ids[idx],
        "score": scores,
        "prelabel": labels[idx],
        "confidence": proba[idx].max(axis=1),
        "picked_by": picked_by,
    })


def tag_model_picks(store: Store, settings: Settings, model_version: int, k: int, rng: np.random.Generator,
                    holdout: float | None, opinions: "Opinions | None" = None) -> pd.DataFrame:
    """:func:`model_picks` with task = "multi_label": the configured multi-label strategy
    (:mod:`alflow.tasks.multilabel.strategies`, composed with exploration and the
    near-duplicate filter as a single-label one) over the model's stored per-tag
    probabilities of the pool, read whole (a multi-label strategy ranks by measures
    computed from all tags and the model's thresholds, not one stored column). Each pick's
    ``prelabel`` is its predicted set's text form, ``confidence`` that set's probability.
    ``committee``: its members (:func:`tag_committee`) are bagged from the answers' tag sets
    over the model's features, drawn from a stream spawned off ``rng`` (the batch's
    generator, seeded by the config's seed); their picks say picked_by 'committee'.
    ``opinions``: the LLM's tag sets, the second opinion
    (:func:`alflow.tasks.llm.tag_second_opinion`; picked_by 'disagreement')."""
    from alflow.tasks.multilabel import strategies as tag_strategies
    from alflow.tasks.multilabel.model import apply_thresholds, model_thresholds, set_confidence, tag_proba
    from alflow.tasks.multilabel.tags import parse_tags, tag_matrix
    from alflow.tasks.store import document
    from alflow.tasks.train import tag_answers

    q = settings.query
    tags = list(settings.labels)
    item_ids, proba, labels = store.pool_predictions(model_version, len(tags), holdout)
    if len(item_ids) == 0:
        return pd.DataFrame()
    model = _load_model(store, settings, model_version)
    thresholds = model_thresholds(model)
    pool = tag_strategies.TagPool(proba, thresholds=thresholds)

    def docs_of(rows):
        frame = store.items(item_ids[np.asarray(rows)].tolist())
        return [document(t, x) for t, x in zip(frame["title"], frame["text"])]

    if q.strategy in ("cardinality_inconsistency", "mmc", "committee") or q.near_duplicate is not None:
        labeled, _ = store.training_set(holdout)
        labeled = labeled[labeled["label"].isin(tag_answers(settings, labeled["label"].unique()))]
        if len(labeled):
            pool.labeled_tags = tag_matrix([parse_tags(a) for a in labeled["label"]], tags)
            pool.labeled_proba = tag_proba(model, labeled["doc"].tolist())
        if q.strategy == "committee" and len(labeled):
            # its own stream of the batch's generator: the exploration draws stay as without it
            pool.committee = tag_committee(settings.model, model[:-1], labeled["doc"].tolist(), pool.labeled_tags,
                                           docs_of, rng.spawn(1)[0])
        if q.near_duplicate is not None:
            from alflow.tasks import modeling

            vectorize = modeling.similarity_features(model)
            pool.features = lambda rows: vectorize(docs_of(rows))
            pool.labeled_features = vectorize(labeled["doc"].tolist()) if len(labeled) else None
    second = opinions is not None and q.strategy != "random"
    if second:
        from alflow.tasks.llm import tag_second_opinion, tag_set_distance

        pool.second_opinion = opinions.proba_for(item_ids)
        strategy = tag_second_opinion(q, thresholds)
    else:
        strategy = tag_strategies.get_strategy(q.strategy, q.exploration, q.near_duplicate, q.candidates)
    idx, scores = strategy(pool, k, rng)
    if q.strategy == "random":
        picked_by = ["random"] * len(idx)
    else:
        own = PICKED_BY["committee"] if pool.committee is not None else "uncertainty"
        picked_by = ["exploration" if np.isnan(score) else own for score in scores]
    if second and len(idx):
        differ = tag_set_distance(thresholds)(proba[idx], pool.second_opinion[idx]) > 0
        picked_by = [DISAGREEMENT if d and p != "exploration" else p for d, p in zip(differ, picked_by)]
    return pd.DataFrame({
        "item_id": item_ids[idx],
        "score": scores,
        "prelabel": labels[idx],
        "confidence": set_confidence(proba[idx], apply_thresholds(proba[idx], thresholds)),
        "picked_by": picked_by,
    })


def query_batch(store: Store, settings: Settings, model_version: int | None,
                flow_run_id: str | None, budget_left: int | None = None,
                opinions: "Opinions | None" = None) -> str | None:
    """Pick and record a batch; returns its batch_id, or None if nothing is left to ask.

    Idempotent per flow run: a retried or re-run step returns the run's existing batch.
    If another cycle recorded a batch with some of the same items meanwhile, the batch is
    refused by the store and picked again from the pool as it now is (``QUERY_ATTEMPTS``
    times at most): an item is never in two open batches. ``opinions``: the LLM's answers
    about this cycle's candidates (:func:`alflow.tasks.llm.llm_opinions`), or None.
    """
    k = batch_k(settings, budget_left)
    holdout = settings.holdout_fraction
    for attempt in range(1, QUERY_ATTEMPTS + 1):
        if flow_run_id:
            existing = store.batch_for_run(flow_run_id)
            if existing:
                return existing["batch_id"]
        if k <= 0:
            return None
        rng = batch_rng(settings.seed, store)
        if model_version is None and opinions is not None:
            picks = llm_cold_start_picks(store, settings, k, holdout, opinions)
        elif model_version is None:
            picks = cold_start_picks(store, settings, k, rng, holdout)
        elif settings.task == "multi_label":
            picks = tag_model_picks(store, settings, model_version, k, rng, holdout, opinions)
        else:
            picks = model_picks(store, settings, model_version, k, rng, holdout, opinions)
        # flagged labels to recheck first, the random control slice last (alflow.tasks.control)
        picks = compose_batch(store, settings, model_version, picks, k)
        # items whose answers tie or disagree go first; review.overlap on a share (alflow.tasks.review)
        picks = plan_review(store, settings, picks, rng)
        if picks.empty:
            return None
        picks = picks.assign(rank=np.arange(1, len(picks) + 1))
        try:
            batch_id = store.create_batch(flow_run_id, strategy_label(settings, model_version, opinions is not None),
                                          model_version, picks)
        except PoolChangedError:
            if attempt == QUERY_ATTEMPTS:
                raise
            continue
        fault_point("query-after-batch")
        return batch_id
    return None  # not reached: the last attempt returns or raises


@task(name="query", retries=1, retry_delay_seconds=10, cache_policy=NONE,
      retry_condition_fn=is_transient)
def query_task(settings: Settings, model_version: int | None, flow_run_id: str | None,
               budget_left: int | None = None, opinions: "Opinions | None" = None) -> str | None:
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    with store.held():  # a score of short reads: open the file once, not per read
        return query_batch(store, settings, model_version, flow_run_id, budget_left, opinions)
