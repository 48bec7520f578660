"""Google: news headlines from Google News RSS, or results of the Custom Search JSON API.

``backend`` chooses:

* ``"news_rss"`` (no key): ``GET https://news.google.com/rss/search?q=..&hl=..&gl=..&ceid=..``
  (or ``rss_url``), parsed with feedparser. A record per item: the headline (Google's
  `` - Publisher`` suffix removed) is the title and the text, with the publisher
  (``<source url=..>``), the link and the publication date in ``meta``; ``external_id`` is
  the item's guid. Google returns at most 100 items and no paging.
* ``"custom_search"``: the Programmable Search Engine JSON API
  (``https://customsearch.googleapis.com/customsearch/v1``, or ``endpoint``) with ``cx``,
  ten results a page, paged with ``start`` from ``queries.nextPage[0].startIndex`` (the API
  stops at 100). The API key comes from the environment variable ``api_key_env`` or the
  Prefect Secret block ``api_key_secret``, is sent in the ``X-Goog-Api-Key`` header (never
  in a URL, so no log or error quoting a URL can show it), and is redacted from every
  message. The API is closed to new customers and its whole-web search ends on
  2027-01-01: a 410 then, a 429/403 quota or access error, or a bad key stop the source
  with one line saying so.

``fetch_pages = true`` replaces each result's text with the main text of its page
(trafilatura), fetched with :class:`connectors.http.PageFetcher`: robots.txt obeyed, one
request per domain every ``page_delay_seconds``, only from public addresses unless
``allow_private_addresses``. A page that cannot be used (disallowed, HTTP error, a private
address, no main text, a Google News link that does not lead to the article) is counted
with its reason and the result is left out.

Requests time out after ``timeout_seconds`` and are retried (timeouts, 429, 5xx) with
exponential backoff that honours ``Retry-After`` up to ``max_retry_wait_seconds``
(:class:`connectors.http.HttpClient`); a service asking for a longer wait stops the source
with one line saying when to retry.

Cursor (see :mod:`connectors.base`): for news, the newest publication time read, ISO 8601
UTC (``"2025-03-03T10:00:00Z"``), and a fetch given one skips items published before it;
it never passes an item whose page failed in a way that may pass (a timeout, 429, 5xx),
so the next fetch asks for that page again. For custom search, the list of result links
already read (the newest 5,000), skipped; a link whose page failed is not in it.
"""

from __future__ import annotations

import io
import logging
import os
import time
import xml.sax
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import feedparser

from alflow import __version__
from alflow.config.sources import CUSTOM_SEARCH_ENDPOINT, GOOGLE_NEWS_RSS, GoogleSource
from alflow.connectors.base import FetchReport, Progress, Record, SourceError
from alflow.connectors.http import (
    HttpClient,
    HttpFailure,
    PageError,
    PageFetcher,
    Resolve,
    RetryLater,
    host_of,
    redact,
)
from alflow.connectors.keys import KeyUnavailable, read_api_key

log = logging.getLogger(__name__)

PAGE_SIZE = 10  # the Custom Search API's maximum num
LAST_RESULT = 100  # the API serves results 1-100 only
SEEN_LINKS_KEPT = 5000
SHUTDOWN_HINT = ("the Custom Search JSON API is no longer available (Google ended its whole-web "
                 "search on 2027-01-01); use backend = \"news_rss\" or another search API")


class GoogleConnector:
    """Reads one :class:`config.sources.GoogleSource`; see the module docstring."""

    def __init__(self, settings: GoogleSource, *, sleep: Callable[[float], None] = time.sleep,
                 environ: Mapping[str, str] | None = None, resolve: Resolve | None = None):
        """``resolve(host)`` lists a page host's addresses (the seam of the private-address
        check; default DNS)."""
        self.settings = settings
        self.name = settings.name
        self.report = FetchReport()
        self.next_cursor: Any = None
        self.skipped_by_cursor = 0
        self.environ = os.environ if environ is None else environ
        self.user_agent = settings.user_agent or f"alflow/{__version__} (active-learning ingest)"
        self.client = HttpClient(
            user_agent=self.user_agent, timeout=settings.timeout_seconds, retries=settings.retries,
            backoff=settings.retry_wait_seconds, max_wait=settings.max_retry_wait_seconds, sleep=sleep,
        )
        self.pages = PageFetcher(self.client, settings.page_delay_seconds,
                                 allow_private=settings.allow_private_addresses,
                                 resolve=resolve) if settings.fetch_pages else None
        self._secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:  # never the key
        return f"GoogleConnector(name={self.name!r}, backend={self.settings.backend!r})"

    # -- the Connector interface --------------------------------------------------------
    def expected_total(self) -> int | None:
        return None

    def fetch(self, progress: Progress | None = None, cursor: Any = None) -> Iterator[Record]:
        self.next_cursor = None
        self.skipped_by_cursor = 0
        if self.settings.backend == "news_rss":
            yield from self._news(progress, cursor)
        else:
            yield from self._custom_search(progress, cursor)

    def _fail(self, message: str) -> SourceError:
        return SourceError(redact(f"source {self.name}: {message}", self._secrets))

    # -- Google News RSS ----------------------------------------------------------------
    def _news(self, progress: Progress | None, cursor: Any) -> Iterator[Record]:
        s = self.settings
        url = s.rss_url or GOOGLE_NEWS_RSS
        since = _time_cursor(cursor)
        newest = since
        retry_from: str | None = None  # the oldest item whose page may come next time
        try:
            response = self.client.get(url, params=s.news_params())
        except RetryLater as exc:
            raise self._fail(exc.line("Google News RSS")) from None
        except HttpFailure as exc:
            raise self._fail(f"Google News RSS: {exc}") from None
        with response:
            if response.status_code != 200:
                raise self._fail(f"Google News RSS answered HTTP {response.status_code} ({host_of(url)})")
            kind = response.headers.get("Content-Type", "")
            feed = feedparser.parse(io.BytesIO(response.content), response_headers={"content-type": kind})
        error = feed.get("bozo_exception")
        if feed.get("bozo") and not feed.entries:
            problem = type(error).__name__ if error else "unreadable"
            raise self._fail(f"Google News RSS from {host_of(url)} is not an RSS feed ({problem})")
        if isinstance(error, xml.sax.SAXParseException):
            # A feed cut short still parses up to the cut: its newest time would move the
            # cursor past the items that were cut off.
            raise self._fail(f"Google News RSS from {host_of(url)} is not well-formed XML "
                             f"(line {error.getLineNumber()}: {error.getMessage()})")
        for entry in feed.entries[: s.limit]:
            if progress:
                progress(1)
            title = " ".join((entry.get("title") or "").split())
            link = entry.get("link")
            if not title or not link:
                self.report.reject("item without title or link")
                continue
            source = entry.get("source") or {}
            publisher = source.get("title")
            if publisher and title.endswith(f" - {publisher}"):
                title = title[: -len(publisher) - 3].rstrip()
            published = _published(entry)
            if since and published and published < since:
                self.skipped_by_cursor += 1
                continue
            meta = {"publisher": publisher, "publisher_url": source.get("href"), "published": published,
                    "google_news_link": link}
            text, url_out = title, link
            if self.pages is not None:
                try:
                    text, url_out = self._page_text(link, news=True)
                except PageError as exc:
                    self.report.reject(exc.reason)
                    if exc.retryable and published and (retry_from is None or published < retry_from):
                        retry_from = published
                    continue
            self.report.read += 1
            if published and (newest is None or published > newest):
                newest = published
            yield Record(text=text, title=title, url=url_out, external_id=entry.get("id") or link,
                         meta={k: v for k, v in meta.items() if v})
        # Not older than the failed page's item, so the next fetch asks for it again (an
        # item without a time is never skipped by the cursor anyway).
        self.next_cursor = min(newest, retry_from) if newest and retry_from else newest

    # -- Custom Search JSON API ---------------------------------------------------------
    def _api_key(self) -> str:
        try:
            key = read_api_key(self.settings.api_key_env, self.settings.api_key_secret, self.environ)
        except KeyUnavailable as exc:
            raise SourceError(f"source {self.name}: {exc}") from None
        self._secrets = (key,)
        return key

    def _custom_search(self, progress: Progress | None, cursor: Any) -> Iterator[Record]:
        s = self.settings
        endpoint = s.endpoint or CUSTOM_SEARCH_ENDPOINT
        headers = {"X-Goog-Api-Key": self._api_key()}
        seen = _links_cursor(cursor)
        seen_set = set(seen)
        new_links: list[str] = []
        start, considered = 1, 0
        while considered < s.limit and start <= LAST_RESULT:
            num = min(PAGE_SIZE, s.limit - considered, LAST_RESULT - start + 1)
            params = {"cx": s.cx, "q": s.search, "start": start, "num": num}
            try:
                response = self.client.get(endpoint, params=params, headers=headers)
            except RetryLater as exc:
                raise self._fail(exc.line("the Custom Search API")) from None
            except HttpFailure as exc:
                raise self._fail(f"Custom Search API: {exc}") from None
            with response:
                if response.status_code != 200:
                    raise self._fail(self._api_error(response))
                try:
                    data = response.json()
                except ValueError:
                    data = None
            if not isinstance(data, dict):
                raise self._fail(f"malformed JSON from the Custom Search API ({host_of(endpoint)})")
            items = data.get("items") or []
            for offset, item in enumerate(items[: s.limit - considered]):
                considered += 1
                if progress:
                    progress(1)
                record = self._search_record(item, start + offset, seen_set)
                if record is not None:
                    new_links.append(record.meta["link"])
                    self.report.read += 1
                    yield record
            next_page = ((data.get("queries") or {}).get("nextPage") or [{}])[0]
            if not items or not next_page.get("startIndex"):
                break
            start = int(next_page["startIndex"])
        self.next_cursor = (seen + new_links)[-SEEN_LINKS_KEPT:]

    def _search_record(self, item: Any, rank: int, seen: set[str]) -> Record | None:
        if not isinstance(item, dict) or not item.get("link"):
            self.report.reject("result without a link")
            return None
        link = item["link"]
        if link in seen:
            self.skipped_by_cursor += 1
            return None
        seen.add(link)
        title = " ".join((item.get("title") or "").split()) or None
        snippet = " ".join((item.get("snippet") or "").split())
        text, url = snippet, link
        if self.pages is not None:
            try:
                text, url = self._page_text(link, news=False)
            except PageError as exc:  # not in the cursor either way: the next fetch asks again
                self.report.reject(exc.reason)
                return None
        if not text:
            self.report.reject("empty snippet")
            return None
        meta = {"link": link, "display_link": item.get("displayLink"), "rank": rank, "snippet": snippet}
        return Record(text=text, title=title, url=url, external_id=link,
                      meta={k: v for k, v in meta.items() if v})

    def _api_error(self, response) -> str:
        """One line for an error answer of the API: what it means, Google's message."""
        status = response.status_code
        detail, state = "", ""
        try:
            error = response.json().get("error") or {}
            detail = " ".join(str(error.get("message") or "").split())[:300]
            state = str(error.get("status") or "")
        except (ValueError, AttributeError):
            pass
        said = f" ({' '.join(filter(None, [f'HTTP {status}', state]))})"
        detail = f": {detail}" if detail else ""
        if status == 410:
            return f"Custom Search API answered 410 Gone: {SHUTDOWN_HINT}"
        if status == 429:
            return f"Custom Search API quota exceeded{said}{detail}"
        if status == 403:
            return f"Custom Search API refused access or the daily quota is spent{said}{detail}"
        if status in (400, 401) and "key" in detail.lower():
            return f"Custom Search API rejected the API key{said}{detail}"
        return f"Custom Search API error{said}{detail}"

    # -- pages ----------------------------------------------------------------------------
    def _page_text(self, link: str, *, news: bool) -> tuple[str, str]:
        """(main text, final URL) of a result's page; :class:`PageError` with the reason."""
        import trafilatura

        final_url, body = self.pages.fetch(link)
        if news and (host_of(final_url).lower().endswith("news.google.com")
                     or urlsplit(final_url).path.startswith("/rss/articles/")):
            raise PageError("Google News link did not lead to the article")
        text = trafilatura.extract(body, url=final_url, include_comments=False, include_tables=False)
        if not text or not text.strip():
            raise PageError("no main text on page")
        return text.strip(), final_url


def _published(entry: Any) -> str | None:
    parsed = entry.get("published_parsed") or entry.get("updated_parsed")
    if not parsed:
        return None
    return datetime(*parsed[:6], tzinfo=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time_cursor(cursor: Any) -> str | None:
    if cursor is None:
        return None
    if isinstance(cursor, str):
        try:
            when = datetime.fromisoformat(cursor.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    log.warning("ignoring a Google News cursor that is not an ISO 8601 time")
    return None


def _links_cursor(cursor: Any) -> list[str]:
    if cursor is None:
        return []
    if isinstance(cursor, list) and all(isinstance(link, str) for link in cursor):
        return list(cursor)
    log.warning("ignoring a Custom Search cursor that is not a list of links")
    return []
