"""The Google connector against a local server: Google News RSS, the Custom Search JSON API
(paging, quota 429/403, a bad key, 410 after the shutdown) and page fetching (robots.txt,
redirects, a per-domain delay). The payloads under tests/data/google have the services'
shapes: RSS 2.0 items with ``<source url=..>``, Custom Search ``items[]`` and
``queries.nextPage``, Google's ``{"error": {"code", "message", "status"}}``. The API key
must appear in no log line, exception message or record.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import textwrap
import time
from pathlib import Path

import pytest
import urllib3.util.connection
from werkzeug.wrappers import Request, Response

from alflow.config import ConfigError, load_config
from alflow.config.sources import GoogleSource
from alflow.connectors import Connector, SourceError, build_connector
from alflow.connectors.google import GoogleConnector
from alflow.connectors.http import resolve_addresses, retry_after_seconds

DATA = Path(__file__).resolve().parent / "data" / "google"
KEY = "AIzaSyD-T3st_K3y-0123456789abcdefghijkl"
TOKENS = ["CBMiXkFVX3lxTE5HbGFjaWVyc0FscHNSZWNvcmRMb3NzMjAyNQ",
          "CBMiWkFVX3lxTE1lbHR3YXRlckxha2VzR3JlZW5sYW5k",
          "CBMiVkFVX3lxTE9waW5pb25SaXZlclRvd25z"]
CX = "017576662512468239146:omuauf_lfve"
JSON = "application/json; charset=UTF-8"
METADATA = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def article(title: str, n: int) -> str:
    """A small news page whose main text trafilatura finds (three paragraphs on station n)."""
    paragraphs = "".join(
        f"<p>{title}, part {i}: the glacier measurements of station {n} show a loss of {3 * i + n} "
        "metres of ice since the survey began, according to the field team.</p>" for i in range(3))
    return (f"<html><head><title>{title}</title></head><body><nav>Home | News</nav><article>"
            f"<h1>{title}</h1>{paragraphs}</article><footer>Privacy</footer></body></html>")


def rss(items: list[tuple[str, str, str]]) -> str:
    """An RSS 2.0 feed of (title, RFC 822 pubDate, link) items, as Google News shapes them."""
    body = "".join(f"<item><title>{title} - Station Times</title><link>{link}</link>"
                   f'<guid isPermaLink="false">{link}</guid><pubDate>{date}</pubDate>'
                   '<source url="https://stations.example">Station Times</source></item>'
                   for title, date, link in items)
    return f'<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>t</title>{body}</channel></rss>'


class FakeGoogle:
    """News RSS, the Custom Search API and a small web site with a robots.txt.

    ``faults`` are answered first by the API; ``page_faults[path]`` first for that path.
    ``feed`` replaces the recorded RSS; ``results[q]`` are the links the API answers for
    the query ``q`` (one page); ``sites[path]`` is an HTML page, ``redirects[path]`` a 302.
    """

    def __init__(self, base: str):
        self.base = base
        self.requests: list[tuple[float, str, dict, dict]] = []
        self.faults: list[tuple[int, str, dict]] = []
        self.page_faults: dict[str, list[tuple[int, dict]]] = {}
        self.feed: str | None = None
        self.results: dict[str, list[str]] = {}
        self.sites: dict[str, str] = {}
        self.redirects: dict[str, str] = {}

    def __call__(self, request: Request) -> Response:
        self.requests.append((time.monotonic(), request.path, dict(request.args), dict(request.headers)))
        path = request.path
        if self.page_faults.get(path):
            status, headers = self.page_faults[path].pop(0)
            return Response("busy", status=status, headers=headers)
        if path in self.redirects:
            return Response("", status=302, headers={"Location": self.redirects[path]})
        if path in self.sites:
            return Response(self.sites[path], content_type="text/html; charset=utf-8")
        if path == "/rss/search" and self.feed is not None:
            return Response(self.feed, content_type="application/xml; charset=utf-8")
        if path == "/customsearch/v1" and not self.faults and request.args["q"] in self.results:
            items = [{"title": f"Result {rank}", "link": link, "snippet": f"Snippet {rank}."}
                     for rank, link in enumerate(self.results[request.args["q"]], start=1)]
            return Response(json.dumps({"items": items}), content_type=JSON)
        if path == "/rss/search":
            body = (DATA / "news_glacier.rss").read_text(encoding="utf-8")
            return Response(body.replace("https://news.google.com", self.base),
                            content_type="application/xml; charset=utf-8")
        if path.startswith("/rss/articles/"):
            token = path.rsplit("/", 1)[1]
            if token == TOKENS[0]:
                return Response("", status=302,
                                headers={"Location": f"{self.base}/articles/glacier-melt.html"})
            if token == TOKENS[1]:
                return Response("", status=302, headers={"Location": "/private/report.html"})
            return Response((DATA / "pages" / "google-news-interstitial.html").read_bytes(),
                            content_type="text/html; charset=utf-8")
        if path == "/customsearch/v1":
            if self.faults:
                status, body, headers = self.faults.pop(0)
                return Response(body, status=status, headers=headers, content_type=JSON)
            name = {"glacier mass balance": f"cse_glacier_start{request.args['start']}.json",
                    "pages": "cse_pages.json"}[request.args["q"]]
            body = (DATA / name).read_text(encoding="utf-8").replace("{base}", self.base)
            return Response(body, content_type=JSON)
        if path == "/robots.txt":
            return Response((DATA / "pages" / "robots.txt").read_bytes(), content_type="text/plain")
        page = DATA / "pages" / path.rsplit("/", 1)[-1]
        if path.startswith(("/articles/", "/private/")) and page.exists():
            return Response(page.read_bytes(), content_type="text/html; charset=utf-8")
        return Response("not found", status=404)

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.requests]

    def api_calls(self) -> list[tuple[dict, dict]]:
        return [(args, headers) for _, path, args, headers in self.requests if path == "/customsearch/v1"]


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


@pytest.fixture
def loopback_only(monkeypatch):
    """Every connection the test opens (requests and httpx alike) must go to a loopback
    address; any other is refused before it is made and listed in the returned list."""
    refused: list[str] = []

    def guard(create):
        def create_connection(address, *args, **kwargs):
            host, port = address[0], address[1]
            addresses = {ipaddress.ip_address(info[4][0]) for info in socket.getaddrinfo(host, port)}
            if not all(ip.is_loopback for ip in addresses):
                refused.append(f"{host}:{port}")
                raise ConnectionRefusedError(f"test guard: no connection to {host}")
            return create(address, *args, **kwargs)
        return create_connection

    monkeypatch.setattr(urllib3.util.connection, "create_connection",
                        guard(urllib3.util.connection.create_connection))
    monkeypatch.setattr(socket, "create_connection", guard(socket.create_connection))
    return refused


def public_localhost(host: str) -> list:
    """A resolver under which ``localhost`` passes for a public host (its pages are still
    fetched from 127.0.0.1), so a redirect from it to 127.0.0.1 can be tested."""
    if host == "localhost":
        return [ipaddress.ip_address("93.184.216.34")]
    return resolve_addresses(host)


@pytest.fixture
def google(httpserver):
    fake = FakeGoogle(httpserver.url_for("/").rstrip("/"))
    httpserver.expect_request(re.compile(".*")).respond_with_handler(fake)
    return fake


def news(google, **kw) -> GoogleConnector:
    kw.setdefault("search", "glacier")
    kw.setdefault("retry_wait_seconds", 0.0)
    kw.setdefault("page_delay_seconds", 0.0)
    if kw.get("fetch_pages"):
        kw.setdefault("allow_private_addresses", True)  # the pages are on 127.0.0.1
    settings = GoogleSource(type="google", name=kw.pop("name", "news"),
                            rss_url=f"{google.base}/rss/search", **kw)
    return GoogleConnector(settings)


def cse(google, environ=None, **kw) -> GoogleConnector:
    kw.setdefault("search", "glacier mass balance")
    kw.setdefault("retry_wait_seconds", 0.0)
    kw.setdefault("page_delay_seconds", 0.0)
    kw.setdefault("api_key_env", "TEST_CSE_KEY")
    if kw.get("fetch_pages"):
        kw.setdefault("allow_private_addresses", True)  # the pages are on 127.0.0.1
    settings = GoogleSource(type="google", name=kw.pop("name", "cse"), backend="custom_search",
                            cx=CX, endpoint=f"{google.base}/customsearch/v1", **kw)
    return GoogleConnector(settings, environ={"TEST_CSE_KEY": KEY} if environ is None else environ)


# -- Google News RSS ----------------------------------------------------------------------------
def test_news_rss_items_become_records(google):
    connector = news(google, hl="en-GB", gl="GB", limit=4)
    assert isinstance(connector, Connector)
    ticks: list[int] = []
    records = list(connector.fetch(progress=ticks.append))
    assert [r.title for r in records] == [
        "Glaciers in the Alps lost a record share of their ice this year",
        "Scientists map meltwater lakes forming on Greenland's ice sheet",
        "Opinion: what shrinking glaciers mean for river towns",
        "Glacier tourism booms as ice retreats",
    ]  # the " - Publisher" suffix removed; limit 4 of 5
    first = records[0]
    assert first.text == first.title
    assert first.external_id == TOKENS[0]
    assert first.url == f"{google.base}/rss/articles/{TOKENS[0]}?oc=5"
    assert first.meta == {"publisher": "Alpine Times", "publisher_url": "https://www.alpinetimes.example",
                          "published": "2025-05-06T12:15:00Z", "google_news_link": first.url}
    assert connector.report.read == 4 and sum(ticks) == 4
    [(_, path, args, headers)] = google.requests
    assert path == "/rss/search"
    assert args == {"q": "glacier", "hl": "en-GB", "gl": "GB", "ceid": "GB:en"}
    assert headers["User-Agent"].startswith("alflow/")


def test_news_cursor_is_the_newest_publication_time(google):
    connector = news(google)
    first = list(connector.fetch())
    assert connector.next_cursor == "2025-05-06T12:15:00Z"
    assert list(news(google).fetch()) == first  # unchanged feed, same records
    later = news(google)
    records = list(later.fetch(cursor="2025-05-05T18:30:00+00:00"))
    assert len(records) == 3 and later.skipped_by_cursor == 2  # the boundary item is kept
    assert later.next_cursor == "2025-05-06T12:15:00Z"


def test_news_rss_failures_are_one_line(google, httpserver):
    broken = GoogleSource(type="google", name="news", search="x",
                          rss_url=f"{google.base}/articles/empty.html", retries=0)
    not_rss = r"^source news: Google News RSS from 127\.0\.0\.1:\d+ is not an RSS feed"
    with pytest.raises(SourceError, match=not_rss):
        list(GoogleConnector(broken).fetch())
    missing = GoogleSource(type="google", name="news", search="x", rss_url=f"{google.base}/nothing",
                           retries=0)
    with pytest.raises(SourceError, match=r"^source news: Google News RSS answered HTTP 404"):
        list(GoogleConnector(missing).fetch())


def test_news_pages_follow_the_redirect_and_respect_robots(google):
    connector = news(google, fetch_pages=True, limit=3)
    records = list(connector.fetch())
    [article] = records
    assert article.url == f"{google.base}/articles/glacier-melt.html"
    assert article.title == "Glaciers in the Alps lost a record share of their ice this year"
    assert "The Rhône glacier, the source of one of Europe's great rivers" in article.text
    assert "Subscribe" not in article.text and "Privacy" not in article.text  # main text only
    assert dict(connector.report.bad) == {"page disallowed by robots.txt": 1,
                                          "Google News link did not lead to the article": 1}
    assert "/private/report.html" not in google.paths()  # never fetched
    assert google.paths().count("/robots.txt") == 1


# -- Custom Search JSON API ---------------------------------------------------------------------
def test_custom_search_pages_with_start_and_sends_the_key_in_a_header(google):
    connector = cse(google, limit=12)
    records = list(connector.fetch())
    assert len(records) == 12
    assert records[0].title == "Glacier report 1: mass balance of glacier 1"
    assert records[0].url == records[0].external_id == "https://glaciers.example/reports/1"
    assert records[0].text.startswith("Annual mass balance measurements for glacier 1")
    assert records[11].meta["rank"] == 12 and records[0].meta["display_link"] == "glaciers.example"
    calls = google.api_calls()
    assert [(a["start"], a["num"]) for a, _ in calls] == [("1", "10"), ("11", "2")]
    assert all(a["cx"] == CX and a["q"] == "glacier mass balance" for a, _ in calls)
    assert all(h["X-Goog-Api-Key"] == KEY and "key" not in a for a, h in calls)


def test_custom_search_cursor_skips_links_already_read(google):
    connector = cse(google, limit=10)
    list(connector.fetch())
    assert len(connector.next_cursor) == 10
    again = cse(google, limit=12)
    records = list(again.fetch(cursor=connector.next_cursor))
    assert [r.meta["rank"] for r in records] == [11, 12] and again.skipped_by_cursor == 10


@pytest.mark.parametrize("status, name, headers, expected", [
    (429, "cse_error_429.json", {"Retry-After": "0"},
     "source cse: Custom Search API quota exceeded (HTTP 429 RESOURCE_EXHAUSTED): Quota exceeded for quota "
     "metric 'Queries' and limit 'Queries per day' of service 'customsearch.googleapis.com' for consumer "
     "'project_number:123456789012'."),
    (403, "cse_error_403.json", {},
     "source cse: Custom Search API refused access or the daily quota is spent (HTTP 403 PERMISSION_DENIED): "
     "This project does not have the access to Custom Search JSON API."),
    (400, "cse_error_400_key.json", {},
     "source cse: Custom Search API rejected the API key (HTTP 400 INVALID_ARGUMENT): API key not valid. "
     "Please pass a valid API key."),
    (410, None, {},
     "source cse: Custom Search API answered 410 Gone: the Custom Search JSON API is no longer available "
     "(Google ended its whole-web search on 2027-01-01); use backend = \"news_rss\" or another search API"),
])
def test_custom_search_errors_are_one_clear_line(google, status, name, headers, expected):
    body = (DATA / name).read_text() if name else "<html><body>410 Gone</body></html>"
    google.faults = [(status, body, headers)] * 4
    connector = cse(google, retries=2)
    with pytest.raises(SourceError) as info:
        list(connector.fetch())
    assert str(info.value) == expected
    assert len(google.api_calls()) == (3 if status == 429 else 1)  # only 429 is retried


def test_quota_retry_honours_retry_after_then_succeeds(google):
    google.faults = [(429, (DATA / "cse_error_429.json").read_text(), {"Retry-After": "1"})]
    connector = cse(google, limit=3, retry_wait_seconds=0.01)
    started = time.monotonic()
    assert len(list(connector.fetch())) == 3
    assert time.monotonic() - started >= 1.0


def test_retry_after_parsing():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 30) == 30.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_custom_search_pages_respect_robots_and_count_failures(google):
    connector = cse(google, search="pages", fetch_pages=True)
    records = list(connector.fetch())
    [record] = records
    assert record.url == f"{google.base}/articles/glacier-melt.html"
    assert record.text.startswith("Rhône glacier retreat sets a new record\nThe Rhône glacier, the source")
    assert record.meta["snippet"] == "The Rhône glacier has retreated."
    assert dict(connector.report.bad) == {
        "page disallowed by robots.txt": 1, "page fetch failed: HTTP 404": 1, "no main text on page": 1}
    assert "/private/report.html" not in google.paths()


def test_page_fetches_wait_the_per_domain_delay(google):
    connector = cse(google, search="pages", fetch_pages=True, page_delay_seconds=0.3)
    list(connector.fetch())
    site = [t for t, path, _, _ in google.requests if path == "/robots.txt" or path.startswith("/articles/")]
    assert len(site) == 4  # robots.txt, then three pages (the fourth result is disallowed)
    gaps = [b - a for a, b in zip(site, site[1:], strict=False)]
    # arrivals at the server, so a loaded machine can delay the first one (seen: 0.269); no wait gives ~0
    assert min(gaps) >= 0.2, gaps


# -- retryable failures hold the cursor; pages only from public addresses -------------------------
def test_news_cursor_stays_before_a_page_that_answered_503(google):
    dates = ["Tue, 06 May 2025 12:00:00 GMT", "Mon, 05 May 2025 12:00:00 GMT", "Sun, 04 May 2025 12:00:00 GMT"]
    google.feed = rss([(f"Station {n} report", date, f"{google.base}/site/{n}.html")
                       for n, date in zip((1, 2, 3), dates, strict=True)])
    google.sites = {f"/site/{n}.html": article(f"Station {n} report", n) for n in (1, 2, 3)}
    google.page_faults = {"/site/2.html": [(503, {})]}
    first = news(google, fetch_pages=True, retries=0)
    assert [r.title for r in first.fetch()] == ["Station 1 report", "Station 3 report"]
    assert dict(first.report.bad) == {"page fetch failed: HTTP 503": 1}
    assert first.next_cursor == "2025-05-05T12:00:00Z"  # not past station 2, whose page may come later

    healed = news(google, fetch_pages=True, retries=0)
    records = list(healed.fetch(cursor=first.next_cursor))
    assert [r.title for r in records] == ["Station 1 report", "Station 2 report"]
    assert "station 2 show a loss" in records[1].text and healed.skipped_by_cursor == 1
    assert healed.next_cursor == "2025-05-06T12:00:00Z"

    # A page that is gone for good (404) is counted and passed, as before.
    google.page_faults = {"/site/2.html": [(404, {})]}
    gone = news(google, fetch_pages=True, retries=0)
    assert len(list(gone.fetch())) == 2 and gone.next_cursor == "2025-05-06T12:00:00Z"


def test_custom_search_page_fetch_refuses_a_redirect_to_the_metadata_address(google, loopback_only):
    google.results["metadata"] = [f"{google.base}/go/credentials", f"{google.base}/site/1.html",
                                  "http://169.254.169.254/latest/user-data"]
    google.redirects = {"/go/credentials": METADATA}
    google.sites = {"/site/1.html": article("Station 1 report", 1)}
    # allow_private_addresses (the pages are on 127.0.0.1) never opens link-local addresses.
    connector = cse(google, search="metadata", fetch_pages=True)
    records = list(connector.fetch())
    assert [r.url for r in records] == [f"{google.base}/site/1.html"]
    assert dict(connector.report.bad) == {"private address": 2}
    assert loopback_only == []  # refused before connecting: no attempt reached the guard
    assert connector.next_cursor == [f"{google.base}/site/1.html"]  # the refused are not "read"


def test_pages_on_private_addresses_are_refused_unless_allowed(google, loopback_only):
    port = google.base.rsplit(":", 1)[1]
    public = f"http://localhost:{port}"
    google.results["intranet"] = [f"{public}/go/internal", f"{public}/site/1.html", f"{google.base}/site/2.html"]
    google.redirects = {"/go/internal": f"{google.base}/internal/secret.html"}
    google.sites = {"/site/1.html": article("Station 1 report", 1), "/site/2.html": article("Station 2 report", 2),
                    "/internal/secret.html": article("INTERNAL ONLY payroll", 9)}
    settings = GoogleSource(type="google", name="cse", backend="custom_search", cx=CX, search="intranet",
                            endpoint=f"{google.base}/customsearch/v1", api_key_env="TEST_CSE_KEY",
                            fetch_pages=True, page_delay_seconds=0, retry_wait_seconds=0)
    assert settings.allow_private_addresses is False
    connector = GoogleConnector(settings, environ={"TEST_CSE_KEY": KEY}, resolve=public_localhost)
    records = list(connector.fetch())
    assert [r.url for r in records] == [f"{public}/site/1.html"]
    assert dict(connector.report.bad) == {"private address": 2}  # the redirect, and 127.0.0.1 itself
    assert "/internal/secret.html" not in google.paths() and "/site/2.html" not in google.paths()
    assert not any("INTERNAL" in r.text for r in records) and loopback_only == []

    allowed = cse(google, search="intranet", fetch_pages=True, allow_private_addresses=True)
    assert len(list(allowed.fetch())) == 3 and "/internal/secret.html" in google.paths()


def test_custom_search_retry_after_beyond_the_cap_fails_at_once_saying_when(google):
    google.faults = [(429, (DATA / "cse_error_429.json").read_text(), {"Retry-After": "86400"})]
    slept: list[float] = []
    settings = GoogleSource(type="google", name="cse", backend="custom_search", cx=CX, search="glacier mass balance",
                            endpoint=f"{google.base}/customsearch/v1", api_key_env="TEST_CSE_KEY", retries=3)
    connector = GoogleConnector(settings, environ={"TEST_CSE_KEY": KEY}, sleep=slept.append)
    with pytest.raises(SourceError) as info:
        list(connector.fetch())
    assert re.fullmatch(r"source cse: the Custom Search API asked to wait 86400 s \(Retry-After\), more than "
                        r"max_retry_wait_seconds = 120; retry after \d{4}-\d\d-\d\d \d\d:\d\d UTC", str(info.value))
    assert slept == [] and len(google.api_calls()) == 1


# -- the key stays secret -------------------------------------------------------------------------
def test_the_key_appears_in_no_log_line_error_or_record(google, caplog):
    google.faults = [(429, json.dumps({"error": {"code": 429, "message": f"quota for key {KEY} exceeded",
                                                 "status": "RESOURCE_EXHAUSTED"}}), {"Retry-After": "0"})] * 2
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        connector = cse(google, retries=1)
        with pytest.raises(SourceError) as info:
            list(connector.fetch())
        seen.append(str(info.value))
        records = list(cse(google, limit=12).fetch())
        unreachable = GoogleSource(type="google", name="cse", backend="custom_search", search="x", cx="abc",
                                   api_key_env="TEST_CSE_KEY", endpoint="http://127.0.0.1:9/customsearch/v1",
                                   retries=1, retry_wait_seconds=0)
        with pytest.raises(SourceError) as down:
            list(GoogleConnector(unreachable, environ={"TEST_CSE_KEY": KEY}).fetch())
        seen.append(str(down.value))
    assert "***" in seen[0]  # Google's message quoted the key: redacted
    for error in (info.value, down.value):  # nor in any exception chained to them
        chained = error
        while chained is not None:
            seen.append(f"{chained!r} {chained}")
            chained = chained.__cause__ or chained.__context__
    logged = [r.getMessage() for r in caplog.records] + [str(r.exc_info) for r in caplog.records]
    assert len(logged) > 5  # urllib3 and the retries did log
    everything = "\n".join(seen + logged + [repr(connector)] + [repr(r) for r in records])
    assert KEY not in everything


def test_missing_key_sources_are_one_line_errors(google, monkeypatch):
    unset = r"^source cse: the environment variable TEST_CSE_KEY \(api_key_env\) is not set$"
    with pytest.raises(SourceError, match=unset):
        list(cse(google, environ={}).fetch())

    from prefect.blocks import system

    class FakeSecret:
        def get(self):
            return KEY

    loads: list[tuple] = []

    def load(name, **kw):
        loads.append((name, kw))
        if name == "broken":
            raise ValueError(f"Unable to find block document named broken ({KEY})")
        return FakeSecret()

    monkeypatch.setattr(system.Secret, "load", load)
    records = list(cse(google, api_key_env=None, api_key_secret="google-cse-key", limit=2).fetch())
    assert len(records) == 2 and loads == [("google-cse-key", {"_sync": True})]
    assert google.api_calls()[-1][1]["X-Goog-Api-Key"] == KEY
    with pytest.raises(SourceError) as info:
        list(cse(google, api_key_env=None, api_key_secret="broken").fetch())
    assert str(info.value) == ("source cse: cannot read the Prefect Secret block 'broken' (api_key_secret): "
                               "ValueError")


# -- configuration --------------------------------------------------------------------------------
def config(tmp_path: Path, body: str):
    path = tmp_path / "alflow.toml"
    path.write_text('labels = ["a", "b"]\n[[sources]]\ntype = "google"\nname = "g"\n' + textwrap.dedent(body),
                    encoding="utf-8")
    return load_config(path, environ={})


def config_error(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, body)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_config_defaults(tmp_path):
    [source] = config(tmp_path, 'search = "glacier"\n').sources
    assert source.backend == "news_rss" and source.limit == 50 and source.fetch_pages is False
    assert source.news_params() == {"q": "glacier", "hl": "en-US", "gl": "US", "ceid": "US:en"}
    assert isinstance(build_connector(source), GoogleConnector)
    body = 'search = "x"\nbackend = "custom_search"\ncx = "abc"\napi_key_secret = "cse-key"\n'
    [source] = config(tmp_path, body).sources
    assert source.api_key_secret == "cse-key"


@pytest.mark.parametrize("body, expected", [
    ('search = "x"\nbackend = "custom_search"\ncx = "abc"\n',
     "sources.0.google.api_key_env: backend = \"custom_search\" needs exactly one of api_key_env"),
    ('search = "x"\nbackend = "custom_search"\ncx = "abc"\napi_key_env = "A"\napi_key_secret = "b"\n',
     "needs exactly one of api_key_env"),
    ('search = "x"\nbackend = "custom_search"\napi_key_env = "A"\n', "sources.0.google.cx: backend"),
    ('search = "x"\ncx = "abc"\n', "sources.0.google.cx: does not apply to backend = \"news_rss\""),
    ('search = "x"\nbackend = "custom_search"\ncx = "a"\napi_key_env = "A"\nhl = "de"\n',
     "sources.0.google.hl: does not apply to backend = \"custom_search\""),
    ('search = "x"\nlimit = 101\n', "sources.0.google.limit"),
    ('search = "x"\nbackend = "bing"\n', "sources.0.google.backend"),
    ('search = "x"\nrss_url = "news.google.com/rss/search"\n', "sources.0.google.rss_url"),
    ('backend = "news_rss"\n', "sources.0.google.search: required key is missing"),
    ('search = "x"\nallow_private_addresses = true\n',
     "sources.0.google.allow_private_addresses: only applies with fetch_pages = true"),
    ('search = "x"\nmax_retry_wait_seconds = -1\n', "sources.0.google.max_retry_wait_seconds"),
])
def test_config_errors(tmp_path, body, expected):
    assert expected in config_error(tmp_path, body)


def test_a_key_in_the_config_is_refused_without_echoing_it(tmp_path):
    base = 'search = "x"\nbackend = "custom_search"\ncx = "abc"\n'
    message = config_error(tmp_path, base + f'api_key_env = "{KEY}"\n')
    assert "sources.0.google.api_key_env: must be the NAME of an environment variable" in message
    message = config_error(tmp_path, base + f'api_key_secret = "{KEY}"\n')
    assert "sources.0.google.api_key_secret" in message
    message = config_error(tmp_path, base + f'api_key_env = "A"\napi_key = "{KEY}"\n')
    assert "sources.0.google.api_key: unknown key" in message
    for body in (f'api_key_env = "{KEY}"\n', f'api_key_secret = "{KEY}"\n',
                 f'api_key_env = "A"\napi_key = "{KEY}"\n'):
        assert KEY not in config_error(tmp_path, base + body)
