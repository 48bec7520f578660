"""Wikipedia, or any MediaWiki with TextExtracts: pages found by search, titles or category.

Requests go through wikipedia-api's client (httpx, a timeout, its user-agent check);
``api_url`` points it at another wiki's ``api.php`` by overriding the one method that
builds the endpoint. Retries are this module's, by :class:`connectors.http.RetryPolicy`
like every network source: the library's (tenacity) have no upper limit on a
``Retry-After`` wait, read it only on a 429 and only in seconds, and do not retry a
response that broke off. The queries are this module's own too, because the library's
page objects cost two requests per page, cannot see disambiguation pages (``pageprops``)
and its search does not continue:

1. the candidates: ``list=search`` (continued with ``sroffset``), the given titles, or
   ``list=categorymembers`` (continued with ``cmcontinue``; sub-categories breadth-first
   down to ``category_depth``), at most ``limit`` of them;
2. ``prop=info|pageprops`` (``inprop=url``) for 50 at a time: missing pages, redirects
   (followed, ``redirects=1``) and disambiguation pages are sorted out here, and with a
   cursor the pages whose revision was already read are skipped before any text is fetched;
3. ``prop=extracts`` (plain text) for 20 at a time: TextExtracts returns the whole text of
   one page per response, the rest come through ``continue``/``excontinue``; the summary
   (``exintro``) of all 20 comes in one. Each page is yielded as soon as its text and
   those of the pages before it are in, so a failure further on loses none of them.

Records: ``external_id`` is the page id, ``url`` the page URL, ``title`` the page title.

Cursor (see :mod:`connectors.base`): ``{"<pageid>": <lastrevid>, ...}``. A fetch given one
skips pages whose current revision is the one recorded; ``next_cursor`` adds this fetch's
pages to it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import httpx
import wikipediaapi
from wikipediaapi import (
    WikiConnectionError,
    WikiHttpError,
    WikiHttpTimeoutError,
    WikiInvalidJsonError,
    WikipediaException,
    WikiRateLimitError,
)

from alflow.config.sources import WikipediaSource
from alflow.connectors.base import FetchReport, Progress, Record, SourceError
from alflow.connectors.http import RETRY_STATUS, RetryLater, RetryPolicy, retry_after_seconds

log = logging.getLogger(__name__)

INFO_BATCH = 50  # titles/pageids per request (the API's limit for clients without apihighlimits)
EXTRACT_BATCH = 20  # TextExtracts' exlimit maximum
SEARCH_PAGE = 500
MAX_CONTINUATIONS = 10_000


class MediaWikiClient(wikipediaapi.Wikipedia):
    """wikipedia-api's client, sending requests to ``api_url`` when one is given and
    retrying by ``policy`` (sleeping with ``sleep``)."""

    def __init__(self, *, api_url: str | None = None, policy: RetryPolicy = RetryPolicy(),
                 sleep: Callable[[float], None] = time.sleep, **kwargs: Any):
        self.api_url = api_url
        self.policy = policy
        self.sleep = sleep
        super().__init__(max_retries=0, **kwargs)

    def _build_url(self, language: str) -> str:  # the library's endpoint seam
        return self.api_url or default_endpoint(language)

    def _get(self, language: str, params: dict[str, Any]) -> dict[str, Any]:
        """The library's request (its httpx client, its typed errors), retried by ``policy``.

        Raises the library's errors once retries are spent, :class:`RetryLater` when a
        ``Retry-After`` asks for more than ``policy.max_wait``.
        """
        url = self._build_url(language)
        host = urlsplit(url).netloc
        attempt = 0
        while True:
            told, failure, response = None, None, None
            try:
                response = self._client.get(url, params=params)
            except httpx.TimeoutException:
                failure = WikiHttpTimeoutError(url)
            except httpx.ConnectError:
                failure = WikiConnectionError(url)
            except httpx.RequestError:  # e.g. a body shorter than its Content-Length
                failure = AnswerBrokeOff(url)
            else:
                if response.status_code not in RETRY_STATUS:
                    return self._process_response(response, url)
                told = retry_after_seconds(response.headers.get("Retry-After"))
            wait = self.policy.wait(attempt, told, host)
            if wait is None:
                if failure is not None:
                    raise failure
                return self._process_response(response, url)  # raises its 429 / 5xx error
            log.info("%s: %s, retry %d of %d in %.1fs", host,
                     type(failure).__name__ if failure else response.status_code,
                     attempt + 1, self.policy.retries, wait)
            self.sleep(wait)
            attempt += 1


class AnswerBrokeOff(WikiConnectionError):
    """The connection ended before the whole answer came (retried like a lost connection)."""


def default_endpoint(language: str) -> str:
    """Wikipedia's api.php for a language, as the library builds it."""
    return wikipediaapi.Wikipedia._build_url(language)


class WikipediaConnector:
    """Reads one :class:`config.sources.WikipediaSource`; see the module docstring."""

    def __init__(self, settings: WikipediaSource, *, sleep: Callable[[float], None] = time.sleep,
                 **client_kwargs: Any):
        """``client_kwargs`` go to httpx through wikipedia-api (e.g. ``transport=``);
        ``sleep`` waits between retries."""
        self.settings = settings
        self.name = settings.name
        self.report = FetchReport()
        self.next_cursor: dict[str, int] | None = None
        self.skipped_by_cursor = 0
        self.endpoint = settings.api_url or default_endpoint(settings.language)
        self.host = urlsplit(self.endpoint).netloc
        self.service = "Wikipedia" if settings.api_url is None else self.host
        try:
            self.client = MediaWikiClient(
                api_url=settings.api_url,
                policy=RetryPolicy(settings.retries, settings.retry_wait_seconds, settings.max_retry_wait_seconds),
                sleep=sleep,
                user_agent=settings.user_agent,
                language=settings.language,
                timeout=settings.timeout_seconds,
                **client_kwargs,
            )
        except AssertionError as exc:  # the library's user-agent / language checks
            raise SourceError(f"source {self.name}: {exc}") from None

    # -- the Connector interface --------------------------------------------------------
    def expected_total(self) -> int | None:
        if self.settings.titles is not None:
            return min(len(self.settings.titles), self.settings.limit)
        return None

    def fetch(self, progress: Progress | None = None, cursor: Any = None) -> Iterator[Record]:
        self.next_cursor = None
        self.skipped_by_cursor = 0
        seen_revisions = _revisions(cursor)
        new_cursor = dict(seen_revisions)
        yielded: set[int] = set()
        candidates = self._candidates()
        for start in range(0, len(candidates), INFO_BATCH):
            batch = candidates[start:start + INFO_BATCH]
            wanted: list[tuple[dict, str | None]] = []
            for page, redirected_from, problem in self._resolve(batch):
                if problem is None and page["pageid"] in yielded:
                    problem = "duplicate"  # two titles or redirects to one page
                if problem is None and seen_revisions.get(str(page["pageid"])) == page.get("lastrevid"):
                    problem = "unchanged"
                if problem is None:
                    yielded.add(page["pageid"])
                    wanted.append((page, redirected_from))
                    continue
                if problem == "unchanged":
                    self.skipped_by_cursor += 1
                elif problem != "duplicate":
                    self.report.reject(problem)
                if progress:
                    progress(1)
            for chunk in range(0, len(wanted), EXTRACT_BATCH):
                pages = wanted[chunk:chunk + EXTRACT_BATCH]
                texts: dict[int, str] = {}
                done = 0
                for arrived in self._extracts([page["pageid"] for page, _ in pages]):
                    texts.update(arrived)
                    while done < len(pages) and pages[done][0]["pageid"] in texts:
                        yield from self._finish(pages[done], texts, new_cursor, progress)
                        done += 1
                for page in pages[done:]:
                    yield from self._finish(page, texts, new_cursor, progress)
        self.next_cursor = new_cursor

    def _finish(self, wanted: tuple[dict, str | None], texts: dict[int, str], new_cursor: dict[str, int],
                progress: Progress | None) -> Iterator[Record]:
        """The record of one page whose extract is in (none, counted, if its text is empty)."""
        page, redirected_from = wanted
        if progress:
            progress(1)
        text = (texts.get(page["pageid"]) or "").strip()
        if not text:
            self.report.reject("empty text")
            return
        new_cursor[str(page["pageid"])] = page.get("lastrevid")
        self.report.read += 1
        yield self._record(page, text, redirected_from)

    # -- requests -----------------------------------------------------------------------
    def _query(self, params: dict[str, Any]) -> dict[str, Any]:
        """One ``action=query`` through the library's client (its retries), errors as
        :class:`SourceError`."""
        full = {"action": "query", "format": "json", "formatversion": 2, **params}
        retries = self.settings.retries
        after = f" after {retries} {'retry' if retries == 1 else 'retries'}" if retries else ""
        try:
            raw = self.client._get(self.client.language, full)
        except RetryLater as exc:
            raise SourceError(f"source {self.name}: {exc.line(self.service)}") from None
        except WikiRateLimitError:
            raise SourceError(f"source {self.name}: rate-limited by {self.host} (HTTP 429){after}") from None
        except WikiHttpError as exc:
            tail = after if exc.status_code >= 500 else ""
            raise SourceError(
                f"source {self.name}: HTTP {exc.status_code} from {self.endpoint}{tail}"
            ) from None
        except WikiInvalidJsonError:
            raise SourceError(f"source {self.name}: malformed JSON from {self.endpoint}") from None
        except WikiHttpTimeoutError:
            raise SourceError(
                f"source {self.name}: {self.host} timed out ({self.settings.timeout_seconds:g}s){after}"
            ) from None
        except AnswerBrokeOff:
            raise SourceError(f"source {self.name}: the answers of {self.endpoint} broke off{after}") from None
        except WikiConnectionError:
            raise SourceError(f"source {self.name}: cannot connect to {self.endpoint}{after}") from None
        except WikipediaException as exc:
            raise SourceError(f"source {self.name}: {type(exc).__name__} from {self.endpoint}") from None
        if not isinstance(raw, dict):
            raise SourceError(f"source {self.name}: malformed JSON from {self.endpoint}")
        if "error" in raw:
            error = raw["error"] if isinstance(raw["error"], dict) else {}
            code = error.get("code", "error")
            info = str(error.get("info", "")).splitlines()[0] if error.get("info") else ""
            raise SourceError(f"source {self.name}: MediaWiki API error {code}: {info}".rstrip(": "))
        if raw.get("warnings"):
            log.debug("source %s: API warnings %s", self.name, raw["warnings"])
        return raw

    def _continued(self, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Each response of a query, following ``continue`` until it is absent."""
        cont: dict[str, Any] = {}
        for _ in range(MAX_CONTINUATIONS):
            raw = self._query({**params, **cont})
            yield raw
            nxt = raw.get("continue")
            if not isinstance(nxt, dict) or not nxt:
                return
            cont = nxt
        raise SourceError(f"source {self.name}: {self.host} kept returning 'continue'; stopped")

    # -- 1. candidates ------------------------------------------------------------------
    def _candidates(self) -> list[dict[str, Any]]:
        """``{"title": .., "pageid": ..}`` (pageid when known), at most ``limit``."""
        s = self.settings
        if s.titles is not None:
            return [{"title": title} for title in s.titles[: s.limit]]
        if s.search is not None:
            return self._search()
        return self._category_pages()

    def _search(self) -> list[dict[str, Any]]:
        s = self.settings
        found: list[dict[str, Any]] = []
        params = {"list": "search", "srsearch": s.search, "srnamespace": 0,
                  "srlimit": min(s.limit, SEARCH_PAGE), "srprop": "timestamp"}
        seen: set[int] = set()
        for raw in self._continued(params):
            for hit in _query_part(raw, "search", self):
                if hit.get("pageid") in seen:
                    continue
                seen.add(hit.get("pageid"))
                found.append({"title": hit.get("title"), "pageid": hit.get("pageid")})
                if len(found) >= s.limit:
                    return found
        return found

    def _category_pages(self) -> list[dict[str, Any]]:
        s = self.settings
        found: list[dict[str, Any]] = []
        seen_pages: set[int] = set()
        seen_categories = {s.category}
        queue = deque([(s.category, 0)])
        while queue:
            category, depth = queue.popleft()
            params = {"list": "categorymembers", "cmtitle": category, "cmtype": "page|subcat",
                      "cmnamespace": "0|14", "cmprop": "ids|title", "cmlimit": 500}
            for raw in self._continued(params):
                for member in _query_part(raw, "categorymembers", self):
                    if member.get("ns") == 14:
                        title = member.get("title")
                        if depth < s.category_depth and title not in seen_categories:
                            seen_categories.add(title)
                            queue.append((title, depth + 1))
                    elif member.get("pageid") not in seen_pages:
                        seen_pages.add(member.get("pageid"))
                        found.append({"title": member.get("title"), "pageid": member.get("pageid")})
                        if len(found) >= s.limit:
                            return found
        if not found:
            self._check_category_exists()
        return found

    def _check_category_exists(self) -> None:
        raw = self._query({"prop": "info", "titles": self.settings.category})
        pages = _query_part(raw, "pages", self)
        if pages and all("missing" in page or "invalid" in page for page in pages):
            raise SourceError(f"source {self.name}: {self.settings.category} does not exist on {self.host}")

    # -- 2. info: missing, redirects, disambiguation ------------------------------------
    def _resolve(self, batch: list[dict[str, Any]]) -> Iterator[tuple[dict | None, str | None, str | None]]:
        """(page, redirected-from title, problem) per candidate, in order."""
        by_id = all("pageid" in c for c in batch)
        key = "pageids" if by_id else "titles"
        values = "|".join(str(c["pageid"] if by_id else c["title"]) for c in batch)
        params = {"prop": "info|pageprops", "inprop": "url", "ppprop": "disambiguation",
                  "redirects": 1, key: values}
        pages_by_id: dict[int, dict] = {}
        pages_by_title: dict[str, dict] = {}
        renamed: dict[str, str] = {}
        redirected: dict[str, str] = {}
        for raw in self._continued(params):
            query = raw.get("query") or {}
            for entry in query.get("normalized") or []:
                renamed[entry.get("from")] = entry.get("to")
            for entry in query.get("redirects") or []:
                redirected[entry.get("from")] = entry.get("to")
            for page in _query_part(raw, "pages", self):
                known = pages_by_id.get(page.get("pageid")) if page.get("pageid") else None
                known = known or pages_by_title.get(page.get("title"))
                if known is not None:
                    known.update(page)
                    page = known
                if page.get("pageid"):
                    pages_by_id[page["pageid"]] = page
                if page.get("title"):
                    pages_by_title[page["title"]] = page
        for candidate in batch:
            page = pages_by_id.get(candidate.get("pageid")) if candidate.get("pageid") else None
            redirected_from = None
            if page is None and candidate.get("title") is not None:
                title = renamed.get(candidate["title"], candidate["title"])
                target = title
                for _ in range(5):  # a redirect to a redirect is resolved by the API; be safe
                    if target not in redirected:
                        break
                    target = redirected[target]
                if target != title:
                    redirected_from = title
                page = pages_by_title.get(target)
            if page is None or "missing" in page:
                yield None, None, "missing page"
            elif "invalid" in page:
                yield None, None, "invalid title"
            elif "disambiguation" in (page.get("pageprops") or {}):
                yield None, None, "disambiguation page"
            elif not page.get("pageid"):
                yield None, None, "missing page"
            else:
                yield page, redirected_from, None

    # -- 3. extracts --------------------------------------------------------------------
    def _extracts(self, pageids: list[int]) -> Iterator[dict[int, str]]:
        """``{pageid: extract}`` of each answer, as it comes (continued by ``excontinue``)."""
        params: dict[str, Any] = {"prop": "extracts", "explaintext": 1, "exsectionformat": "plain",
                                  "pageids": "|".join(map(str, pageids))}
        if self.settings.content == "summary":
            params.update(exintro=1, exlimit="max")
        else:
            params["exlimit"] = 1  # whole texts come one per response, by excontinue
        for raw in self._continued(params):
            yield {page["pageid"]: page["extract"] for page in _query_part(raw, "pages", self)
                   if "extract" in page and page.get("pageid") is not None}

    def _record(self, page: dict, text: str, redirected_from: str | None) -> Record:
        meta: dict[str, Any] = {"wiki": self.host,
                                "language": page.get("pagelanguage") or self.settings.language}
        for key in ("lastrevid", "touched", "length"):
            if page.get(key) is not None:
                meta[key] = page[key]
        if redirected_from:
            meta["redirected_from"] = redirected_from
        return Record(
            text=text,
            title=page.get("title"),
            url=page.get("fullurl") or page.get("canonicalurl"),
            external_id=str(page["pageid"]),
            meta=meta,
        )


def _query_part(raw: dict, key: str, connector: WikipediaConnector) -> list[dict]:
    value = (raw.get("query") or {}).get(key, [])
    if isinstance(value, dict):  # formatversion=1 shape, from a wiki that ignores formatversion
        value = list(value.values())
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise SourceError(
            f"source {connector.name}: unexpected '{key}' in the response of {connector.endpoint}"
        )
    return value


def _revisions(cursor: Any) -> dict[str, int]:
    if cursor is None:
        return {}
    if isinstance(cursor, dict):
        return {str(k): v for k, v in cursor.items()}
    log.warning("ignoring a Wikipedia cursor that is not a {pageid: revision} mapping")
    return {}

