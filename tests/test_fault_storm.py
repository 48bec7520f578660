"""A fault storm: every service a network source reads answers badly for a while, then heals.

One threaded local server on 127.0.0.1 plays a MediaWiki API (the recorded payloads of
tests/test_wikipedia.py), Google News RSS, the Custom Search JSON API and the web site its
results link to (``localhost``, which the page fetcher is told is a public host, so that a
redirect from it to 127.0.0.1 is refused as it would be from the internet). For the first
``STORM_REQUESTS`` requests it answers a seeded mix of faults, per service: 429 with a
Retry-After within and far beyond the cap, 503 (one with a Retry-After date hours away),
answers later than the timeout, bodies cut short of their Content-Length, malformed
bodies, and (pages only) redirects to the cloud metadata address and to 127.0.0.1. Then
it answers cleanly. The ingest runs again and again, the sources concurrently as the
ingest flow runs them, until a run after the storm completes. Then the store must hold
exactly what a clean run stores (none twice, nothing from a private address), no retry
may have waited longer than ``max_retry_wait_seconds``, and the Custom Search key must
appear in no log line, output, error, database row or ``alflow status --json``.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import textwrap
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_config
from pytest_httpserver import HTTPServer
from test_google import CX, KEY, METADATA, article, loopback_only, public_localhost  # noqa: F401 - a fixture
from test_wikipedia import UA, FakeMediaWiki
from typer.testing import CliRunner
from werkzeug.wrappers import Request, Response

from alflow.config import load_config
from alflow.connectors import http as http_module
from alflow.flows.cli import app
from alflow.tasks.ingest import SourceFailed, ingest_source
from alflow.tasks.store import Store

DATA = Path(__file__).resolve().parent / "data"
SEED = 21
STORM_REQUESTS = 260  # requests answered by the storm, all services together
FAULT_SHARE = 0.45
TIMEOUT = 0.3  # timeout_seconds of every source; a late answer comes after twice that
CAP = 1.0  # max_retry_wait_seconds of every source
MAX_RUNS = 60
KEY_ENV = "STORM_CSE_KEY"
N_RESULTS = 12
# (fault, weight); the redirects only where a page is fetched.
FAULTS = [("429", 3), ("429 wait 1 s", 1), ("429 wait a day", 2), ("503", 3), ("503 wait 2 h", 1),
          ("late", 2), ("cut short", 2), ("malformed", 2)]
PAGE_FAULTS = [("redirect to metadata", 2), ("redirect to loopback", 2)]
MALFORMED = {"wiki": '{"batchcomplete": true, "query": {"pages": [',
             "cse": '{"items": [{"title": "Result 1", ',
             "pages": "\x00\x01<<< not a page >>>"}


def kinds(service: str) -> list[tuple[str, int]]:
    """The faults a service may answer, with their weights."""
    return FAULTS + (PAGE_FAULTS if service == "pages" else [])


class Storm:
    """The services; ``on`` starts the storm (a clean baseline runs with it off)."""

    def __init__(self, base: str):
        self.base = base
        self.port = base.rsplit(":", 1)[1]
        self.site = f"http://localhost:{self.port}"  # "public" (see public_localhost)
        self.wiki = FakeMediaWiki()
        self.on = False
        self.served = 0
        self.rng = {service: random.Random(f"{SEED}-{service}") for service in ("wiki", "rss", "cse", "pages")}
        # Each service's first faults are one of every kind, so none depends on how the
        # sources' requests interleave before the storm ends.
        self.first = {service: rng.sample([kind for kind, _ in kinds(service)], len(kinds(service)))
                      for service, rng in self.rng.items()}
        self.faults: Counter = Counter()
        self.key_quoted = 0
        self.paths: list[str] = []
        self.lock = threading.Lock()

    @property
    def over(self) -> bool:
        return self.served >= STORM_REQUESTS

    def fault(self, service: str) -> str | None:
        """The fault this request gets, if the storm is on; each service draws from its own
        seeded stream (one source reads it, one request at a time)."""
        with self.lock:
            if not self.on or self.over:
                return None
            self.served += 1
            rng = self.rng[service]
            if rng.random() >= FAULT_SHARE:
                return None
            first, weighted = self.first[service], kinds(service)
            kind = first.pop() if first else rng.choices([k for k, _ in weighted], [w for _, w in weighted])[0]
            self.faults[kind] += 1
            return kind

    def __call__(self, request: Request) -> Response:
        with self.lock:
            self.paths.append(request.path)
        service = {"/w/api.php": "wiki", "/rss/search": "rss", "/customsearch/v1": "cse"}.get(request.path, "pages")
        kind = self.fault(service)
        if kind == "late":
            time.sleep(2 * TIMEOUT)  # then answer, too late: the client has given up
        elif kind is not None:
            return self.faulty(kind, service, request)
        return self.clean(service, request)

    def faulty(self, kind: str, service: str, request: Request) -> Response:
        if kind.startswith("429"):
            wait = {"429": "0", "429 wait 1 s": "1", "429 wait a day": "86400"}[kind]
            # Google's quota errors quote the key: it must be redacted wherever it goes.
            key = request.headers.get("X-Goog-Api-Key", "")
            self.key_quoted += bool(key)
            body = ('{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Quota exceeded for '
                    f'key {key}"}}}}')
            return Response(body, status=429, headers={"Retry-After": wait}, content_type="application/json")
        if kind == "503":
            return Response("busy", status=503)
        if kind == "503 wait 2 h":
            return Response("busy", status=503,
                            headers={"Retry-After": email.utils.formatdate(time.time() + 7200, usegmt=True)})
        if kind == "cut short":
            response = Response("<html><body><p>Station report, part", content_type="text/html")
            response.headers["Content-Length"] = "4096"
            return response
        if kind == "malformed":
            if service == "rss":  # a feed cut mid-item, but whole as far as HTTP goes
                feed = self.feed()
                return Response(feed[: len(feed) * 3 // 5], content_type="application/xml; charset=utf-8")
            return Response(MALFORMED[service], content_type="text/html" if service == "pages" else "application/json")
        if kind == "redirect to metadata":
            return Response("", status=302, headers={"Location": METADATA})
        return Response("", status=302, headers={"Location": f"{self.base}/internal/secret.html"})

    def feed(self) -> str:
        body = (DATA / "google" / "news_glacier.rss").read_text(encoding="utf-8")
        return body.replace("https://news.google.com", self.base)

    def clean(self, service: str, request: Request) -> Response:
        if service == "wiki":
            return self.wiki(request)
        if service == "rss":
            return Response(self.feed(), content_type="application/xml; charset=utf-8")
        if service == "cse":
            start = int(request.args["start"])
            ranks = range(start, min(start + int(request.args["num"]), N_RESULTS + 1))
            items = [{"title": f"Station {r} report", "link": self.result_link(r), "snippet": f"Station {r}."}
                     for r in ranks]
            more = {"nextPage": [{"startIndex": ranks[-1] + 1}]} if ranks[-1] < N_RESULTS else {}
            return Response(json.dumps({"items": items, "queries": more}),
                            content_type="application/json")
        path = request.path
        if path == "/robots.txt":
            return Response("User-agent: *\nAllow: /\n", content_type="text/plain")
        if path.startswith("/go/"):
            return Response("", status=302, headers={"Location": f"/site/{path.rsplit('/', 1)[1]}.html"})
        if path.startswith("/site/"):
            n = int(path.rsplit("/", 1)[1].removesuffix(".html"))
            return Response(article(f"Station {n} report", n), content_type="text/html; charset=utf-8")
        if path == "/internal/secret.html":
            return Response(article("INTERNAL payroll of the storm test", 99), content_type="text/html")
        return Response("not found", status=404)

    def result_link(self, rank: int) -> str:
        # Every fourth result goes through a redirect on the same site, as trackers do.
        return f"{self.site}/go/{rank}" if rank % 4 == 0 else f"{self.site}/site/{rank}.html"


@pytest.fixture
def storm():
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)  # late answers must not hold the others
    server.start()
    services = Storm(server.url_for("/").rstrip("/"))
    server.expect_request(re.compile(".*")).respond_with_handler(services)
    yield services
    server.clear()
    server.stop()


def storm_config(directory: Path, storm: Storm) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "messages.csv"
    corpus.write_text("text,label\nhello there,ham\nwin a prize now,spam\n", encoding="utf-8")
    common = (f"timeout_seconds = {TIMEOUT}\nretries = 2\nretry_wait_seconds = 0.01\n"
              f"max_retry_wait_seconds = {CAP}\n")
    sources = textwrap.dedent(f"""
        [[sources]]
        type = "wikipedia"
        name = "wiki"
        search = "photosynthesis"
        limit = 3
        api_url = "{storm.base}/w/api.php"
        user_agent = "{UA}"
        """) + common + textwrap.dedent(f"""
        [[sources]]
        type = "google"
        name = "news"
        search = "glacier"
        rss_url = "{storm.base}/rss/search"
        """) + common + textwrap.dedent(f"""
        [[sources]]
        type = "google"
        name = "web"
        backend = "custom_search"
        search = "storm"
        cx = "{CX}"
        api_key_env = "{KEY_ENV}"
        endpoint = "{storm.base}/customsearch/v1"
        limit = {N_RESULTS}
        fetch_pages = true
        page_delay_seconds = 0
        """) + common
    return write_config(directory, labels=["ham", "spam"], source_path=corpus, extra=sources)


NETWORK = ("wiki", "news", "web")


def ingest_all(settings, run: str) -> dict:
    """Each network source's outcome (its report, or the SourceFailed that stopped it),
    the sources read concurrently as the ingest flow reads them."""
    with ThreadPoolExecutor(max_workers=len(NETWORK)) as pool:
        futures = {name: pool.submit(ingest_source, settings, name, f"{run}-{name}") for name in NETWORK}
    outcomes = {}
    for name, future in futures.items():
        try:
            outcomes[name] = future.result()
        except SourceFailed as exc:
            outcomes[name] = exc
    return outcomes


def stored(settings) -> list[tuple]:
    return Store(settings.database).query_df(
        "SELECT item_id, source, external_id, url, title, text, meta::VARCHAR FROM items ORDER BY item_id"
    ).values.tolist()


def dump(settings) -> str:
    """Every row of every table of the store, as text."""
    store = Store(settings.database)
    tables = store.query_df("SELECT table_name FROM information_schema.tables")["table_name"]
    return "\n".join(store.query_df(f'SELECT * FROM "{table}"').astype(str).to_csv() for table in tables)


def chained(error: BaseException) -> list[str]:
    seen = []
    while error is not None:
        seen.append(f"{error!r} {error}")
        error = error.__cause__ or error.__context__
    return seen


@pytest.mark.slow
def test_a_fault_storm_ends_with_what_a_clean_run_stores(tmp_path, storm, loopback_only, monkeypatch,
                                                         caplog, capfd):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setattr(http_module, "resolve_addresses", public_localhost)
    clean = load_config(storm_config(tmp_path / "clean", storm), environ={})
    Store(clean.database).migrate()
    baseline = ingest_all(clean, "clean")
    assert all(not isinstance(outcome, Exception) for outcome in baseline.values()), baseline
    expected = stored(clean)
    assert Counter(row[1] for row in expected) == {"wiki": 3, "news": 5, "web": N_RESULTS}

    config = storm_config(tmp_path / "storm", storm)
    settings = load_config(config, environ={})
    Store(settings.database).migrate()
    storm.on = True
    started = time.monotonic()
    errors: list[str] = []
    reasons: Counter = Counter()
    runs = 0
    while runs < MAX_RUNS:
        after_the_storm = storm.over
        outcomes = ingest_all(settings, f"run{runs}")
        runs += 1
        for outcome in outcomes.values():
            if isinstance(outcome, SourceFailed):
                errors.extend(chained(outcome) + [outcome.report.line()])
                reasons.update(outcome.report.bad_reasons)
            else:
                reasons.update(outcome.bad_reasons)
        if after_the_storm and not any(isinstance(o, SourceFailed) for o in outcomes.values()):
            break
    elapsed = time.monotonic() - started
    assert storm.over and runs < MAX_RUNS, (runs, storm.served, errors[-5:])

    # The storm did blow: every fault was served, sources stopped, pages were refused.
    assert set(storm.faults) == {kind for kind, _ in FAULTS + PAGE_FAULTS}, storm.faults
    assert any("asked to wait 86400 s (Retry-After), more than max_retry_wait_seconds = 1; retry after" in e
               for e in errors)
    assert sum(n for why, n in reasons.items() if "private address" in why) >= 1  # robots.txt: per page

    # What it left: exactly a clean run's items, none twice, nothing from a private address.
    assert stored(settings) == expected
    items = Store(settings.database).query_df("SELECT source, external_id, text FROM items")
    assert not items.duplicated(["source", "external_id"]).any()
    assert not items["text"].str.contains("INTERNAL").any()
    assert "/internal/secret.html" not in storm.paths and loopback_only == []

    # No wait beyond the cap: every retry's wait is logged, and a day-long one would show.
    waits = [float(m) for m in re.findall(r"retry \d+ of \d+ in ([\d.]+)s", caplog.text)]
    assert waits and max(waits) <= CAP
    assert elapsed < 50, elapsed

    # The key: in no log line, output, error, database row or `alflow status --json`.
    status = CliRunner().invoke(app, ["status", "--json", "--config", str(config)])
    assert status.exit_code == 0, status.output
    assert '"items": 20' in status.output
    out, err = capfd.readouterr()
    logged = [record.getMessage() for record in caplog.records] + [str(record.exc_info) for record in caplog.records]
    for place, text in {"log": "\n".join(logged), "output": out + err, "errors": "\n".join(errors),
                        "database": dump(settings), "status": status.output}.items():
        assert KEY not in text, place
    assert storm.key_quoted  # answers quoting the key were served (Google's quota errors do)
