"""HTTP for the connectors that call services: timeouts, retries, robots.txt, politeness.

* :class:`RetryPolicy` - when a request that failed in a way that may pass (a timeout, a
  lost connection, 429 or 5xx) is tried again: ``retries`` times, waiting ``backoff``
  seconds doubled each time, or what a ``Retry-After`` header (seconds or an HTTP date)
  says. A computed wait past ``max_wait`` ends the retries; a ``Retry-After`` past it
  raises :class:`RetryLater` (saying when to come back) instead of blocking the run for
  hours. Every network source retries by it (the MediaWiki client and YouTube's
  subtitle downloads too).
* :class:`HttpClient` - one ``requests`` session: a timeout on every request, retried by
  its :class:`RetryPolicy`.
* :class:`PageFetcher` - fetches web pages for their main text: robots.txt is read per
  site (RFC 9309: 4xx means no rules; 5xx, 429 or no answer means stay out, for now)
  and obeyed, every request to one domain waits ``delay`` seconds (or the site's
  Crawl-delay) after the previous one, redirects are followed hop by hop with each hop
  checked. Before any request to a host (the first URL, every redirect, robots.txt) its
  name is resolved and a non-public address refused (:func:`address_refused`): a result
  link or a redirect must not make the ingest read a cloud metadata service or an
  intranet page and store it. A :class:`PageError` says whether the failure may pass
  (``retryable``): a cursor must not move past such a page.

Messages raised from here never contain query strings, headers or the text of a
``requests`` exception (which quotes the URL): secrets never travel in a URL here, and even
so nothing that could hold one is repeated.
"""

from __future__ import annotations

import email.utils
import ipaddress
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
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


class RetryLater(HttpFailure):
    """The server asked (``Retry-After``) for a longer wait than ``max_retry_wait_seconds``.

    ``seconds``: the wait asked for; ``cap``: the longest wait allowed; ``until``: the
    UTC time (rounded up to the minute) from which a retry is welcome.
    """

    def __init__(self, host: str, seconds: float, cap: float, now: float | None = None):
        self.host = host
        self.seconds = seconds
        self.cap = cap
        start = time.time() if now is None else now
        self.until = datetime.fromtimestamp(math.ceil((start + seconds) / 60) * 60, timezone.utc)
        super().__init__(self.line(host))

    def line(self, who: str) -> str:
        """``WHO asked to wait N s (Retry-After), more than max_retry_wait_seconds = C; retry
        after YYYY-MM-DD HH:MM UTC``."""
        return (f"{who} asked to wait {math.ceil(self.seconds)} s (Retry-After), more than "
                f"max_retry_wait_seconds = {self.cap:g}; retry after {self.until:%Y-%m-%d %H:%M} UTC")


class PageError(Exception):
    """A page could not be used; ``reason`` is the short reason counted in the report.

    ``retryable``: the failure may pass (a timeout, 429, 5xx, robots.txt unreachable), so
    the page must be asked for again by a later fetch; otherwise (404, disallowed, a
    private address, no main text) it is counted and left out for good.
    """

    def __init__(self, reason: str, retryable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


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


@dataclass(frozen=True)
class RetryPolicy:
    """How a failure that may pass is retried; see the module docstring.

    ``retries``: retries after the first attempt; ``backoff``: seconds before the first
    retry, doubled for each next one; ``max_wait``: the longest single wait, in seconds.
    """

    retries: int = 3
    backoff: float = 1.0
    max_wait: float = 120.0

    def wait(self, attempt: int, retry_after: float | None, host: str) -> float | None:
        """Seconds to sleep before retry ``attempt + 1`` (``attempt`` counts from 0), or None
        when no retry is left (all spent, or the doubled backoff passed ``max_wait``).

        Raises :class:`RetryLater` when a retry is left but ``Retry-After`` asks for more
        than ``max_wait``: waiting is not allowed, and giving up without saying when to
        come back would leave the user guessing.
        """
        if attempt >= self.retries:
            return None
        if retry_after is not None:
            if retry_after > self.max_wait:
                raise RetryLater(host, retry_after, self.max_wait)
            return retry_after
        wait = self.backoff * 2 ** attempt
        return wait if wait <= self.max_wait else None


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

    @property
    def policy(self) -> RetryPolicy:
        return RetryPolicy(self.retries, self.backoff, self.max_wait)

    def get(self, url: str, *, params: dict | None = None, headers: dict | None = None,
            allow_redirects: bool = True, stream: bool = False,
            retry_status: frozenset[int] = RETRY_STATUS) -> requests.Response:
        """The response (any status once retries are spent); :class:`HttpFailure` when no
        response came at all, :class:`RetryLater` when ``Retry-After`` asks for more than
        ``max_wait``."""
        policy = self.policy
        attempt = 0
        while True:
            told = None
            try:
                response = self.session.get(
                    url, params=params, headers=headers, timeout=self.timeout,
                    allow_redirects=allow_redirects, stream=stream,
                )
            except requests.Timeout:
                problem: str | requests.Response = f"timed out after {self.timeout:g}s"
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
                problem = "connection lost mid-response"  # e.g. a body shorter than its Content-Length
            except requests.RequestException as exc:
                problem = f"cannot connect ({type(exc).__name__})"
            else:
                if response.status_code not in retry_status:
                    return response
                problem = response
                told = retry_after_seconds(response.headers.get("Retry-After"))
            try:
                wait = policy.wait(attempt, told, host_of(url))
            except RetryLater:
                problem.close()  # only a response carries Retry-After
                raise
            if wait is None:
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


Resolve = Callable[[str], list]


def resolve_addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``host`` (a name or an IP literal) resolves to; ``socket.gaierror``
    when it resolves to none."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def address_refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> bool:
    """True if a page may not be fetched from ``ip``.

    Link-local (169.254.0.0/16 holds cloud metadata services), multicast, unspecified
    (0.0.0.0 reaches this host) and reserved addresses never serve a page: refused always.
    Loopback and the other non-global ranges (RFC 1918, CGNAT, ULA, documentation) are
    refused unless ``allow_private`` (an intranet's pages).
    """
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d reaches a.b.c.d
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return True
    if ip.is_loopback:  # before is_reserved: ::1 lies in the reserved ::/8
        return not allow_private
    if ip.is_reserved:
        return True
    return not allow_private and not ip.is_global


class PageFetcher:
    """Fetches HTML pages politely (robots.txt, a per-domain delay) from public addresses;
    see the module docstring. ``allow_private`` lets it reach loopback and private
    addresses (an intranet); ``resolve`` (default :func:`resolve_addresses`) is the
    name-to-addresses seam."""

    def __init__(self, client: HttpClient, delay: float, clock: Callable[[], float] = time.monotonic,
                 *, allow_private: bool = False, resolve: Resolve | None = None):
        self.client = client
        self.delay = delay
        self.clock = clock
        self.allow_private = allow_private
        self.resolve = resolve
        self._robots: dict[str, RobotFileParser | PageError | None] = {}
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

    def check_address(self, url: str) -> None:
        """:class:`PageError` unless every address of ``url``'s host may be fetched from.

        Checked before each request, so a refused address is never connected to.
        """
        host = urlsplit(url).hostname
        if not host:
            raise PageError("page URL has no host")
        try:
            addresses = (self.resolve or resolve_addresses)(host)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:  # the resolver did not answer: may pass
                raise PageError("page fetch failed: cannot resolve host", retryable=True) from None
            raise PageError("unknown host") from None
        except (UnicodeError, ValueError):
            raise PageError("unknown host") from None
        if not addresses or any(address_refused(ip, self.allow_private) for ip in addresses):
            raise PageError("private address")

    def _get(self, url: str, crawl_delay: float | None = None) -> requests.Response:
        """One request to a checked address, redirects not followed, in the site's turn."""
        self._wait_turn(url, crawl_delay)
        return self.client.get(url, allow_redirects=False, stream=True)

    def _rules(self, url: str) -> RobotFileParser | PageError | None:
        """The site's robots.txt parser, None (no rules), or the :class:`PageError` every
        page of the site fails with (robots.txt unreachable: stay out, for now)."""
        origin = _origin(url)
        if origin not in self._robots:
            self._robots[origin] = self._read_robots(origin + "/robots.txt")
        return self._robots[origin]

    def _read_robots(self, robots_url: str) -> RobotFileParser | PageError | None:
        """A site's robots.txt as RFC 9309 reads it, redirects followed hop by hop (each hop
        checked like a page's): 4xx or too many redirects mean no rules; 5xx, 429 or no
        answer mean stay out."""
        url = robots_url
        try:
            for _ in range(MAX_REDIRECTS + 1):
                self.check_address(url)
                with self._get(url) as response:
                    if response.is_redirect and response.headers.get("Location"):
                        url = urljoin(url, response.headers["Location"])
                        continue
                    status = response.status_code
                    if 200 <= status < 300:
                        rules = RobotFileParser(robots_url)
                        rules.parse(response.text.splitlines())
                        return rules
                    if 400 <= status < 500 and status != 429:
                        return None
                    return PageError("robots.txt unreachable", retryable=True)
        except (HttpFailure, requests.RequestException):  # no answer, a long wait asked, a body cut short
            return PageError("robots.txt unreachable", retryable=True)
        except PageError as exc:  # a redirect to a refused address, or to no such host
            return PageError(f"robots.txt: {exc.reason}", exc.retryable)
        return None

    def _check_robots(self, url: str) -> float | None:
        """The site's Crawl-delay; :class:`PageError` if robots.txt keeps ``url`` out."""
        rules = self._rules(url)
        if isinstance(rules, PageError):
            raise rules
        if rules is None:
            return None
        if not rules.can_fetch(self.agent, url):
            raise PageError("page disallowed by robots.txt")
        crawl_delay = rules.crawl_delay(self.agent)
        return float(crawl_delay) if crawl_delay else None

    def fetch(self, url: str) -> tuple[str, bytes]:
        """(final URL, HTML bytes) of a page, or :class:`PageError` with the reason."""
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise PageError("page URL is not http(s)")
            self.check_address(url)  # before robots.txt, which is a request to the host too
            crawl_delay = self._check_robots(url)
            try:
                response = self._get(url, crawl_delay)
            except RetryLater:
                raise PageError("page host asked to wait longer than max_retry_wait_seconds",
                                retryable=True) from None
            except HttpFailure as exc:
                raise PageError(f"page fetch failed: {str(exc).split(': ', 1)[-1]}", retryable=True) from None
            with response:
                if response.is_redirect and response.headers.get("Location"):
                    url = urljoin(url, response.headers["Location"])
                    continue
                if response.status_code != 200:
                    raise PageError(f"page fetch failed: HTTP {response.status_code}",
                                    retryable=response.status_code in RETRY_STATUS)
                kind = response.headers.get("Content-Type", "text/html").split(";")[0].strip().lower()
                if kind not in ("text/html", "application/xhtml+xml", ""):
                    raise PageError(f"not an HTML page ({kind})")
                # Bytes: the extractor reads the page's own charset declaration.
                return url, _body(response)
        raise PageError("too many redirects")


def _body(response: requests.Response) -> bytes:
    """The page's bytes, at most ``MAX_PAGE_BYTES``; a body that breaks off (shorter than
    its Content-Length, a read timeout) is a retryable :class:`PageError`, never half a page."""
    body = b""
    try:
        for chunk in response.iter_content(65536):
            body += chunk
            if len(body) > MAX_PAGE_BYTES:
                raise PageError("page larger than 5 MB")
    except requests.RequestException:
        raise PageError("page fetch failed: connection lost mid-page", retryable=True) from None
    return body


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()
