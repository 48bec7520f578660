"""The YouTube connector through yt-dlp's real YoutubeDL, with recorded extractor output.

yt-dlp runs as it does for users - ``extract_info``, flat playlist processing, format and
subtitle handling, errors wrapped into ``DownloadError`` - but its extractors are
replaced by ones that return recorded info dicts of the shape yt-dlp's YouTube extractors
return (tests/data/youtube), with the subtitle and video URLs pointing at a local server.
That server serves real-format WebVTT (auto-caption rolling lines, ``<c>`` tags) and json3,
and records any request for video data (there must be none).
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yt_dlp
from werkzeug.wrappers import Request, Response
from yt_dlp.extractor.common import InfoExtractor, SearchInfoExtractor
from yt_dlp.utils import ExtractorError

from alflow.config import ConfigError, load_config
from alflow.config.sources import YouTubeSource
from alflow.connectors import Connector, SourceError, build_connector
from alflow.connectors.youtube import (
    YouTubeConnector,
    collapse_repeats,
    failure_reason,
    json3_lines,
    pick_subtitle,
    subtitle_text,
    vtt_lines,
)

DATA = Path(__file__).resolve().parent / "data" / "youtube"
ERRORS = json.loads((DATA / "errors.json").read_text(encoding="utf-8"))
GLACIERS = ("so today we're going to talk about how glaciers store ice & fresh water "
            "and why they are shrinking")


# -- recorded extractors ----------------------------------------------------------------------
class Recorded:
    base = ""  # the local server, set by the fixture
    extracted: list[str] = []


def to_local(url: str) -> str:
    parts = urlsplit(url)
    return f"{Recorded.base}{parts.path}?{parts.query}"


class YoutubeIE(InfoExtractor):
    """Stands in for yt-dlp's YoutubeIE (same ie_key and IE_NAME): recorded info dicts."""

    IE_NAME = "youtube"
    _VALID_URL = r"https?://(?:www\.)?youtube\.com/(?:watch\?v=|shorts/)(?P<id>[0-9A-Za-z_-]{11})"

    def _real_extract(self, url):
        video_id = self._match_id(url)
        Recorded.extracted.append(video_id)
        if video_id in ERRORS:
            raise ExtractorError(ERRORS[video_id], expected=True)
        info = json.loads((DATA / "videos" / f"{video_id}.info.json").read_text(encoding="utf-8"))
        for fmt in info["formats"]:
            fmt["url"] = to_local(fmt["url"])
        for key in ("subtitles", "automatic_captions"):
            for tracks in info[key].values():
                for track in tracks:
                    track["url"] = to_local(track["url"])
        return info


class YoutubeSearchIE(SearchInfoExtractor):
    IE_NAME = "youtube:search"
    _SEARCH_KEY = "ytsearch"

    def _search_results(self, query):
        path = DATA / f"search_{query}.json"
        if not path.exists():  # how a throttled search fails in yt-dlp
            raise ExtractorError("Unable to download API page: HTTP Error 429: Too Many Requests "
                                 "(caused by <HTTPError 429: Too Many Requests>)")
        yield from json.loads(path.read_text(encoding="utf-8"))


class YoutubeTabIE(InfoExtractor):
    IE_NAME = "youtube:tab"
    _VALID_URL = r"https?://(?:www\.)?youtube\.com/(?P<id>@[\w.-]+)$"

    def _real_extract(self, url):
        handle = self._match_id(url)
        data = json.loads((DATA / f"channel_{handle[1:]}.json").read_text(encoding="utf-8"))
        # As yt-dlp's YoutubeTabIE: each tab a playlist carrying its extractor and URL.
        tabs = [{**self.playlist_result(entries, data["id"], f"{data['title']} - {name}"),
                 "extractor_key": "YoutubeTab", "extractor": self.IE_NAME,
                 "webpage_url": f"{url}/{name.lower()}"}
                for name, entries in data["tabs"].items()]
        return self.playlist_result(tabs, data["id"], data["title"])


class RecordedYoutubeDL(yt_dlp.YoutubeDL):
    def __init__(self, params):
        self.given_params = params
        super().__init__({**params, "cachedir": False}, auto_init=False)
        for ie in (YoutubeIE, YoutubeSearchIE, YoutubeTabIE):
            self.add_info_extractor(ie())


# -- the local server -------------------------------------------------------------------------
class TimedText:
    def __init__(self):
        self.requests: list[str] = []
        self.faults: list[tuple[int, dict]] = []

    def __call__(self, request: Request) -> Response:
        self.requests.append(request.full_path)
        if request.path == "/videoplayback":
            return Response("no video here", status=403)
        if self.faults:
            status, headers = self.faults.pop(0)
            return Response("", status=status, headers=headers)
        args = request.args
        path = DATA / "subs" / f"{args['v']}.{args['lang']}.{args['fmt']}"
        if not path.exists() or args.get("tlang"):
            return Response("", status=404)
        kind = "application/json" if args["fmt"] == "json3" else "text/vtt"
        return Response(path.read_bytes(), content_type=f"{kind}; charset=UTF-8")

    def paths(self, prefix: str) -> list[str]:
        return [p for p in self.requests if p.startswith(prefix)]


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


@pytest.fixture
def youtube(httpserver):
    server = TimedText()
    httpserver.expect_request("/api/timedtext").respond_with_handler(server)
    httpserver.expect_request("/videoplayback").respond_with_handler(server)
    Recorded.base = httpserver.url_for("/").rstrip("/")
    Recorded.extracted = []
    return server


def connector(**kw) -> YouTubeConnector:
    kw.setdefault("retry_wait_seconds", 0.0)
    settings = YouTubeSource(type="youtube", name=kw.pop("name", "yt"), **kw)
    return YouTubeConnector(settings, ydl_factory=RecordedYoutubeDL)


# -- search -----------------------------------------------------------------------------------
def test_search_reads_metadata_and_caption_text_and_counts_failures(youtube, caplog):
    yt = connector(search="climate", limit=6)
    assert isinstance(yt, Connector)
    ticks: list[int] = []
    with caplog.at_level(logging.WARNING, logger="alflow.connectors.youtube"):
        records = list(yt.fetch(progress=ticks.append))
    assert [r.external_id for r in records] == ["Xk3tW9pLq0A", "Mf8uQ1zHc6J", "Bv7nR2sYt4E"]
    glaciers, sea_ice, carbon = records
    assert glaciers.title == "Why are glaciers shrinking?"
    assert glaciers.url == "https://www.youtube.com/watch?v=Xk3tW9pLq0A"
    assert glaciers.text == GLACIERS  # json3 of the original-language auto captions
    assert glaciers.meta == {
        "channel": "Climate Lab", "channel_id": "UCq8nC7vYb3xk2Lr0wZpQm1A", "upload_date": "2025-04-10",
        "duration": 452, "tags": ["glaciers", "climate", "water"],
        "description": "Glaciers hold most of the planet's fresh water.\nSources in the pinned comment.",
        "subtitles": "en (automatic)",
    }
    assert sea_ice.text == "One year of Arctic sea ice extent, from satellite data (NSIDC)."  # no subtitles
    assert "subtitles" not in sea_ice.meta
    assert carbon.text == ("Welcome back to the channel. Today: carbon capture, explained simply. "
                           "Welcome back to the channel.")  # manual en-GB WebVTT beats auto captions
    assert carbon.meta["subtitles"] == "en-GB (manual)"
    report = yt.report
    assert report.read == 3 and sum(ticks) == 6
    assert dict(report.bad) == {
        "bot check (sign-in required)": 1, "age-restricted": 1, "video unavailable": 1}
    # One line per failed video, with the reason; no cookie how-to paragraphs.
    failures = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(failures) == 3 and all("\n" not in line and "--cookies" not in line for line in failures)
    assert any("Hs9gT4vBn1C skipped (bot check" in line for line in failures)
    # The limit: the 7th search result was never extracted; nothing but subtitles fetched.
    assert "Pq1oW2iE3uR" not in Recorded.extracted
    assert youtube.paths("/videoplayback") == []
    assert [p.split("fmt=")[1] for p in youtube.paths("/api/timedtext")] == ["json3", "vtt"]


def test_youtubedl_gets_flat_extraction_and_the_settings(youtube):
    captured = {}

    def factory(params):
        captured.update(params)
        return RecordedYoutubeDL(params)

    settings = YouTubeSource(type="youtube", name="yt", search="climate", limit=2, timeout_seconds=7,
                             retries=4)
    list(YouTubeConnector(settings, ydl_factory=factory).fetch())
    assert captured["extract_flat"] == "in_playlist" and captured["skip_download"] is True
    assert captured["playlistend"] == 2 and captured["socket_timeout"] == 7
    assert captured["retries"] == captured["extractor_retries"] == 4


def test_require_subtitles_rejects_a_video_without(youtube):
    yt = connector(urls=["https://www.youtube.com/watch?v=Mf8uQ1zHc6J"], require_subtitles=True)
    assert list(yt.fetch()) == []
    assert dict(yt.report.bad) == {"no subtitles in en": 1}


def test_channel_url_reads_its_tabs_once_each_video(youtube):
    yt = connector(urls=["https://www.youtube.com/@ClimateLab"], limit=10)
    records = list(yt.fetch())
    assert [r.external_id for r in records] == ["Xk3tW9pLq0A", "Bv7nR2sYt4E", "Mf8uQ1zHc6J"]
    assert records[2].url == "https://www.youtube.com/watch?v=Mf8uQ1zHc6J"


def test_video_urls_and_per_video_errors(youtube):
    yt = connector(urls=["https://www.youtube.com/watch?v=Rt5yP0kLw2N",
                         "https://www.youtube.com/watch?v=Xk3tW9pLq0A"])
    records = list(yt.fetch())
    assert [r.external_id for r in records] == ["Xk3tW9pLq0A"]
    assert dict(yt.report.bad) == {"age-restricted": 1}


def test_subtitle_429_is_retried_honouring_retry_after(youtube):
    youtube.faults = [(429, {"Retry-After": "0"}), (503, {})]
    slept: list[float] = []
    settings = YouTubeSource(type="youtube", name="yt", urls=["https://www.youtube.com/watch?v=Xk3tW9pLq0A"],
                             retries=3, retry_wait_seconds=0.05)
    yt = YouTubeConnector(settings, ydl_factory=RecordedYoutubeDL, sleep=slept.append)
    [record] = list(yt.fetch())
    assert record.text == GLACIERS
    assert slept == [0.0, 0.1]  # Retry-After: 0, then backoff 0.05 * 2


def test_subtitle_failure_after_retries_is_counted(youtube):
    youtube.faults = [(503, {})] * 3
    settings = YouTubeSource(type="youtube", name="yt", urls=["https://www.youtube.com/watch?v=Xk3tW9pLq0A"],
                             retries=2, retry_wait_seconds=0)
    yt = YouTubeConnector(settings, ydl_factory=RecordedYoutubeDL, sleep=lambda s: None)
    assert list(yt.fetch()) == []
    assert dict(yt.report.bad) == {"subtitle download failed: HTTP 503": 1}


def test_network_failure_before_any_video_stops_the_source(youtube):
    yt = connector(urls=["https://www.youtube.com/watch?v=Nw0rkD0wn00"])
    unreachable = r"^source yt: YouTube unreachable: \[youtube\] Nw0rkD0wn00: Unable to download"
    with pytest.raises(SourceError, match=unreachable):
        list(yt.fetch())


def test_failed_search_is_a_source_error(youtube):
    yt = connector(search="no such recording")
    with pytest.raises(SourceError) as info:
        list(yt.fetch())
    assert str(info.value) == (
        "source yt: YouTube search failed: Unable to download API page: "
        "HTTP Error 429: Too Many Requests (caused by <HTTPError 429: Too Many Requests>)")


# -- cursor -----------------------------------------------------------------------------------
def test_cursor_is_the_newest_upload_date(youtube):
    yt = connector(search="climate", limit=6)
    first = list(yt.fetch())
    assert yt.next_cursor == "20250410"
    again = connector(search="climate", limit=6)
    assert list(again.fetch()) == first  # an unchanged re-run gives the same records
    newer = connector(search="climate", limit=6)
    records = list(newer.fetch(cursor="20250302"))
    assert [r.external_id for r in records] == ["Xk3tW9pLq0A", "Bv7nR2sYt4E"]  # same day kept
    assert newer.skipped_by_cursor == 1 and newer.next_cursor == "20250410"
    assert [p for p in youtube.paths("/api/timedtext") if "Mf8uQ1zHc6J" in p] == []


def test_a_rate_limited_video_is_asked_for_again_by_the_next_fetch(youtube, monkeypatch):
    monkeypatch.setitem(ERRORS, "Mf8uQ1zHc6J", "Unable to download API page: HTTP Error 429: Too Many Requests")
    first = connector(search="climate", limit=6)
    records = list(first.fetch(cursor="20241101"))
    assert [r.external_id for r in records] == ["Xk3tW9pLq0A", "Bv7nR2sYt4E"]
    assert first.report.bad["rate-limited by YouTube"] == 1
    assert first.next_cursor == "20241101"  # its upload date is unknown: the cursor stays where it was

    monkeypatch.delitem(ERRORS, "Mf8uQ1zHc6J")
    healed = connector(search="climate", limit=6)
    assert "Mf8uQ1zHc6J" in [r.external_id for r in healed.fetch(cursor=first.next_cursor)]
    assert healed.next_cursor == "20250410"


def test_a_subtitle_download_that_may_pass_holds_the_cursor_at_its_video(youtube):
    youtube.faults = [(503, {})]  # the first track asked for: Bv7nR2sYt4E's, uploaded 2025-03-02
    yt = connector(urls=["https://www.youtube.com/watch?v=Bv7nR2sYt4E",
                         "https://www.youtube.com/watch?v=Xk3tW9pLq0A"], retries=0)
    assert [r.external_id for r in yt.fetch()] == ["Xk3tW9pLq0A"]  # uploaded 2025-04-10
    assert dict(yt.report.bad) == {"subtitle download failed: HTTP 503": 1}
    assert yt.next_cursor == "20250302"


def test_youtube_asking_for_too_long_a_wait_stops_the_source_saying_when(youtube):
    youtube.faults = [(429, {"Retry-After": "86400"})]
    slept: list[float] = []
    settings = YouTubeSource(type="youtube", name="yt", urls=["https://www.youtube.com/watch?v=Xk3tW9pLq0A"],
                             retries=3)
    with pytest.raises(SourceError, match=r"^source yt: YouTube asked to wait 86400 s \(Retry-After\), more than "
                                          r"max_retry_wait_seconds = 120; retry after \d{4}-\d\d-\d\d \d\d:\d\d UTC$"):
        list(YouTubeConnector(settings, ydl_factory=RecordedYoutubeDL, sleep=slept.append).fetch())
    assert slept == []


# -- subtitle text ------------------------------------------------------------------------------
def test_vtt_and_json3_of_the_same_captions_give_the_same_clean_text():
    vtt = (DATA / "subs" / "Xk3tW9pLq0A.en.vtt").read_bytes()
    json3 = (DATA / "subs" / "Xk3tW9pLq0A.en.json3").read_bytes()
    assert subtitle_text(vtt, "vtt") == subtitle_text(json3, "json3") == GLACIERS
    raw = [line for line in vtt_lines(vtt.decode()) if line]
    assert len(raw) == 8 and len(collapse_repeats(raw)) == 3  # the rolling duplicates
    assert json3_lines("not json") == []


def test_pick_prefers_manual_then_original_auto_and_json3():
    info = json.loads((DATA / "videos" / "Xk3tW9pLq0A.info.json").read_text())
    lang, kind, track = pick_subtitle(info, ["en"])
    assert (lang, kind, track["ext"]) == ("en", "automatic", "json3") and "tlang" not in track["url"]
    assert pick_subtitle(info, ["fr"]) is None
    lang, kind, track = pick_subtitle(info, ["fr", "de"])
    assert (lang, kind) == ("de", "automatic") and "tlang=de" in track["url"]


@pytest.mark.parametrize("message, reason", [
    ("ERROR: [youtube] x: Sign in to confirm you\u2019re not a bot. Use --cookies",
     "bot check (sign-in required)"),
    ("ERROR: [youtube] x: Sign in to confirm your age. This video may be inappropriate", "age-restricted"),
    ("ERROR: [youtube] x: Private video. Sign in if you've been granted access", "private video"),
    ("ERROR: [youtube] x: Join this channel to get access to members-only content", "members-only"),
    ("ERROR: [youtube] x: Video unavailable. This video has been removed by the uploader",
     "video unavailable"),
    ("ERROR: [youtube] x: Something new", "extraction failed"),
])
def test_failure_reasons(message, reason):
    assert failure_reason(message) == reason


# -- configuration ------------------------------------------------------------------------------
def config(tmp_path: Path, body: str):
    path = tmp_path / "alflow.toml"
    path.write_text('labels = ["a", "b"]\n' + textwrap.dedent(body), encoding="utf-8")
    return load_config(path, environ={})


def test_config_loads_a_youtube_source(tmp_path):
    [source] = config(tmp_path, """
        [[sources]]
        type = "youtube"
        name = "yt"
        urls = ["https://www.youtube.com/@ClimateLab"]
        subtitle_languages = ["en", "pt-BR"]
        """).sources
    assert isinstance(build_connector(source), YouTubeConnector)
    assert source.limit == 20 and source.subtitle_languages == ["en", "pt-BR"]


@pytest.mark.parametrize("body, expected", [
    ('search = "x"\nurls = ["https://www.youtube.com/watch?v=Xk3tW9pLq0A"]',
     "sources.0.youtube.urls: give exactly one of search or urls"),
    ("", "sources.0.youtube.search: give exactly one of search or urls"),
    ('urls = ["www.youtube.com/watch?v=Xk3tW9pLq0A"]', "sources.0.youtube.urls"),
    ('search = "x"\nsubtitle_languages = ["english"]', "not a language code"),
    ('search = "x"\nlimit = 0', "sources.0.youtube.limit"),
])
def test_config_errors(tmp_path, body, expected):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, '[[sources]]\ntype = "youtube"\nname = "yt"\n' + body + "\n")
    assert expected in str(info.value) and "\n" not in str(info.value)
