"""The LLM in the cycle: zero-shot pre-labels for the cold start, a second opinion for the query.

    candidates --cache (llm_predictions)--> ask the rest (alflow.connectors.llm)
               --> answers + usage, one transaction --> Opinions --> the query

With ``[llm] base_url`` set, a cycle asks the LLM about its candidates before the query:

* **no model yet** (the cold start): the coverage candidates, each cluster of the pool
  giving a few (:func:`~alflow.tasks.query.cold_start_candidates`, at most
  ``max_items_per_cycle``); the query picks per cluster the one the LLM is least sure of
  and the batch is pre-labeled with its answers (``prelabel_by`` 'llm');
* **a model** (``[llm] second_opinion``): the model's most uncertain candidates (at most
  ``max_items_per_cycle``); the query ranks first those the LLM labels differently
  (:func:`~alflow.tasks.strategies.with_second_opinion`).

With ``task = "multi_label"`` the LLM answers tag sets (their text form, no confidence:
:class:`~alflow.connectors.llm.LLMClient`): a cold start's pre-labels are its sets, and the
second opinion ranks first the items where its set differs from the model's predicted one
(:func:`tag_second_opinion`, the Jaccard distance).

Answers are cached per (item, lineage) (:mod:`alflow.tasks.store.llm`): an item asked once
under a model name and prompt is never asked again; a failed request stores nothing and
is asked next time. Failure is never fatal: an endpoint down, refusing the key or naming
no such model leaves the cycle to go on without it (a plain cold start, or the trained
model's picks), and its log says so in one line. What each run asked is counted
(``llm_usage``) and shown in the cycle's summary and `alflow status`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from alflow.config import Settings
from alflow.connectors.llm import LLMClient, LLMError, LLMUsage
from alflow.tasks import strategies
from alflow.tasks.report import llm_usage_text
from alflow.tasks.store import Store, document

# The steps that ask the LLM (llm_usage.step).
COLD_START = "cold_start"
SECOND_OPINION = "second_opinion"


@dataclass
class Opinions:
    """The LLM's answers about a cycle's candidates, in the order they were asked.

    ``item_ids`` (n,) object; ``labels`` (n,) object, the class it named or None (no
    answer, or one outside the classes or unreadable); ``confidence`` (n,) float, p(label)
    from its log-probabilities, NaN where none was given; ``proba`` (n, c) float over
    ``Settings.labels``: its probabilities where given, else p(label) = confidence and
    the rest spread evenly, else one-hot on its label (``confident`` False), NaN rows
    where it named no class (a multi-label project's: (n, n_tags) 0/1, the LLM's tag set,
    NaN rows where it gave none; ``confident`` all False: a set has no confidence);
    ``groups`` (n,) int: the cold-start cluster of each candidate
    (None for a second opinion); ``step``: :data:`COLD_START` or :data:`SECOND_OPINION`.
    """

    item_ids: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    proba: np.ndarray
    confident: np.ndarray
    step: str
    groups: np.ndarray | None = None

    def uncertainty(self) -> np.ndarray:
        """(n,) 1 - margin of the LLM's probabilities, higher = less sure; NaN where it
        gave no confidence."""
        out = np.full(len(self.item_ids), np.nan)
        if self.confident.any():
            out[self.confident] = strategies.MEASURES["margin"](self.proba[self.confident])
        return out

    def proba_for(self, item_ids) -> np.ndarray:
        """(len(item_ids), c): the rows of :attr:`proba` for those items, NaN rows for
        items it was not asked about."""
        position = {item_id: i for i, item_id in enumerate(self.item_ids)}
        out = np.full((len(item_ids), self.proba.shape[1]), np.nan)
        for row, item_id in enumerate(item_ids):
            at = position.get(item_id)
            if at is not None:
                out[row] = self.proba[at]
        return out


def opinion_rows(answers: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The answers (:data:`~alflow.tasks.store.llm.ANSWER_COLUMNS`) as (proba (n, c),
    confident (n,)), see :class:`Opinions`."""
    c = len(classes)
    proba = np.full((len(answers), c), np.nan)
    confident = np.zeros(len(answers), dtype=bool)
    index = {label: j for j, label in enumerate(classes)}
    for row, answer in enumerate(answers.itertuples(index=False)):
        if answer.status != "ok" or answer.label not in index:
            continue
        if answer.proba is not None and len(answer.proba) == c:
            proba[row] = np.asarray(answer.proba, dtype=float)
            confident[row] = True
        elif answer.confidence is not None and not pd.isna(answer.confidence):
            proba[row] = (1.0 - answer.confidence) / (c - 1)
            proba[row, index[answer.label]] = answer.confidence
            confident[row] = True
        else:
            proba[row] = 0.0
            proba[row, index[answer.label]] = 1.0
    return proba, confident


def tag_opinion_rows(answers: pd.DataFrame, tags: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`opinion_rows` of a multi-label project's answers: (proba (n, n_tags), the
    0/1 rows of the LLM's tag sets, NaN rows where it gave none; confident (n,) False)."""
    from alflow.tasks.multilabel.tags import parse_tags, tag_matrix

    proba = np.full((len(answers), len(tags)), np.nan)
    for row, answer in enumerate(answers.itertuples(index=False)):
        if answer.status == "ok" and isinstance(answer.label, str):
            proba[row] = tag_matrix([parse_tags(answer.label)], tags)[0]
    return proba, np.zeros(len(answers), dtype=bool)


def tag_set_distance(thresholds: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``distance(proba (n, t), other (n, t)) -> (n,)``: the Jaccard distance between the
    model's predicted tag set (``proba`` at or above its per-tag ``thresholds`` (t,)) and
    ``other``'s 0/1 set, in [0, 1]; 0 where both are empty, NaN where ``other``'s row is
    NaN (no opinion)."""
    thresholds = np.asarray(thresholds, dtype=float)

    def distance(proba: np.ndarray, other: np.ndarray) -> np.ndarray:
        other = np.asarray(other, dtype=float)
        missing = np.isnan(other).any(axis=1)
        mine, theirs = np.asarray(proba) >= thresholds, np.nan_to_num(other) >= 0.5
        union = (mine | theirs).sum(axis=1)
        far = 1.0 - np.divide((mine & theirs).sum(axis=1), union, out=np.ones(len(union)), where=union > 0)
        far[missing] = np.nan
        return far

    return distance


def tag_second_opinion(q, thresholds: np.ndarray) -> strategies.Strategy:
    """The multi-label query ``q`` (QuerySettings) with the LLM's second opinion: the
    configured strategy (:mod:`alflow.tasks.multilabel.strategies`), after the items where
    the LLM's tag set differs from the model's predicted one (:func:`tag_set_distance` >
    0), the farthest first, then the one the model is least sure of (mean margin); composed with
    exploration and near-duplicates in the order a single-label strategy is
    (:func:`alflow.tasks.strategies.get_strategy`). ``pool.second_opinion``: (n, n_tags)
    from :meth:`Opinions.proba_for`."""
    from alflow.tasks.multilabel import strategies as tag_strategies

    def unsure(proba):
        return tag_strategies.mean_margin_uncertainty(proba, thresholds)

    base = strategies.with_second_opinion(tag_strategies.get_strategy(q.strategy, candidates=q.candidates),
                                          distance=tag_set_distance(thresholds), uncertainty=unsure)
    if q.exploration > 0:
        base = strategies.with_exploration(base, q.exploration)
    if q.near_duplicate is not None:
        base = strategies.without_near_duplicates(base, q.near_duplicate)
    return base


def tag_second_opinion_candidates(store: Store, settings: Settings, model_version: int, k: int,
                                  holdout: float | None) -> list[str]:
    """A multi-label project's :func:`~alflow.tasks.query.second_opinion_candidates`: the
    k x CANDIDATE_FACTOR pool items the model is least sure of by mean margin (its
    stored per-tag probabilities and thresholds), most uncertain first; none for the random
    strategy."""
    from alflow.tasks.multilabel.strategies import mean_margin_uncertainty
    from alflow.tasks.query import CANDIDATE_FACTOR

    if settings.query.strategy == "random":
        return []
    item_ids, proba, _ = store.pool_predictions(model_version, len(settings.labels), holdout)
    if not len(item_ids):
        return []
    thresholds = store.model_row(model_version)["thresholds"]
    top = strategies.top_k(mean_margin_uncertainty(proba, thresholds), k * CANDIDATE_FACTOR)
    return item_ids[top].tolist()


def llm_client(settings: Settings) -> LLMClient | None:
    """The client of ``[llm]``, or None when it is off (no base_url, or no chat model)."""
    if settings.llm.base_url is None or not settings.llm.model:
        return None
    return LLMClient.from_settings(settings)


def ask(store: Store, client: LLMClient, classes: list[str], candidates: pd.DataFrame, flow_run_id: str | None,
        step: str, limit: int, logger=None) -> Opinions | None:
    """The LLM's answers for ``candidates`` (item_id, and doc where known; in priority
    order): the cached ones read, the first ``limit`` of the rest asked and stored with
    this run's usage row in one transaction (a candidate beyond them has no answer).

    Returns None when not one candidate has a usable answer (the endpoint unusable and
    nothing cached, every request failed, ...; the usage row still records the asking,
    with the error). The log gets one line either way (counts, tokens, seconds; or why
    the LLM could not be used)."""
    logger = logger or get_run_logger()
    item_ids = candidates["item_id"].tolist()
    version = store.llm_version(client.lineage, classes)
    cached = store.llm_answers(version, item_ids)
    known = set(cached["item_id"])
    todo = candidates[~candidates["item_id"].isin(known)].head(max(0, int(limit)))
    fresh = pd.DataFrame(columns=cached.columns)
    error = None
    usage = LLMUsage()
    if len(todo):
        texts = todo["doc"].tolist() if "doc" in todo else _docs(store, todo["item_id"].tolist())
        started = time.monotonic()
        try:
            answers, usage = client.classify(texts, classes)
        except LLMError as exc:
            error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            usage = getattr(exc, "usage", None) or LLMUsage(failed=len(todo))
            usage.seconds = time.monotonic() - started
            answers = []
        fresh = pd.DataFrame({
            "item_id": todo["item_id"].tolist()[:len(answers)],
            "label": [a.label for a in answers],
            "confidence": [np.nan if a.confidence is None else float(a.confidence) for a in answers],
            "proba": [None if a.proba is None else np.asarray(a.proba, dtype=float).tolist() for a in answers],
            "status": [a.status for a in answers],
        })
        fresh = fresh[fresh["status"] != "failed"]  # not cached: asked again next time
        store.record_llm_answers(version, fresh, usage.as_dict(), flow_run_id, step, error=error)
    (logger.warning if error else logger.info)(usage_line(client, step, len(item_ids), len(known), len(todo),
                                                          usage, error))
    had = [frame for frame in (cached, fresh) if len(frame)]
    answers = pd.concat(had, ignore_index=True) if had else pd.DataFrame(columns=cached.columns)
    opinions = build_opinions(answers, candidates, classes, step, client.task)
    if not any(isinstance(label, str) for label in opinions.labels):
        return None  # not one usable answer: the cycle goes on as without an LLM
    return opinions


def build_opinions(answers: pd.DataFrame, candidates: pd.DataFrame, classes: list[str], step: str,
                   task: str = "single_label") -> Opinions:
    """:class:`Opinions` over every candidate, in the candidates' order, from the answers
    had (an item without one gets none); ``task = "multi_label"``: tag-set answers."""
    frame = candidates[["item_id"]].merge(answers, on="item_id", how="left")
    frame["status"] = frame["status"].fillna("failed")
    frame["proba"] = [p if isinstance(p, list) else None for p in frame["proba"]]
    frame["label"] = [label if isinstance(label, str) and status == "ok" else None
                      for label, status in zip(frame["label"], frame["status"])]
    proba, confident = (tag_opinion_rows if task == "multi_label" else opinion_rows)(frame, classes)
    groups = candidates["group"].to_numpy(dtype=np.int64) if "group" in candidates else None
    return Opinions(item_ids=frame["item_id"].to_numpy(dtype=object), labels=frame["label"].to_numpy(dtype=object),
                    confidence=pd.to_numeric(frame["confidence"], errors="coerce").to_numpy(dtype=float),
                    proba=proba, confident=confident, step=step, groups=groups)


def _docs(store: Store, item_ids: list[str]) -> list[str]:
    """The texts the model sees of ``item_ids``, in their order."""
    frame = store.items(item_ids)
    by_id = {row.item_id: document(row.title, row.text) for row in frame.itertuples(index=False)}
    return [by_id[item_id] for item_id in item_ids]


STEP_WORDS = {COLD_START: "cold-start pre-labels", SECOND_OPINION: "second opinion"}


def usage_line(client: LLMClient, step: str, candidates: int, cached: int, asked: int, usage: LLMUsage,
               error: str | None) -> str:
    """The log's one line on an asking: 'LLM llama3.1 at http://...: cold-start pre-labels
    for 200 candidates: 150 cached, 50 asked: 48 answered, 2 failed (asked again next cycle: HTTP 429 ...)'."""
    who = f"LLM {client.settings.model} at {client.base_url}"
    if error is not None and cached:
        return (f"{who} could not be used ({error}); this cycle goes on with the {cached} answers it gave "
                f"before for these {candidates} candidates")
    if error is not None:
        fallback = "a plain cold start" if step == COLD_START else "the trained model's picks alone"
        return f"{who} could not be used ({error}); this cycle goes on without it: {fallback}"
    head = f"{who}: {STEP_WORDS.get(step, step)} for {candidates} candidates: {cached} cached, {asked} asked"
    if not asked:
        return head
    answered = asked - usage.failed - usage.outside - usage.malformed
    parts = [f"{answered} answered"]
    if usage.failed:
        reason = Counter(usage.reasons).most_common(1)[0][0] if usage.reasons else "no answer"
        parts.append(f"{usage.failed} failed (asked again next cycle; {reason})")
    if usage.outside:
        parts.append(f"{usage.outside} outside the {'tags' if client.task == 'multi_label' else 'classes'}")
    if usage.malformed:
        parts.append(f"{usage.malformed} malformed")
    return f"{head}: {', '.join(parts)}; {llm_usage_text(usage.as_dict())}"


def llm_wanted(settings: Settings, model_version: int | None) -> bool:
    """Whether this cycle asks the LLM anything: ``[llm]`` base_url and model set, and no
    model yet (the cold start) or ``second_opinion`` on."""
    llm = settings.llm
    return bool(llm.base_url and llm.model) and (model_version is None or llm.second_opinion)


def llm_opinions(store: Store, settings: Settings, model_version: int | None, flow_run_id: str | None,
                 k: int, logger=None) -> Opinions | None:
    """The LLM's answers about this cycle's candidates (see the module docstring), or None
    when there is nothing to ask it: no ``[llm]``, a model without ``second_opinion`` or
    with the random strategy, the endpoint unusable. ``k``: the batch's size."""
    from alflow.tasks.query import batch_rng, cold_start_candidates, second_opinion_candidates

    logger = logger or get_run_logger()
    if k <= 0 or not llm_wanted(settings, model_version):
        return None
    try:
        client = llm_client(settings)
    except LLMError as exc:  # the key cannot be read, ...: the cycle goes on without
        logger.warning(f"LLM at {settings.llm.base_url} could not be used ({exc}); this cycle goes on without it")
        return None
    if client is None:
        return None
    m = settings.llm.max_items_per_cycle
    holdout = settings.holdout_fraction
    with client:
        if model_version is None:
            # seeded like the query's own draws for this batch: a replay asks about the same items
            candidates = cold_start_candidates(store, settings, k, batch_rng(settings.seed, store), holdout, m)
            step = COLD_START
        else:
            ids = (tag_second_opinion_candidates if settings.task == "multi_label" else second_opinion_candidates)(
                store, settings, model_version, k, holdout)
            candidates = pd.DataFrame({"item_id": ids})
            step = SECOND_OPINION
        if candidates.empty:
            return None
        return ask(store, client, list(settings.labels), candidates, flow_run_id, step, m, logger)


@task(name="llm-opinions", cache_policy=NONE)
def llm_opinions_task(settings: Settings, model_version: int | None, flow_run_id: str | None,
                      k: int) -> Opinions | None:
    store = Store(settings.database, settings.store.lock_timeout_seconds)
    return llm_opinions(store, settings, model_version, flow_run_id, k)
