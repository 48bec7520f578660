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
item may come again and is deduplicated. ``skipped_by_cursor`` counts what the cursor
skipped. ``limit`` bounds the results asked of the service in one fetch, before the cursor
filters them, so a re-run without a cursor over unchanged results yields the same records.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

_SPACE = re.compile(r"\s+")


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
    """NFC, whitespace collapsed, stripped: two copies differing only in spacing are one item."""
    return _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()


def content_hash(text: str, title: str | None = None) -> str:
    """The item_id: sha256 hex of the normalised title and text."""
    payload = normalise_text(title or "") + "\x1f" + normalise_text(text)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def has_undecodable(value: str) -> bool:
    """True if ``value`` carries bytes that did not decode (surrogateescape leaves U+DC80-DCFF).

    Any lone surrogate counts (a JSON ``"\\ud800"`` escape decodes to one): none can be
    encoded as UTF-8, so storing it would fail.
    """
    return any("\ud800" <= ch <= "\udfff" for ch in value)


def to_row(record: Record, source: str) -> dict[str, Any]:
    """A record as a row of the ``items`` table (without fetched_at / ingest_run)."""
    text = normalise_text(record.text)
    title = normalise_text(record.title) if record.title else None
    return {
        "item_id": content_hash(text, title),
        "source": source,
        "external_id": record.external_id,
        "url": record.url,
        "title": title or None,
        "text": text,
        "gold_label": record.gold_label,
        "meta": json.dumps(record.meta, default=str, ensure_ascii=False),
    }
