"""Embeddings as features: every item embedded once through the ``[llm]`` endpoint, stored
in DuckDB, and read by a model's embedding step wherever the model is given texts.

    items --(missing only)--> /v1/embeddings (batched) --> embeddings table (one writer)
    model.predict_proba(texts) --> EmbeddingFeatures --> StoredVectors(texts) --> rows

Why a lookup, not vectors carried with each chunk: every caller of a model (pre-label,
holdout, query, control, stop set, label check) gives it texts; with the lookup
registered once per process (:func:`use_stored_vectors`), they all work unchanged, and
the reads happen in the flow's process, the only one that opens the database, so DuckDB
keeps its single writer. Scoring such a model stays on threads (a Dask worker could not
open the file; alflow.tasks.prelabel.on_runner): the step itself is a row lookup and
a product with the coefficients, cheap beside the endpoint's embedding.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from alflow.config import ConfigError, Settings
from alflow.tasks import modeling
from alflow.tasks.store import Store

log = logging.getLogger("alflow")

# Items read, embedded and written per round: one transaction each, so an interrupted run
# keeps what it wrote, and no read holds the database while the endpoint works.
EMBED_PAGE = 1024


class EmbeddingError(modeling.ModelError):
    """Items cannot be embedded (the endpoint failed); the message is one line, ``reason``
    the endpoint's part of it."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


# Why the endpoint could not embed, per database file (resolved path), while this process's
# reads leave out the items with no vector (Store.read_embedded_only): no request is sent
# again until the next cycle's embed_items tries.
_DOWN: dict[str, str] = {}


def needs_embeddings(settings: Settings) -> bool:
    """True when ``[model] features`` reads embedding vectors."""
    return settings.model.features != "tfidf"


def embedding_model(settings: Settings) -> str:
    """The configured embedding model; a one-line :class:`ConfigError` naming the missing
    ``[llm]`` key when features need embeddings and it or base_url is unset."""
    llm = settings.llm
    for key in ("base_url", "embedding_model"):
        if getattr(llm, key) is None:
            raise ConfigError(f"llm.{key}: needs to be set: model.features = {settings.model.features!r} "
                              "embeds through [llm]")
    return llm.embedding_model


def embedding_client(settings: Settings):
    """The ``[llm]`` endpoint's client (:class:`alflow.connectors.llm.LLMClient`)."""
    from alflow.connectors.llm import LLMClient

    embedding_model(settings)
    return LLMClient(settings.llm)


@dataclass
class Embedded:
    """What one :func:`embed_items` did: items embedded, requests sent, seconds spent."""

    items: int = 0
    requests: int = 0
    seconds: float = 0.0


def _embed(client, docs: list[str], model: str) -> tuple[np.ndarray, int]:
    """(vectors (n, d) float32, requests sent) of ``docs``; :class:`EmbeddingError` on failure."""
    from alflow.connectors.llm import LLMError

    try:
        vectors, usage = client.embed(docs, model)
    except LLMError as exc:
        what = "1 text" if len(docs) == 1 else f"{len(docs)} texts"
        raise EmbeddingError(f"embedding {what} with {model!r} failed: {exc}", str(exc)) from None
    return np.asarray(vectors, dtype=np.float32), int(usage.requests)


def embed_items(store: Store, settings: Settings, client=None,
                logger: logging.Logger | logging.LoggerAdapter = log) -> Embedded:
    """Embed every item that has no vector of the configured embedding model, a page
    (:data:`EMBED_PAGE` items) at a time, each page's vectors written in one transaction.
    Items embedded before are never sent again. Raises :class:`EmbeddingError` (one line)
    if the endpoint fails; the pages written before stay."""
    model = embedding_model(settings)
    done = Embedded()
    missing = store.count_unembedded(model)
    if not missing:
        return done
    own = client is None
    client = client or embedding_client(settings)
    start = time.perf_counter()
    try:
        while True:
            page = store.unembedded_items(model, EMBED_PAGE)
            if page.empty:
                break
            vectors, requests = _embed(client, page["doc"].tolist(), model)
            store.write_embeddings(page["item_id"].tolist(), model, vectors)
            done.items += len(page)
            done.requests += requests
    finally:
        if own:
            client.close()
    done.seconds = time.perf_counter() - start
    logger.info(f"embedded {done.items} items with {model} ({done.requests} requests, {done.seconds:.1f} s)")
    return done


class StoredVectors:
    """A :class:`~alflow.tasks.modeling.VectorSource` over the store: the vectors of the
    items whose text each doc is. A doc with none (an item ingested since
    :func:`embed_items`, or a text no item has) is embedded now; an item's vector is then
    stored, so it too is embedded once. While the endpoint is known to be down
    (:func:`endpoint_down`), such a doc is an :class:`EmbeddingError` at once, no request.
    A client given is the caller's; one it opens is closed after each embedding."""

    def __init__(self, store: Store, settings: Settings, client=None):
        self.store, self.settings = store, settings
        self.model = embedding_model(settings)
        self._client = client

    def __call__(self, docs: Sequence[str]) -> np.ndarray:
        docs = list(docs)
        positions, found = self.store.vectors_of_docs(docs, self.model)
        if len(positions) == len(docs):
            return found
        missing = np.setdiff1d(np.arange(len(docs)), positions)
        down = endpoint_down(self.store)
        if down is not None:
            raise EmbeddingError(f"{len(missing)} of {len(docs)} texts have no vector from {self.model} "
                                 f"(endpoint down: {down})", down)
        if self._client is not None:
            fresh, _ = _embed(self._client, [docs[i] for i in missing], self.model)
        else:
            with embedding_client(self.settings) as client:
                fresh, _ = _embed(client, [docs[i] for i in missing], self.model)
        items = self.store.items_of_docs([docs[i] for i in missing])
        if len(items):
            self.store.write_embeddings(items["item_id"].tolist(), self.model, fresh[items["pos"].to_numpy()])
        out = np.empty((len(docs), fresh.shape[1]), dtype=np.float32)
        if len(positions):
            out[positions] = found
        out[missing] = fresh
        return out


def _key(store: Store) -> str:
    return str(store.path.resolve())


def endpoint_down(store: Store) -> str | None:
    """Why the endpoint could not embed this cycle (the reads of ``store`` then leave out
    items with no vector), or None."""
    return _DOWN.get(_key(store))


def mark_endpoint(store: Store, settings: Settings, reason: str | None) -> None:
    """``reason``: the endpoint cannot embed; until it is marked up again (None), the
    reads a model scores leave out items with no vector of the embedding model and no
    request is sent for them (:class:`StoredVectors`)."""
    if reason is None:
        _DOWN.pop(_key(store), None)
        store.read_embedded_only(None)
    else:
        _DOWN[_key(store)] = reason
        store.read_embedded_only(embedding_model(settings))


def left_out_line(what: str, settings: Settings, reason: str, where: str) -> str:
    """The one line saying ``what`` ("412 pool items") was left out of ``where`` for lack
    of a vector."""
    return (f"{what} have no vector from {settings.llm.embedding_model} (endpoint down: {reason}): "
            f"left out of {where}; they are embedded when the endpoint answers")


def report_left_out(store: Store, settings: Settings,
                    logger: logging.Logger | logging.LoggerAdapter = log) -> int:
    """While the endpoint is down: log how many pool (and held-out) items have no vector and
    are left out of this cycle, in one line; returns the pool's count (0 when it is up)."""
    reason = endpoint_down(store)
    if reason is None:
        return 0
    pool, held_out = store.count_unembedded_pool(embedding_model(settings), settings.holdout_fraction)
    if pool or held_out:
        what = f"{pool} pool items" + (f" and {held_out} held-out items" if held_out else "")
        logger.warning(left_out_line(what, settings, reason, "this cycle"))
    return pool


def with_vectors(store: Store, settings: Settings, docs: Sequence[str], what: str, where: str,
                 logger: logging.Logger | logging.LoggerAdapter = log) -> np.ndarray:
    """(n,) bool: which of ``docs`` (n,) a model can read now, embedding those with no vector
    if the endpoint answers. If it does not, the endpoint is marked down
    (:func:`mark_endpoint`) and one line says how many ``what`` ("labeled items") are left
    out of ``where`` ("this fit") and why. All True when the features need no embeddings."""
    docs = list(docs)
    ok = np.ones(len(docs), dtype=bool)
    if not needs_embeddings(settings) or not docs:
        return ok
    positions, _ = store.vectors_of_docs(docs, embedding_model(settings))
    missing = np.setdiff1d(np.arange(len(docs)), positions)
    if not len(missing):
        return ok
    try:
        StoredVectors(store, settings)([docs[i] for i in missing])
    except EmbeddingError as exc:
        mark_endpoint(store, settings, exc.reason)
        ok[missing] = False
        logger.warning(left_out_line(f"{len(missing)} {what}", settings, exc.reason, where))
    return ok


def use_stored_vectors(store: Store, settings: Settings, client=None,
                       logger: logging.Logger | logging.LoggerAdapter = log, embed: bool = True) -> StoredVectors | None:
    """Where the features need embeddings: embed the items that have none (``embed``) and
    register the store's vectors for every model of this process to read; None otherwise.

    With ``embed``, the endpoint failing is not fatal: the endpoint is marked down
    (:func:`mark_endpoint`) and the cycle reads only items that have a vector; an answer
    marks it up again."""
    if not needs_embeddings(settings):
        if embed:
            mark_endpoint(store, settings, None)
        return None
    source = StoredVectors(store, settings, client)
    modeling.register_vectors(source)
    if embed:
        try:
            embed_items(store, settings, client, logger)
        except EmbeddingError as exc:
            mark_endpoint(store, settings, exc.reason)
        else:
            mark_endpoint(store, settings, None)
    return source
