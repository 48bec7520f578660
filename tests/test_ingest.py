"""The ingest flow over real connector types: local MediaWiki and Google servers on
127.0.0.1 (the recorded payloads of tests/test_wikipedia.py and tests/test_google.py), files,
one source failing, cursors stored and used, and an API key that must show up nowhere."""

from __future__ import annotations

import json
import logging
import re
import textwrap
from pathlib import Path
from uuid import UUID

import pandas as pd
import pytest
from conftest import write_config
from test_google import CX, KEY, FakeGoogle
from test_google import DATA as GOOGLE_DATA
from test_wikipedia import UA, FakeMediaWiki
from typer.testing import CliRunner
from werkzeug.wrappers import Request, Response

from alflow.config import load_config
from alflow.connectors import Record, SourceError
from alflow.flows.cli import app
from alflow.tasks import ingest as ingest_module
from alflow.tasks.ingest import IngestReport, SourceFailed, ingest_source
from alflow.tasks.store import Store

runner = CliRunner()
KEY_ENV = "TEST_INGEST_CSE_KEY"
NEWER_ITEM = (
    "<item><title>Glacier collapse closes an Alpine pass - Alpine Times</title>"
    "<link>https://news.google.com/rss/articles/CBMiNewerGlacierCollapse?oc=5</link>"
    '<guid isPermaLink="false">CBMiNewerGlacierCollapse</guid>'
    "<pubDate>Wed, 07 May 2025 08:00:00 GMT</pubDate>"
    '<source url="https://www.alpinetimes.example">Alpine Times</source></item>'
)


class Services:
    """One local server: a MediaWiki API at /w/api.php, Google News RSS and Custom Search."""

    def __init__(self, base: str):
        self.base = base
        self.wiki = FakeMediaWiki()
        self.google = FakeGoogle(base)
        self.news_down = False  # answer 503 to every RSS request
        self.news_extra = ""  # an <item> added to the top of the feed
        self.texts_down = False  # answer 500 to every TextExtracts request
        self.quota_from: int | None = None  # Custom Search answers 429 from this start index on

    def __call__(self, request: Request) -> Response:
        if request.path == "/customsearch/v1" and self.quota_from and int(request.args["start"]) >= self.quota_from:
            return Response((GOOGLE_DATA / "cse_error_429.json").read_text(), status=429,
                            content_type="application/json")
        if request.path == "/w/api.php" and self.texts_down and request.args.get("prop") == "extracts":
            return Response("upstream error", status=500)
        if request.path == "/w/api.php":
            return self.wiki(request)
        if request.path == "/rss/search" and self.news_down:
            self.google.requests.append((0.0, request.path, dict(request.args), dict(request.headers)))
            return Response("busy", status=503)
        if request.path == "/rss/search" and self.news_extra:
            body = (GOOGLE_DATA / "news_glacier.rss").read_text(encoding="utf-8")
            body = body.replace("https://news.google.com", self.base).replace("<item>", self.news_extra + "<item>", 1)
            return Response(body, content_type="application/xml; charset=utf-8")
        return self.google(request)


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


@pytest.fixture
def services(httpserver):
    fake = Services(httpserver.url_for("/").rstrip("/"))
    httpserver.expect_request(re.compile(".*")).respond_with_handler(fake)
    return fake


def sources_toml(base: str) -> str:
    return textwrap.dedent(f"""
        [[sources]]
        type = "wikipedia"
        name = "wiki"
        search = "photosynthesis"
        limit = 3
        api_url = "{base}/w/api.php"
        user_agent = "{UA}"
        retries = 1
        retry_wait_seconds = 0.01

        [[sources]]
        type = "google"
        name = "news"
        search = "glacier"
        rss_url = "{base}/rss/search"
        retries = 1
        retry_wait_seconds = 0

        [[sources]]
        type = "google"
        name = "cse"
        backend = "custom_search"
        search = "glacier mass balance"
        cx = "{CX}"
        api_key_env = "{KEY_ENV}"
        endpoint = "{base}/customsearch/v1"
        limit = 12
        retries = 0

        [[sources]]
        type = "files"
        name = "first_copy"
        path = "messages.csv"
        label_column = "label"
        """)


def messages_csv(directory: Path, n: int = 40) -> Path:
    path = directory / "messages.csv"
    pd.DataFrame({"text": [f"message number {i} about glaciers" for i in range(n)],
                  "label": ["ham", "spam"] * (n // 2)}).to_csv(path, index=False)
    return path


def invoke(*args: str):
    return runner.invoke(app, ["ingest", *args])


def output_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def latest_run(config: Path, flow: str = "ingest"):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=30)
        mine = [run for run in runs if run.parameters.get("config_path") in (str(config), str(config.resolve()))
                and client.read_flow(run.flow_id).name == flow]
        return mine[0]


def run_logs_and_artifacts(run_id: UUID) -> tuple[list[str], dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return [log.message for log in logs], {a.key: a for a in artifacts if a.key}


def cursors(store: Store) -> dict:
    frame = store.query_df("SELECT source, cursor FROM source_cursors ORDER BY source")
    return {row.source: json.loads(row.cursor)["value"] for row in frame.itertuples()}


# -- the flow through `alflow ingest`, end to end ---------------------------------------------
@pytest.mark.slow
def test_one_failing_source_stops_none_of_the_others_and_cursors_make_reruns_cheap(
        tmp_path, services, prefect_api, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="prefect")  # run logs at INFO reach the Prefect API too
    caplog.set_level(logging.DEBUG, logger="alflow")
    monkeypatch.setenv(KEY_ENV, KEY)
    csv_path = messages_csv(tmp_path)
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=csv_path,
                          extra=sources_toml(services.base))
    store = Store(tmp_path / "state" / "alflow.duckdb")

    # 1. News answers 503 until its retry is spent; Custom Search refuses the key, quoting it.
    services.news_down = True
    refusal = json.loads((GOOGLE_DATA / "cse_error_403.json").read_text())
    refusal["error"]["message"] = f"API key {KEY} is not allowed to use this project."
    services.google.faults = [(403, json.dumps(refusal), {})]
    result = invoke("--config", str(config), "--no-progress")
    assert result.exit_code == 1, result.output
    host = services.base.removeprefix("http://")
    assert output_lines(result) == [
        "wiki: 3 read, 3 new, 0 duplicates, 0 failed",
        f"error: source news: Google News RSS answered HTTP 503 ({host})",
        ("error: source cse: Custom Search API refused access or the daily quota is spent "
         "(HTTP 403 PERMISSION_DENIED): API key *** is not allowed to use this project."),
        "first_copy: 40 read, 40 new, 0 duplicates, 0 failed",
        "corpus: 40 read, 0 new, 40 duplicates, 0 failed",  # the same file: deduplicated across sources
    ]
    assert sum(path == "/rss/search" for path in services.google.paths()) == 2  # retried once
    assert store.scalar("SELECT count(*) FROM items") == 43
    assert dict(store.query_df("SELECT source, count(*) AS n FROM items GROUP BY source").values) == \
        {"wiki": 3, "first_copy": 40}
    assert sorted(store.query_df("SELECT source FROM ingests")["source"]) == ["corpus", "first_copy", "wiki"]
    # the failed sources left none (a files source's cursor is its file's fingerprint)
    assert list(cursors(store)) == ["corpus", "first_copy", "wiki"]

    run = latest_run(config)
    assert run.state.is_failed()
    assert run.state.message.startswith("2 of 5 sources failed: source news: ")
    assert "; source cse: " in run.state.message
    logs, artifacts = run_logs_and_artifacts(run.id)
    table = json.loads(artifacts["ingest-report"].data)
    assert [(r["source"], r["status"], r["read"], r["new"], r["duplicates"], r["failed"]) for r in table] == [
        ("wiki", "ok", 3, 3, 0, 0), ("news", "failed", 0, 0, 0, 0), ("cse", "failed", 0, 0, 0, 0),
        ("first\\_copy", "ok", 40, 40, 0, 0), ("corpus", "ok", 40, 0, 40, 0)]
    assert "HTTP 503" in table[1]["error"] and "\\*\\*\\*" in table[2]["error"]
    assert "2 failed: news, cse" in artifacts["ingest-report"].description
    assert any("wiki: 3 read, 3 new" in line for line in logs)
    assert any("source news: Google News RSS answered HTTP 503" in line for line in logs)
    assert any("source cse: Custom Search API refused access" in line for line in logs)
    key_seen = [KEY in result.output, KEY in run.state.message, any(KEY in line for line in logs),
                KEY in artifacts["ingest-report"].data, KEY in caplog.text]
    assert key_seen == [False] * 5
    assert any(headers.get("X-Goog-Api-Key") == KEY for _, headers in services.google.api_calls())  # it was used

    # 2. Every service answers: the wiki cursor skips the three pages (no text is fetched again).
    services.news_down = False
    extracts_before = len(services.wiki.calls(prop="extracts"))
    result = invoke("--config", str(config), "--no-progress")
    assert result.exit_code == 0, result.output
    assert output_lines(result) == [
        "wiki: 0 read, 0 new, 0 duplicates, 0 failed, 3 seen before (skipped)",
        "news: 5 read, 5 new, 0 duplicates, 0 failed",
        "cse: 12 read, 12 new, 0 duplicates, 0 failed",
        "first_copy: 40 read, 0 new, 40 duplicates, 0 failed",
        "corpus: 40 read, 0 new, 40 duplicates, 0 failed",
    ]
    assert len(services.wiki.calls(prop="extracts")) == extracts_before
    stored = cursors(store)
    assert stored["news"] == "2025-05-06T12:15:00Z" and len(stored["cse"]) == 12
    assert latest_run(config).state.is_completed()

    # 3. A re-run with the same config adds nothing; news keeps only its boundary item.
    items = store.scalar("SELECT count(*) FROM items")
    result = invoke("--config", str(config), "--no-progress")
    assert result.exit_code == 0 and store.scalar("SELECT count(*) FROM items") == items == 60
    assert output_lines(result)[:3] == [
        "wiki: 0 read, 0 new, 0 duplicates, 0 failed, 3 seen before (skipped)",
        "news: 1 read, 0 new, 1 duplicates, 0 failed, 4 seen before (skipped)",
        "cse: 0 read, 0 new, 0 duplicates, 0 failed, 12 seen before (skipped)",
    ]

    # 4. Newer news arrives; one source alone; --full reads the wiki pages again (deduplicated).
    services.news_extra = NEWER_ITEM
    result = invoke("--config", str(config), "--no-progress", "--source", "news")
    assert output_lines(result) == ["news: 2 read, 1 new, 1 duplicates, 0 failed, 4 seen before (skipped)"]
    assert cursors(store)["news"] == "2025-05-07T08:00:00Z"
    result = invoke("--config", str(config), "--no-progress", "--source", "wiki", "--full")
    assert output_lines(result) == ["wiki: 3 read, 0 new, 3 duplicates, 0 failed"]
    assert len(services.wiki.calls(prop="extracts")) > extracts_before
    assert store.scalar("SELECT count(*) FROM items") == 61

    # 5. An unknown source: one line naming the configured ones, nothing run.
    result = invoke("--config", str(config), "--source", "wikipedia")
    assert result.exit_code == 1
    assert output_lines(result) == [
        (f"error: --source wikipedia: no such source in {config.resolve()} "
         "(configured: wiki, news, cse, first_copy, corpus)")]


# -- the cycle: what it does when sources fail ------------------------------------------------
@pytest.mark.slow
def test_the_cycle_goes_on_when_some_sources_fail_and_fails_when_all_do(tmp_path, services, prefect_api, small_csv):
    from alflow.flows.cycle import active_learning_cycle
    from alflow.flows.ingest import IngestFailed

    services.news_down = True
    news = textwrap.dedent(f"""
        [[sources]]
        type = "google"
        name = "news"
        search = "glacier"
        rss_url = "{services.base}/rss/search"
        retries = 0
        """)
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=small_csv, extra=news)
    summary = active_learning_cycle(str(config), auto=True)
    assert summary["cycle"] == 1 and summary["n_labels"] == 19  # the files source was enough (20 answers, 1 control)
    run = latest_run(config)
    assert run.state.is_failed() and run.state.message.startswith("1 of 2 sources failed: source news: ")
    cycle = latest_run(config, "active-learning-cycle")
    assert cycle.state.is_completed()
    logs, _ = run_logs_and_artifacts(cycle.id)
    assert any(line.startswith("ingest: 1 of 2 sources failed: source news: Google News RSS answered HTTP 503")
               and line.endswith("; the cycle goes on with the items stored") for line in logs)

    config.write_text(config.read_text().replace(small_csv.as_posix(), (tmp_path / "gone.csv").as_posix()))
    with pytest.raises(IngestFailed, match=r"^2 of 2 sources failed: source news: Google News RSS answered "
                                           r"HTTP 503 .*; source corpus: .*gone\.csv does not exist$"):
        active_learning_cycle(str(config), auto=True)


# -- ingest_source: cursors and transactions, without Prefect ---------------------------------
def wiki_settings(tmp_path: Path, base: str, **changes):
    return source_settings(tmp_path, base, 1, **changes)


def source_settings(tmp_path: Path, base: str, n: int, **changes):
    """A config (in ``tmp_path``) of the files source and the n-th source of sources_toml."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    extra = sources_toml(base).split("[[sources]]")[n]
    for key, value in changes.items():
        line = f"{key} = {value}"
        extra = re.sub(rf"(?m)^{key} = .*$", line, extra) if f"\n{key} = " in extra else extra + line + "\n"
    path = messages_csv(tmp_path)
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=path, extra="[[sources]]" + extra)
    settings = load_config(config, environ={})
    Store(settings.database).migrate()
    return settings


def test_the_cursor_is_used_unless_full_or_the_query_changed(tmp_path, services):
    settings = wiki_settings(tmp_path, services.base)
    first = ingest_source(settings, "wiki", "ingest-1")
    assert (first.read, first.new, first.skipped) == (3, 3, 0)
    store = Store(settings.database)
    stored = store.source_cursor("wiki")
    assert stored.value == {"24544": 1288113311, "6985": 1283345678, "40480": 1275002211}
    assert stored.ingest_id == "ingest-1"

    texts = len(services.wiki.calls(prop="extracts"))
    again = ingest_source(settings, "wiki", "ingest-2")
    assert (again.read, again.new, again.skipped) == (0, 0, 3)
    assert len(services.wiki.calls(prop="extracts")) == texts  # asked only for what is new: nothing
    assert store.source_cursor("wiki").ingest_id == "ingest-2"

    full = ingest_source(settings, "wiki", "ingest-3", full=True)
    assert (full.read, full.new, full.duplicate, full.skipped) == (3, 0, 3, 0)

    # A changed query must not inherit the old one's cursor; a changed timeout may.
    slower = wiki_settings(tmp_path, services.base, timeout_seconds=60)
    assert ingest_source(slower, "wiki", "ingest-4").skipped == 3
    summaries = wiki_settings(tmp_path, services.base, content='"summary"')
    report = ingest_source(summaries, "wiki", "ingest-5")
    assert (report.read, report.skipped) == (3, 0)
    assert services.wiki.calls(prop="extracts")[-1]["exintro"] == "1"


def test_a_failed_fetch_stores_no_cursor_and_reports_what_it_stored(tmp_path, services):
    settings = wiki_settings(tmp_path, services.base)
    services.texts_down = True
    with pytest.raises(SourceFailed) as info:
        ingest_source(settings, "wiki", "ingest-1")
    assert isinstance(info.value, SourceError)
    assert str(info.value) == f"source wiki: HTTP 500 from {services.base}/w/api.php after 1 retry"
    assert info.value.report.error == str(info.value)
    store = Store(settings.database)
    assert store.source_cursor("wiki") is None and store.scalar("SELECT count(*) FROM ingests") == 0


def stored_items(settings) -> list[tuple]:
    """Every stored item but when and by which run it was fetched, in item_id order."""
    return Store(settings.database).query_df(
        "SELECT item_id, source, external_id, url, title, text, meta::VARCHAR FROM items ORDER BY item_id"
    ).values.tolist()


def test_a_search_that_stops_at_page_two_keeps_page_one_and_the_next_run_completes_it(
        tmp_path, services, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    clean = source_settings(tmp_path / "clean", services.base, 3)
    ingest_source(clean, "cse", "clean-1")
    settings = source_settings(tmp_path / "quota", services.base, 3)

    services.quota_from = 11  # the daily quota runs out at the second page of ten results
    with pytest.raises(SourceFailed) as info:
        ingest_source(settings, "cse", "ingest-1")
    assert str(info.value).startswith("source cse: Custom Search API quota exceeded (HTTP 429 RESOURCE_EXHAUSTED)")
    assert info.value.report.line().endswith("(10 read, 10 new, 0 duplicates before it stopped)")
    store = Store(settings.database)
    assert store.scalar("SELECT count(*) FROM items WHERE source = 'cse'") == 10  # the first page, kept
    assert store.source_cursor("cse") is None  # not moved past the second page, never read

    services.quota_from = None  # the next day
    report = ingest_source(settings, "cse", "ingest-2")
    assert (report.read, report.new, report.duplicate) == (12, 2, 10)
    assert stored_items(settings) == stored_items(clean)  # as a clean run, none twice
    assert len(store.source_cursor("cse").value) == 12


def test_a_wiki_that_fails_at_its_third_text_keeps_the_first_two(tmp_path, services):
    clean = source_settings(tmp_path / "clean", services.base, 1)
    ingest_source(clean, "wiki", "clean-1")
    settings = source_settings(tmp_path / "failing", services.base, 1)
    services.wiki.fail = lambda params: (Response("upstream error", status=500)
                                         if params.get("excontinue") == "2" else None)
    with pytest.raises(SourceFailed) as info:
        ingest_source(settings, "wiki", "ingest-1")
    assert info.value.report.line() == (f"source wiki: HTTP 500 from {services.base}/w/api.php after 1 retry "
                                        "(2 read, 2 new, 0 duplicates before it stopped)")
    store = Store(settings.database)
    assert sorted(store.query_df("SELECT title FROM items WHERE source = 'wiki'")["title"]) == [
        "Chlorophyll", "Photosynthesis"]
    assert store.source_cursor("wiki") is None

    services.wiki.fail = lambda params: None
    report = ingest_source(settings, "wiki", "ingest-2")
    assert (report.read, report.new, report.duplicate) == (3, 1, 2)
    assert stored_items(settings) == stored_items(clean)


class ListConnector:
    """A connector of given records whose fetch leaves ``next_cursor``."""

    def __init__(self, records, next_cursor):
        from alflow.connectors import FetchReport

        self.name, self.report, self.records = "corpus", FetchReport(), records
        self.next_cursor, self._cursor, self.skipped_by_cursor, self.given = None, next_cursor, 0, []

    def expected_total(self):
        return len(self.records)

    def fetch(self, progress=None, cursor=None):
        self.given.append(cursor)
        for record in self.records:
            self.report.read += 1
            yield record
        self.next_cursor = self._cursor


def test_the_cursor_is_written_with_the_last_chunk_or_not_at_all(tmp_path, monkeypatch):
    settings = load_config(write_config(tmp_path, labels=["ham", "spam"], source_path=messages_csv(tmp_path)),
                           environ={})
    store = Store(settings.database)
    store.migrate()
    monkeypatch.setattr(ingest_module, "WRITE_CHUNK", 4)
    records = [Record(text=f"record {i}", gold_label="ham") for i in range(10)]

    # A cursor that cannot be stored rolls back the last chunk (records 9-10) and the
    # ingests row with it: the earlier chunks were complete and stay.
    unstorable = ListConnector(records, {"newest": object()})
    monkeypatch.setattr(ingest_module, "build_connector", lambda source: unstorable)
    with pytest.raises(TypeError):
        ingest_source(settings, "corpus", "ingest-1")
    assert store.scalar("SELECT count(*) FROM items") == 8
    assert store.scalar("SELECT count(*) FROM ingests") == 0 and store.source_cursor("corpus") is None

    good = ListConnector(records, {"newest": 10})
    monkeypatch.setattr(ingest_module, "build_connector", lambda source: good)
    report = ingest_source(settings, "corpus", "ingest-2")
    assert (report.read, report.new, report.duplicate) == (10, 2, 8)
    assert store.source_cursor("corpus").value == {"newest": 10}
    assert store.scalar("SELECT n_new FROM ingests WHERE ingest_id = 'ingest-2'") == 2
    again = ListConnector(records, {"newest": 11})
    monkeypatch.setattr(ingest_module, "build_connector", lambda source: again)
    ingest_source(settings, "corpus", "ingest-3")
    assert again.given == [{"newest": 10}]


def test_report_lines():
    ok = IngestReport("wiki", read=5, new=3, duplicate=1, bad=2, bad_reasons={"missing page": 1, "empty text": 1},
                      skipped=4)
    assert ok.line() == ("wiki: 5 read, 3 new, 1 duplicates, 2 failed (1 empty text, 1 missing page), "
                         "4 seen before (skipped)")
    stopped = IngestReport("big", read=7000, new=5000, error="source big: HTTP 503 from host")
    assert stopped.line() == "source big: HTTP 503 from host (7000 read, 5000 new, 0 duplicates before it stopped)"
    assert IngestReport("f", error="source f: x.csv does not exist").line() == "source f: x.csv does not exist"


def test_no_sources_names_the_table_to_add(tmp_path, monkeypatch):
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=messages_csv(tmp_path))
    monkeypatch.setenv("ALFLOW_SOURCES", "[]")
    result = invoke("--config", str(config))
    assert result.exit_code == 0, result.output
    assert "add a [[sources]] table" in result.output  # not eaten as console markup


# -- a file: chunks written while the next is read, and a file read before is not read again ----
def messy_csv(path: Path, extra: bytes = b"") -> Path:
    path.write_bytes(
        b"title,text,label,note\n"
        b"Glacier,Glacier retreats   again,0,\n"
        b"Glacier,Glacier retreats again ,0,dup by spacing\n"     # a duplicate: same title and text
        b",Volcano wakes up,1,\n"
        b"Caf\xe9,\"bad byte \xff here\",1,\n"                     # undecodable
        b"Empty,   ,0,\n"                                           # empty text
        b"a,b,0,c,too many\n"                                       # malformed
        b"Storm,Storm in the north,1,x\n"
        b"Storm,Storm in the north,1,y\n"                           # a duplicate
        b"Rain,Rain all week,0,\n"
        + extra
    )
    return path


def test_a_file_is_read_in_chunks_and_an_unchanged_file_is_not_read_again(tmp_path, monkeypatch):
    """Python's reader (the file has a byte that does not decode, which DuckDB's reader
    would read otherwise; tests/test_files_sql_ingest.py has DuckDB's)."""
    from alflow.connectors import content_hash
    from alflow.connectors.files import FilesConnector

    path = messy_csv(tmp_path / "messy.csv")
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=path, title_column="title")
    config.write_text(config.read_text() + 'label_map = { 0 = "ham", 1 = "spam" }\n')
    settings = load_config(config, environ={})
    store = Store(settings.database)
    store.migrate()
    monkeypatch.setattr(ingest_module, "WRITE_CHUNK", 2)  # several chunks, each its own transaction

    first = ingest_source(settings, "corpus", "ingest-1")
    assert first.line() == ("corpus: 6 read, 4 new, 2 duplicates, 3 failed "
                            "(1 empty text, 1 malformed CSV row, 1 undecodable as utf-8: set encoding)")
    items = store.query_df("SELECT item_id, title, text, gold_label, meta::VARCHAR AS meta, ingest_run "
                           "FROM items ORDER BY text")
    assert items["text"].tolist() == ["Glacier retreats again", "Rain all week", "Storm in the north",
                                      "Volcano wakes up"]
    assert items["item_id"].tolist()[:2] == [content_hash("Glacier retreats again", "Glacier"),
                                             content_hash("Rain all week", "Rain")]
    assert items["gold_label"].tolist() == ["ham", "ham", "spam", "spam"]  # label_map applied
    assert items["meta"].tolist() == ["{}", "{}", '{"note": "x"}', "{}"]  # the first copy is kept
    assert items["title"].isna().tolist() == [False, False, False, True]

    # The same bytes again: the counts of a read, nothing read and nothing written.
    def no_read(self, progress=None):
        raise AssertionError("an unchanged file was read again")

    with monkeypatch.context() as patched:
        patched.setattr(FilesConnector, "fetch", no_read)
        again = ingest_source(settings, "corpus", "ingest-2")
    assert again.line() == ("corpus: 6 read, 0 new, 6 duplicates, 3 failed "
                            "(1 empty text, 1 malformed CSV row, 1 undecodable as utf-8: set encoding)")
    assert store.scalar("SELECT count(*) FROM items WHERE ingest_run = 'ingest-2'") == 0
    assert store.query_df("SELECT n_read, n_new, n_duplicate, n_bad FROM ingests WHERE ingest_id = 'ingest-2'"
                          ).values.tolist() == [[6, 0, 6, 3]]
    # --full reads it again: the same counts, from the rows
    assert ingest_source(settings, "corpus", "ingest-3", full=True).line() == again.line()

    # A changed file is read again; so is one under classes its gold labels were not checked against.
    reads, fetch = [], FilesConnector.fetch
    monkeypatch.setattr(FilesConnector, "fetch", lambda self, progress=None: reads.append(1) or fetch(self, progress))
    messy_csv(path, extra=b"Snow,Snow at last,1,\n")
    assert ingest_source(settings, "corpus", "ingest-4").line().startswith("corpus: 7 read, 1 new, 6 duplicates")
    wider = write_config(tmp_path, labels=["ham", "spam", "other"], source_path=path, title_column="title")
    wider.write_text(wider.read_text() + 'label_map = { 0 = "ham", 1 = "spam" }\n')
    assert ingest_source(load_config(wider, environ={}), "corpus", "ingest-5").line().startswith(
        "corpus: 7 read, 0 new, 7 duplicates")
    assert store.scalar("SELECT count(*) FROM items") == 5 and len(reads) == 2


def test_a_source_that_stops_counts_every_chunk_it_stored(tmp_path, monkeypatch):
    """Chunks are written by another thread while the next is read: the one being written
    when the source stops is stored and counted too."""
    settings = load_config(write_config(tmp_path, labels=["ham", "spam"], source_path=messages_csv(tmp_path)),
                           environ={})
    Store(settings.database).migrate()
    monkeypatch.setattr(ingest_module, "WRITE_CHUNK", 4)

    class Stopping(ListConnector):
        def fetch(self, progress=None, cursor=None):
            yield from super().fetch(progress, cursor)
            raise SourceError("source corpus: connection lost")

    stopping = Stopping([Record(text=f"record {i}", gold_label="ham") for i in range(10)], None)
    monkeypatch.setattr(ingest_module, "build_connector", lambda source: stopping)
    with pytest.raises(SourceFailed) as info:
        ingest_source(settings, "corpus", "ingest-1")
    assert info.value.report.line() == "source corpus: connection lost (10 read, 8 new, 0 duplicates before it stopped)"
    assert Store(settings.database).scalar("SELECT count(*) FROM items") == 8
