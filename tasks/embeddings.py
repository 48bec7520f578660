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
    """Items cannot be embedded (the endpoint failed); the message is one line."""


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
        raise EmbeddingError(f"embedding {what} with {model!r} failed: {exc}") from None
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
    stored, so it too is embedded once."""

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
        if self._client is None:
            self._client = embedding_client(self.settings)
        fresh, _ = _embed(self._client, [docs[i] for i in missing], self.model)
        items = self.store.items_of_docs([docs[i] for i in missing])
        if len(items):
            self.store.write_embeddings(items["item_id"].tolist(), self.model, fresh[items["pos"].to_numpy()])
        out = np.empty((len(docs), fresh.shape[1]), dtype=np.float32)
        if len(positions):
            out[positions] = found
        out[missing] = fresh
        return out


def use_stored_vectors(store: Store, settings: Settings, client=None,
                       logger: logging.Logger | logging.LoggerAdapter = log, embed: bool = True) -> StoredVectors | None:
    """Where the features need embeddings: embed the items that have none (``embed``) and
    register the store's vectors for every model of this process to read; None otherwise."""
    if not needs_embeddings(settings):
        return None
    source = StoredVectors(store, settings, client)
    if embed:
        embed_items(store, settings, client, logger)
    modeling.register_vectors(source)
    return source
