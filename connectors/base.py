"""The one interface every source implements, and the normalisation all of them share.

A connector turns one configured source into :class:`Record` objects. It does not touch
the store: the ingest flow hashes, deduplicates and writes. A record a connector cannot use
(empty text, undecodable bytes, a malformed line) is counted in its :class:`FetchReport`
with a reason, never fatal; an error that stops the whole source (file missing, service
down after retries) raises :class:`SourceError` with a one-line message naming the source.

Incremental fetching (the network connectors: wikipedia, youtube, google) is optional for a
connector: ``fetch(progress=None, cursor=None)`` accepts the cursor a previous fetch left
in ``connector.next_cursor`` and then yields only records newer than it (a JSON value
whose meaning belongs to the connector: a newest date, the revisions or links already
read). ``next_cursor`` is None until a fetch has run to its end (a fetch that raised leaves
it None); it already includes the cursor it was given, so the caller stores it as it is,
after the records are committed. Date cursors keep the boundary ("not older than"), so one
item may come again and is deduplicated. A cursor never passes an item that failed in a way
that may pass (a timeout, 429, 5xx, a rate limit): the next fetch must ask for it again;
an item failed for good (404, malformed, refused) is counted and may be passed.
``skipped_by_cursor`` counts what the cursor skipped. ``limit`` bounds the results asked of
the service in one fetch, before the cursor filters them, so a re-run without a cursor over
unchanged results yields the same records.

A network connector yields each record as soon as it is read (not after the page or the
batch it came in): the ingest stores what was yielded before a :class:`SourceError`, so a
source that stops at page N keeps pages 1..N-1.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

_SURROGATE = re.compile("[\ud800-\udfff]")


class SourceError(RuntimeError):
    """A source cannot be read at all; the message names the source and the cause."""


@dataclass(frozen=True)
class Record:
    """One item as a source gives it, before it is stored.

    ``gold_label`` is a label shipped with the data (a labeled CSV, a folder per class); it
    feeds evaluation and the simulated annotator, never the human's review.
    """

    text: str
    title: str | None = None
    url: str | None = None
    external_id: str | None = None
    gold_label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FetchReport:
    """What a fetch read: records yielded and rows rejected, by reason."""

    read: int = 0
    bad: Counter = field(default_factory=Counter)

    def reject(self, reason: str) -> None:
        self.bad[reason] += 1

    @property
    def n_bad(self) -> int:
        return sum(self.bad.values())


Progress = Callable[[int], None]


@runtime_checkable
class Connector(Protocol):
    """A source of records. ``name`` is the configured source name stored with each item."""

    name: str
    report: FetchReport

    def fetch(self, progress: Progress | None = None) -> Iterator[Record]:
        """Yield the source's records; count rejects in ``self.report``.

        ``progress`` (if given) is called with the number of rows/pages just read.
        """
        ...

    def expected_total(self) -> int | None:
        """How many rows a fetch will read, when cheap to know (for a progress bar)."""
        ...


def normalise_text(text: str) -> str:
    """NFC, whitespace collapsed, stripped: two copies differing only in spacing are one item.

    Whitespace is what ``str.isspace`` says (as ``\\s`` in ``re``): ``split()`` with no
    argument collapses exactly those runs and drops them at both ends.
    """
    if not text.isascii():  # ASCII is already NFC; most text is, and the check is cheap
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def _hash_normalised(text: str, title: str | None) -> str:
    return hashlib.sha256(f"{title or ''}\x1f{text}".encode("utf-8")).hexdigest()


def content_hash(text: str, title: str | None = None) -> str:
    """The item_id: sha256 hex of the normalised title and text."""
    return _hash_normalised(normalise_text(text), normalise_text(title or ""))


def has_undecodable(value: str) -> bool:
    """True if ``value`` carries bytes that did not decode (surrogateescape leaves U+DC80-DCFF).

    Any lone surrogate counts (a JSON ``"\\ud800"`` escape decodes to one): none can be
    encoded as UTF-8, so storing it would fail.
    """
    return not value.isascii() and _SURROGATE.search(value) is not None


ITEM_COLUMNS = ("item_id", "source", "external_id", "url", "title", "text", "gold_label", "meta")


def _meta_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, default=str, ensure_ascii=False) if meta else "{}"


def to_row(record: Record, source: str) -> dict[str, Any]:
    """A record as a row of the ``items`` table (without fetched_at / ingest_run)."""
    return {column: values[0] for column, values in to_columns([record], source).items()}


def to_columns(records: Sequence[Record], source: str) -> dict[str, list]:
    """Records as columns of the ``items`` table (without fetched_at / ingest_run):
    ``ITEM_COLUMNS``, each a list of len(records). A chunk of a large file is a few list
    passes, not a dict per row."""
    texts = [normalise_text(r.text) for r in records]
    titles = [normalise_text(r.title) or None if r.title else None for r in records]
    return {
        "item_id": [_hash_normalised(text, title) for text, title in zip(texts, titles)],
        "source": [source] * len(records),
        "external_id": [r.external_id for r in records],
        "url": [r.url for r in records],
        "title": titles,
        "text": texts,
        "gold_label": [r.gold_label for r in records],
        "meta": [_meta_json(r.meta) for r in records],
    }
