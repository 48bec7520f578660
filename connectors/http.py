"""HTTP for the connectors that call services: timeouts, retries, robots.txt, politeness.

* :class:`HttpClient` - one ``requests`` session: a timeout on every request, and retries
  of timeouts, connection errors, 429 and 5xx with exponential backoff; a ``Retry-After``
  header (seconds or an HTTP date) replaces the computed wait, and a wait longer than
  ``max_wait`` ends the retries instead of blocking the run for hours.
* :class:`PageFetcher` - fetches web pages for their main text: robots.txt is read per
  site (RFC 9309: 4xx means no rules; 5xx, 429 or unreachable means stay out) and obeyed,
  every request to one domain waits ``delay`` seconds (or the site's Crawl-delay) after
  the previous one, redirects are followed hop by hop with each hop checked.

Messages raised from here never contain query strings, headers or the text of a
``requests`` exception (which quotes the URL): secrets never travel in a URL here, and even
so nothing that could hold one is repeated.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import urljoin, urlsplit
from urllib.robotparser import RobotFileParser

import requests

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_PAGE_BYTES = 5_000_000
MAX_REDIRECTS = 5


class HttpFailure(Exception):
    """A request failed after its retries (timeout, connection error); the message is safe."""


class PageError(Exception):
    """A page could not be used; ``reason`` is the short reason counted in the report."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds to wait: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def host_of(url: str) -> str:
    return urlsplit(url).netloc or url


@dataclass
class HttpClient:
    """GET with a timeout and retries; see the module docstring."""

    user_agent: str
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    max_wait: float = 120.0
    sleep: Callable[[float], None] = time.sleep
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.headers["User-Agent"] = self.user_agent

    def get(self, url: str, *, params: dict | None = None, headers: dict | None = None,
            allow_redirects: bool = True, stream: bool = False,
            retry_status: frozenset[int] = RETRY_STATUS) -> requests.Response:
        """The response (any status once retries are spent); :class:`HttpFailure` when no
        response came at all."""
        attempt = 0
        while True:
            try:
                response = self.session.get(
                    url, params=params, headers=headers, timeout=self.timeout,
                    allow_redirects=allow_redirects, stream=stream,
                )
            except requests.Timeout:
                problem: str | requests.Response = f"timed out after {self.timeout:g}s"
                wait = self.backoff * 2 ** attempt
            except requests.RequestException as exc:
                problem = f"cannot connect ({type(exc).__name__})"
                wait = self.backoff * 2 ** attempt
            else:
                if response.status_code not in retry_status:
                    return response
                problem = response
                told = retry_after_seconds(response.headers.get("Retry-After"))
                wait = told if told is not None else self.backoff * 2 ** attempt
            if attempt >= self.retries or wait > self.max_wait:
                if isinstance(problem, requests.Response):
                    return problem
                raise HttpFailure(f"{host_of(url)}: {problem}")
            status = problem.status_code if isinstance(problem, requests.Response) else problem
            log.info("%s: %s, retry %d of %d in %.1fs", host_of(url), status, attempt + 1,
                     self.retries, wait)
            if isinstance(problem, requests.Response):
                problem.close()
            self.sleep(wait)
            attempt += 1


class PageFetcher:
    """Fetches HTML pages politely (robots.txt, a per-domain delay); see the module docstring."""

    def __init__(self, client: HttpClient, delay: float, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.delay = delay
        self.clock = clock
        self._robots: dict[str, RobotFileParser | bool] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self.agent = client.user_agent.split("/")[0].split()[0] or "*"

    def _wait_turn(self, url: str, crawl_delay: float | None = None) -> None:
        host = urlsplit(url).netloc.lower()
        delay = max(self.delay, crawl_delay or 0.0)
        with self._lock:
            last = self._last.get(host)
            now = self.clock()
            if last is not None and now - last < delay:
                self.client.sleep(delay - (now - last))
            self._last[host] = self.clock()

    def _rules(self, url: str) -> RobotFileParser | bool:
        """The site's robots.txt parser, True (no rules) or False (stay out)."""
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        if origin not in self._robots:
            robots_url = origin + "/robots.txt"
            self._wait_turn(robots_url)
            try:
                response = self.client.get(robots_url)
            except HttpFailure:
                rules: RobotFileParser | bool = False
            else:
                if 200 <= response.status_code < 300:
                    rules = RobotFileParser(robots_url)
                    rules.parse(response.text.splitlines())
                elif 400 <= response.status_code < 500 and response.status_code != 429:
                    rules = True
                else:
                    rules = False
            self._robots[origin] = rules
        return self._robots[origin]

    def allowed(self, url: str) -> bool:
        rules = self._rules(url)
        if isinstance(rules, bool):
            return rules
        return rules.can_fetch(self.agent, url)

    def fetch(self, url: str) -> tuple[str, bytes]:
        """(final URL, HTML bytes) of a page, or :class:`PageError` with the reason."""
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise PageError("page URL is not http(s)")
            if not self.allowed(url):
                raise PageError("page disallowed by robots.txt")
            rules = self._robots.get(_origin(url))
            crawl_delay = None
            if isinstance(rules, RobotFileParser):
                crawl_delay = rules.crawl_delay(self.agent)
            self._wait_turn(url, float(crawl_delay) if crawl_delay else None)
            try:
                response = self.client.get(url, allow_redirects=False, stream=True)
            except HttpFailure as exc:
                raise PageError(f"page fetch failed: {str(exc).split(': ', 1)[-1]}") from None
            with response:
                if response.is_redirect and response.headers.get("Location"):
                    url = urljoin(url, response.headers["Location"])
                    continue
                if response.status_code != 200:
                    raise PageError(f"page fetch failed: HTTP {response.status_code}")
                kind = response.headers.get("Content-Type", "text/html").split(";")[0].strip().lower()
                if kind not in ("text/html", "application/xhtml+xml", ""):
                    raise PageError(f"not an HTML page ({kind})")
                body = b""
                for chunk in response.iter_content(65536):
                    body += chunk
                    if len(body) > MAX_PAGE_BYTES:
                        raise PageError("page larger than 5 MB")
                # Bytes: the extractor reads the page's own charset declaration.
                return url, body
        raise PageError("too many redirects")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()
