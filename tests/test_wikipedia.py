"""The Wikipedia connector against a local MediaWiki API serving recorded payloads.

The payloads under tests/data/wikipedia are MediaWiki ``action=query`` answers in
``formatversion=2`` shape: search with ``sroffset`` continuation, ``prop=info|pageprops``
with ``inprop=url`` (normalised titles, a redirect, a missing page, a disambiguation
page), TextExtracts answers continued by ``excontinue``, category members continued by
``cmcontinue``, and an API error. No test reaches the internet.
"""

from __future__ import annotations

import email.utils
import json
import re
import textwrap
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest
from werkzeug.wrappers import Request, Response

from alflow.config import ConfigError, load_config
from alflow.config.sources import WikipediaSource
from alflow.connectors import Connector, SourceError, build_connector, to_row
from alflow.connectors.wikipedia import WikipediaConnector, default_endpoint

DATA = Path(__file__).resolve().parent / "data" / "wikipedia"
UA = "alflow-tests/1.0 (https://example.org/alflow; tests@example.org)"
TITLES = ["UK", "python (programming language)", "Nonexistent page xyz", "Mercury",
          "Python (programming language)"]

# Request parameters (None: must be absent) -> recorded answer.
ROUTES = [
    ({"list": "search", "srsearch": "photosynthesis", "sroffset": None}, "search_photosynthesis_0.json"),
    ({"list": "search", "srsearch": "photosynthesis", "sroffset": "2"}, "search_photosynthesis_2.json"),
    ({"prop": "info|pageprops", "pageids": "24544|6985|40480"}, "info_search.json"),
    ({"prop": "extracts", "pageids": "24544|6985|40480", "excontinue": None}, "extracts_search_0.json"),
    ({"prop": "extracts", "pageids": "24544|6985|40480", "excontinue": "1"}, "extracts_search_1.json"),
    ({"prop": "extracts", "pageids": "24544|6985|40480", "excontinue": "2"}, "extracts_search_2.json"),
    ({"prop": "extracts", "pageids": "24544"}, "extracts_photosynthesis_revised.json"),
    ({"prop": "info|pageprops", "titles": "|".join(TITLES)}, "info_titles.json"),
    ({"prop": "extracts", "pageids": "31717|23862", "exintro": "1"}, "extracts_titles_summary.json"),
    ({"list": "categorymembers", "cmtitle": "Category:Sorting algorithms", "cmcontinue": None},
     "category_sorting_algorithms_0.json"),
    ({"list": "categorymembers", "cmtitle": "Category:Sorting algorithms",
      "cmcontinue": "page|4d4552474520534f5254|20039"}, "category_sorting_algorithms_1.json"),
    ({"list": "categorymembers", "cmtitle": "Category:Comparison sorts"}, "category_comparison_sorts.json"),
    ({"list": "categorymembers", "cmtitle": "Category:Stable sorts"}, "category_stable_sorts.json"),
    ({"prop": "info|pageprops", "pageids": "3268249|20039|13996|23469556"}, "info_category.json"),
    ({"prop": "extracts", "pageids": "3268249|20039|13996|23469556"}, "extracts_category_summary.json"),
    ({"list": "categorymembers", "cmtitle": "Category:No such category"}, "category_empty.json"),
    ({"prop": "info", "titles": "Category:No such category"}, "info_missing_category.json"),
    ({"list": "search", "srsearch": "bad request"}, "error_badvalue.json"),
]


def route(params: dict[str, str]) -> tuple[int, str]:
    for wanted, name in ROUTES:
        if all(params.get(key) == value for key, value in wanted.items()):
            return 200, (DATA / name).read_text(encoding="utf-8")
    return 404, json.dumps({"no route": params})


class FakeMediaWiki:
    """Serves ROUTES; ``faults`` (a list of (status, body, headers), or of Responses) are
    answered first; ``fail(params)`` may answer any request instead (None: served)."""

    def __init__(self):
        self.requests: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        self.faults: list[tuple[int, str, dict] | Response] = []
        self.fail: Callable[[dict[str, str]], Response | None] = lambda params: None
        self.revisions: dict[int, int] = {}  # pageid -> a newer lastrevid to report

    def __call__(self, request: Request) -> Response:
        params = dict(request.args)
        self.requests.append(params)
        self.headers.append(dict(request.headers))
        if self.faults:
            fault = self.faults.pop(0)
            if isinstance(fault, Response):
                return fault
            status, body, headers = fault
            return Response(body, status=status, headers=headers, content_type="application/json")
        failed = self.fail(params)
        if failed is not None:
            return failed
        status, body = route(params)
        if self.revisions and params.get("prop") == "info|pageprops":
            data = json.loads(body)
            for page in data["query"]["pages"]:
                page["lastrevid"] = self.revisions.get(page.get("pageid"), page.get("lastrevid"))
            body = json.dumps(data)
        return Response(body, status=status, content_type="application/json; charset=utf-8")

    def calls(self, **match) -> list[dict[str, str]]:
        return [p for p in self.requests if all(p.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


@pytest.fixture
def wiki(httpserver):
    fake = FakeMediaWiki()
    httpserver.expect_request("/w/api.php").respond_with_handler(fake)
    fake.api_url = httpserver.url_for("/w/api.php")
    return fake


def source(api_url: str | None, **kw) -> WikipediaSource:
    kw.setdefault("user_agent", UA)
    kw.setdefault("retry_wait_seconds", 0.01)
    kw.setdefault("retries", 2)
    kw.setdefault("timeout_seconds", 5)
    return WikipediaSource(type="wikipedia", name=kw.pop("name", "wiki"), api_url=api_url, **kw)


def read(connector, **kw):
    return list(connector.fetch(**kw)), connector.report


# -- search, extracts continuation ----------------------------------------------------------
def test_search_follows_continuation_and_excontinue(wiki):
    connector = build_connector(source(wiki.api_url, search="photosynthesis", limit=3))
    assert isinstance(connector, Connector) and isinstance(connector, WikipediaConnector)
    ticks: list[int] = []
    records, report = read(connector, progress=ticks.append)
    assert [r.title for r in records] == ["Photosynthesis", "Chlorophyll", "Calvin cycle"]
    assert [r.external_id for r in records] == ["24544", "6985", "40480"]
    assert records[0].url == "https://en.wikipedia.org/wiki/Photosynthesis"
    assert records[0].text.startswith("Photosynthesis is a process")
    assert "Overview" in records[0].text and "==" not in records[0].text  # plain sections
    assert records[2].meta["lastrevid"] == 1275002211
    assert report.read == 3 and report.n_bad == 0 and sum(ticks) == 3
    # Search continued once (sroffset=2) and stopped at the limit; the whole texts came one
    # per answer through excontinue.
    assert len(wiki.calls(list="search")) == 2
    assert [c.get("excontinue") for c in wiki.calls(prop="extracts")] == [None, "1", "2"]
    assert all(c["formatversion"] == "2" and c["format"] == "json" for c in wiki.requests)
    assert wiki.calls(prop="extracts")[0]["explaintext"] == "1"
    assert wiki.headers[0]["User-Agent"].startswith(UA)  # the library appends its own name
    assert all(to_row(r, "wiki")["item_id"] for r in records)


def test_a_rerun_yields_the_same_records(wiki):
    first, _ = read(build_connector(source(wiki.api_url, search="photosynthesis", limit=3)))
    second, _ = read(build_connector(source(wiki.api_url, search="photosynthesis", limit=3)))
    assert first == second


def test_cursor_skips_unchanged_revisions_before_fetching_text(wiki):
    connector = build_connector(source(wiki.api_url, search="photosynthesis", limit=3))
    read(connector)
    cursor = connector.next_cursor
    assert cursor == {"24544": 1288113311, "6985": 1283345678, "40480": 1275002211}
    json.dumps(cursor)  # storable as is

    again = build_connector(source(wiki.api_url, search="photosynthesis", limit=3))
    extracts_before = len(wiki.calls(prop="extracts"))
    records, report = read(again, cursor=cursor)
    assert records == [] and report.n_bad == 0 and again.skipped_by_cursor == 3
    assert len(wiki.calls(prop="extracts")) == extracts_before  # no text fetched
    assert again.next_cursor == cursor

    wiki.revisions = {24544: 1288999999}  # Photosynthesis was edited
    edited = build_connector(source(wiki.api_url, search="photosynthesis", limit=3))
    records, _ = read(edited, cursor=cursor)
    assert [r.title for r in records] == ["Photosynthesis"]
    assert "(revised)" in records[0].text
    assert edited.next_cursor["24544"] == 1288999999 and edited.next_cursor["6985"] == 1283345678


# -- titles: normalised, redirected, missing, disambiguation, duplicate ---------------------
def test_titles_resolve_redirects_and_count_missing_and_disambiguation(wiki):
    connector = build_connector(source(wiki.api_url, titles=TITLES, content="summary"))
    assert connector.expected_total() == 5
    records, report = read(connector)
    assert [(r.title, r.external_id) for r in records] == [
        ("United Kingdom", "31717"), ("Python (programming language)", "23862")]
    assert records[0].meta["redirected_from"] == "UK"
    assert records[0].url == "https://en.wikipedia.org/wiki/United_Kingdom"
    assert records[1].text.startswith("Python is a high-level")
    assert dict(report.bad) == {"missing page": 1, "disambiguation page": 1}
    [extracts] = wiki.calls(prop="extracts")
    assert extracts["exintro"] == "1" and extracts["pageids"] == "31717|23862"
    assert wiki.calls(prop="info|pageprops")[0]["redirects"] == "1"


def test_titles_are_capped_by_limit(wiki):
    connector = build_connector(source(wiki.api_url, titles=TITLES, limit=2, content="summary"))
    assert connector.expected_total() == 2


# -- categories -------------------------------------------------------------------------------
def test_category_members_continue_and_descend_to_the_depth(wiki):
    connector = build_connector(source(
        wiki.api_url, category="Sorting algorithms", category_depth=1, limit=4, content="summary"))
    records, report = read(connector)
    assert [r.title for r in records] == ["Quicksort", "Merge sort", "Heapsort", "Timsort"]
    cm = wiki.calls(list="categorymembers")
    assert [c["cmtitle"] for c in cm] == [
        "Category:Sorting algorithms", "Category:Sorting algorithms", "Category:Comparison sorts"]
    assert cm[1]["cmcontinue"] == "page|4d4552474520534f5254|20039"
    assert cm[0]["cmnamespace"] == "0|14"  # articles and sub-categories only


def test_missing_category_is_a_source_error(wiki):
    connector = build_connector(source(wiki.api_url, category="Category:No such category"))
    with pytest.raises(SourceError, match="source wiki: Category:No such category does not exist"):
        read(connector)


# -- failures -------------------------------------------------------------------------------
def test_429_retry_after_is_honoured(wiki):
    wiki.faults = [(429, '{"error": "too many requests"}', {"Retry-After": "1"})]
    connector = build_connector(source(wiki.api_url, search="photosynthesis", limit=3))
    started = time.monotonic()
    records, _ = read(connector)
    assert len(records) == 3
    assert time.monotonic() - started >= 1.0  # waited what the server said, not 0.01 s


@pytest.mark.timeout(30)  # an unbounded wait would sleep for a day
def test_retry_after_beyond_the_cap_fails_at_once_saying_when_to_retry(wiki):
    wiki.faults = [(429, '{"error": "too many requests"}', {"Retry-After": "86400"})]
    slept: list[float] = []
    connector = WikipediaConnector(source(wiki.api_url, search="photosynthesis", retries=3), sleep=slept.append)
    started = time.monotonic()
    with pytest.raises(SourceError) as info:
        read(connector)
    host = wiki.api_url.split("/")[2]
    assert re.fullmatch(rf"source wiki: {re.escape(host)} asked to wait 86400 s \(Retry-After\), more than "
                        r"max_retry_wait_seconds = 120; retry after \d{4}-\d\d-\d\d \d\d:\d\d UTC", str(info.value))
    due = time.strptime(str(info.value).rsplit("retry after ", 1)[1], "%Y-%m-%d %H:%M UTC")
    assert 86400 <= time.mktime(due) - time.mktime(time.gmtime()) <= 86400 + 120
    assert slept == [] and len(wiki.requests) == 1 and time.monotonic() - started < 5


def test_retry_after_within_the_cap_is_waited_as_an_http_date_too(wiki):
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    wiki.faults = [(503, "busy", {"Retry-After": soon}), (429, "{}", {"Retry-After": "2"}), (503, "busy", {})]
    slept: list[float] = []
    connector = WikipediaConnector(source(wiki.api_url, search="photosynthesis", limit=3, retries=3,
                                          retry_wait_seconds=0.5, max_retry_wait_seconds=60), sleep=slept.append)
    records, _ = read(connector)
    assert len(records) == 3
    assert 28 <= slept[0] <= 31 and slept[1:] == [2.0, 2.0]  # the date, the seconds, then backoff 0.5 * 2**2


def test_the_default_endpoint_names_wikipedia_when_it_asks_for_too_long_a_wait():
    def handler(request: httpx.Request) -> httpx.Response:
        later = email.utils.formatdate(time.time() + 7200, usegmt=True)
        return httpx.Response(503, text="busy", headers={"Retry-After": later})

    settings = source(None, titles=["Mercury"], max_retry_wait_seconds=600)
    connector = WikipediaConnector(settings, transport=httpx.MockTransport(handler), sleep=lambda s: None)
    with pytest.raises(SourceError, match=r"^source wiki: Wikipedia asked to wait 7\d{3} s \(Retry-After\), more "
                                          r"than max_retry_wait_seconds = 600; retry after .* UTC$"):
        read(connector)


def test_an_answer_that_breaks_off_is_retried(wiki):
    truncated = Response('{"batchcomplete": true, "query"', content_type="application/json")
    truncated.headers["Content-Length"] = "400"  # longer than the body: the connection ends early
    wiki.faults = [truncated]
    slept: list[float] = []
    records, _ = read(WikipediaConnector(source(wiki.api_url, search="photosynthesis", limit=3), sleep=slept.append))
    assert len(records) == 3 and slept == [0.01]


def test_pages_read_before_a_failure_are_yielded_before_it(wiki):
    """Whole texts come one per answer: a failure at the third answer keeps the first two."""
    connector = build_connector(source(wiki.api_url, search="photosynthesis", limit=3, retries=0))
    got = []
    wiki.fail = lambda params: (Response("upstream error", status=500)
                                if params.get("prop") == "extracts" and params.get("excontinue") == "2" else None)
    with pytest.raises(SourceError, match="HTTP 500"):
        for record in connector.fetch():
            got.append(record.title)
    assert got == ["Photosynthesis", "Chlorophyll"]  # in search order, the third never came
    assert connector.next_cursor is None


def test_503_after_retries_is_one_line_naming_the_source(wiki):
    wiki.faults = [(503, "Service Unavailable", {})] * 3
    connector = build_connector(source(wiki.api_url, search="photosynthesis", retries=2))
    with pytest.raises(SourceError) as info:
        read(connector)
    message = str(info.value)
    assert message == f"source wiki: HTTP 503 from {wiki.api_url} after 2 retries"
    assert len(wiki.requests) == 3


def test_persistent_429_is_a_source_error(wiki):
    wiki.faults = [(429, "{}", {"Retry-After": "0"})] * 2
    connector = build_connector(source(wiki.api_url, search="photosynthesis", retries=1))
    with pytest.raises(SourceError, match=r"rate-limited by 127\.0\.0\.1:\d+ \(HTTP 429\) after 1 retry"):
        read(connector)


def test_malformed_json_is_a_source_error(wiki):
    wiki.faults = [(200, '{"batchcomplete": true, "query": {"search": [', {})]
    connector = build_connector(source(wiki.api_url, search="photosynthesis"))
    with pytest.raises(SourceError, match="source wiki: malformed JSON from http://127.0.0.1"):
        read(connector)


def test_api_error_answer_is_a_source_error(wiki):
    connector = build_connector(source(wiki.api_url, search="bad request"))
    with pytest.raises(SourceError) as info:
        read(connector)
    assert str(info.value) == (
        'source wiki: MediaWiki API error badvalue: Unrecognized value for parameter "list": serch.')


def test_unreachable_wiki_is_a_source_error():
    connector = build_connector(source("http://127.0.0.1:9/w/api.php", search="x", retries=1))
    with pytest.raises(SourceError, match="source wiki: cannot connect to http://127.0.0.1:9/w/api.php"):
        read(connector)


# -- the default endpoint, through the library's httpx transport seam -------------------------
def test_default_endpoint_is_the_language_wikipedia_through_transport():
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        status, body = route(dict(request.url.params))
        return httpx.Response(status, text=body, headers={"Content-Type": "application/json"})

    settings = source(None, titles=TITLES, language="de", content="summary")
    connector = WikipediaConnector(settings, transport=httpx.MockTransport(handler))
    records, _ = read(connector)
    assert len(records) == 2
    assert {(u.scheme, u.host, u.path) for u in seen} == {("https", "de.wikipedia.org", "/w/api.php")}
    assert default_endpoint("en") == "https://en.wikipedia.org/w/api.php"


# -- configuration ----------------------------------------------------------------------------
def config_error(tmp_path: Path, body: str) -> str:
    path = tmp_path / "alflow.toml"
    path.write_text('labels = ["a", "b"]\n' + textwrap.dedent(body), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_config_loads_a_wikipedia_source(tmp_path):
    path = tmp_path / "alflow.toml"
    path.write_text(textwrap.dedent(f"""
        labels = ["a", "b"]
        [[sources]]
        type = "wikipedia"
        name = "wp"
        search = "photosynthesis"
        user_agent = "{UA}"
        """), encoding="utf-8")
    [wp] = load_config(path, environ={}).sources
    assert isinstance(wp, WikipediaSource)
    assert (wp.language, wp.content, wp.limit, wp.category_depth, wp.api_url) == ("en", "text", 100, 0, None)
    assert wp.max_retry_wait_seconds == 120  # Retry-After is capped here too


@pytest.mark.parametrize("agent_line, expected", [
    ("", "Wikipedia requires a descriptive user agent with contact information"),
    ('user_agent = "python-requests/2.32.3"', "generic user agent"),
    ('user_agent = "Mozilla/5.0 (X11; Linux x86_64)"', "generic user agent"),
    ('user_agent = "my-classifier/0.1"', "no contact information"),
])
def test_user_agent_must_describe_and_give_a_contact(tmp_path, agent_line, expected):
    message = config_error(tmp_path, f"""
        [[sources]]
        type = "wikipedia"
        name = "wp"
        search = "x"
        {agent_line}
        """)
    assert "sources.0.wikipedia.user_agent" in message and expected in message


def test_two_selectors_are_an_error(tmp_path):
    message = config_error(tmp_path, f"""
        [[sources]]
        type = "wikipedia"
        name = "wp"
        search = "x"
        titles = ["Y"]
        user_agent = "{UA}"
        """)
    assert "sources.0.wikipedia.titles" in message
    assert "exactly one of search, titles or category (got search and titles)" in message


def test_no_selector_and_stray_depth_are_errors(tmp_path):
    message = config_error(tmp_path, f"""
        [[sources]]
        type = "wikipedia"
        name = "wp"
        user_agent = "{UA}"
        """)
    assert "sources.0.wikipedia.search" in message and "(got none)" in message
    message = config_error(tmp_path, f"""
        [[sources]]
        type = "wikipedia"
        name = "wp"
        search = "x"
        category_depth = 2
        user_agent = "{UA}"
        """)
    assert "sources.0.wikipedia.category_depth: only applies with category" in message


def test_unknown_key_and_bad_api_url(tmp_path):
    message = config_error(tmp_path, f"""
        [[sources]]
        type = "wikipedia"
        name = "wp"
        search = "x"
        user_agent = "{UA}"
        langauge = "de"
        """)
    assert "sources.0.wikipedia.langauge: unknown key" in message
    message = config_error(tmp_path, f"""
        [[sources]]
        type = "wikipedia"
        name = "wp"
        search = "x"
        user_agent = "{UA}"
        api_url = "wiki.example.org/api.php"
        """)
    assert "sources.0.wikipedia.api_url" in message and "http(s) URL" in message


def test_category_without_prefix_gets_one():
    assert source(None, category="Physics").category == "Category:Physics"
    assert source(None, category="Kategorie:Physik").category == "Kategorie:Physik"
