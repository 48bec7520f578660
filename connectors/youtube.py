"""YouTube videos through yt-dlp, used as a library: metadata and subtitle text, no video.

* ``search = "term"`` is extracted as ``ytsearch<limit>:term``; ``urls`` may name videos,
  playlists or channels. Lists are extracted flat (``extract_flat="in_playlist"``: one
  request per page of the list, no per-video work), channel tabs one level deeper, and
  ``limit`` videos at most are then extracted one by one with
  ``extract_info(url, download=False)``; nothing is downloaded but subtitles.
* Per video: title, description, channel, upload date, duration and tags, and the text of
  its subtitles in the first of ``subtitle_languages`` that has some (manual subtitles
  before automatic captions, the original-language ``<lang>-orig`` track before a
  translation). The track is fetched from the URL in the info dict through yt-dlp's own
  networking (its cookies, proxy and headers), json3 preferred, else WebVTT, and turned
  into clean text: cue timings, ``<c>`` tags and the rolling repeats of auto-captions go.
  Without subtitles the description is the text (unless ``require_subtitles``).
* A video yt-dlp cannot extract (a bot check, an age gate, private, members-only,
  unavailable) is counted in the report with that reason and the fetch goes on; only a
  failed search, or a network failure before any video was read, stops the source.
* Retries: yt-dlp's own (``extractor_retries``, ``retries``, ``socket_timeout``) for its
  requests; subtitle downloads, which it does not retry, are retried here by
  :class:`connectors.http.RetryPolicy` (backoff honouring ``Retry-After`` up to
  ``max_retry_wait_seconds``; YouTube asking for a longer wait stops the source, saying
  when to retry).

Cursor (see :mod:`connectors.base`): an upload date ``"YYYYMMDD"``; a fetch given one
skips videos uploaded before that day (videos of that same day come again and are
deduplicated), and ``next_cursor`` is the newest upload date read. It never passes a video
that failed in a way that may pass (rate-limited, a network error, a subtitle download
that failed with 429/5xx): it stops at that video's upload date, or stays where it was
when the date is unknown (an extraction that failed tells none), so the next fetch asks
for the video again.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
from typing import Any, Callable, Iterator

import yt_dlp
from yt_dlp.networking import Request
from yt_dlp.networking.exceptions import HTTPError, RequestError
from yt_dlp.utils import DownloadError

from alflow.config.sources import YouTubeSource
from alflow.connectors.base import FetchReport, Progress, Record, SourceError
from alflow.connectors.http import RETRY_STATUS, RetryLater, RetryPolicy, retry_after_seconds

log = logging.getLogger(__name__)

SUBTITLE_FORMATS = ("json3", "vtt")
WATCH = "https://www.youtube.com/watch?v="
_DATE = re.compile(r"^\d{8}$")
# Failures that may pass: the next fetch must ask for the video again.
RETRYABLE_REASONS = frozenset({"rate-limited by YouTube", "network error"})
# yt-dlp's error text -> the reason counted in the report (first match wins).
_REASONS = (
    (("not a bot",), "bot check (sign-in required)"),
    (("confirm your age", "age-restricted", "age restricted", "inappropriate for some users"),
     "age-restricted"),
    (("members-only", "members only", "join this channel"), "members-only"),
    (("private video",), "private video"),
    (("premieres in", "live event will begin", "upcoming live"), "not yet available"),
    (("try again later", "rate-limit", "http error 429", "too many requests"), "rate-limited by YouTube"),
    (("video unavailable", "not available", "no longer available", "has been removed", "terminated"),
     "video unavailable"),
    (("unable to download", "urlopen error", "timed out", "connection", "name or service not known",
      "getaddrinfo", "network is unreachable", "transporterror"), "network error"),
)


def failure_reason(message: str) -> str:
    text = message.lower().replace("\u2019", "'")
    for needles, reason in _REASONS:
        if any(needle in text for needle in needles):
            return reason
    return "extraction failed"


def short_error(message: str) -> str:
    """yt-dlp's error as one short line: no 'ERROR:' prefix, no cookie how-to."""
    text = message.replace("ERROR: ", "").strip().splitlines()[0] if message.strip() else ""
    return re.split(r"\. Use --cookies|\. See  https?://|; please report this issue", text)[0][:300]


class _YdlLogger:
    """yt-dlp's messages into this module's logger; per-video errors are reported by the
    connector as one line each, so yt-dlp's own error lines go to debug."""

    def debug(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)

    info = debug

    def warning(self, msg: str) -> None:
        log.info("yt-dlp: %s", msg)

    def error(self, msg: str) -> None:
        log.debug("yt-dlp: %s", msg)


class YouTubeConnector:
    """Reads one :class:`config.sources.YouTubeSource`; see the module docstring."""

    def __init__(self, settings: YouTubeSource,
                 ydl_factory: Callable[[dict[str, Any]], yt_dlp.YoutubeDL] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        """``ydl_factory(params)`` builds the YoutubeDL (the test seam; default yt-dlp's)."""
        self.settings = settings
        self.name = settings.name
        self.report = FetchReport()
        self.next_cursor: str | None = None
        self.skipped_by_cursor = 0
        self._since: str | None = None
        self._retry_from: str | None = None
        self._retry_undated = False
        self.ydl_factory = ydl_factory or yt_dlp.YoutubeDL
        self.sleep = sleep

    def ydl_params(self) -> dict[str, Any]:
        s = self.settings
        return {
            "quiet": True,
            "noprogress": True,
            "skip_download": True,
            # Any format will do, as none is downloaded: a video whose only formats are
            # storyboards (or that the default selector rejects) still gives its metadata.
            "format": "all",
            "extract_flat": "in_playlist",
            "playlistend": s.limit,
            "socket_timeout": s.timeout_seconds,
            "retries": s.retries,
            "extractor_retries": s.retries,
            "logger": _YdlLogger(),
        }

    # -- the Connector interface --------------------------------------------------------
    def expected_total(self) -> int | None:
        return None

    def fetch(self, progress: Progress | None = None, cursor: Any = None) -> Iterator[Record]:
        self.next_cursor = None
        self.skipped_by_cursor = 0
        since = _date_cursor(cursor)
        newest = since
        self._since = since
        self._retry_from = None  # the oldest upload date of a video to ask for again
        self._retry_undated = False  # a video to ask for again whose upload date is unknown
        with self.ydl_factory(self.ydl_params()) as ydl:
            for entry in self._entries(ydl):
                if progress:
                    progress(1)
                info = entry if _is_video_info(entry) else self._extract(ydl, entry)
                if info is None:
                    continue
                uploaded = info.get("upload_date")
                if since and isinstance(uploaded, str) and uploaded < since:
                    self.skipped_by_cursor += 1
                    continue
                record = self._record(ydl, info)
                if record is None:
                    continue
                self.report.read += 1
                if _is_date(uploaded) and (newest is None or uploaded > newest):
                    newest = uploaded
                yield record
        if self._retry_undated:
            self.next_cursor = since
        elif newest and self._retry_from:
            self.next_cursor = min(newest, self._retry_from)
        else:
            self.next_cursor = newest

    def _retry_next_time(self, uploaded: Any) -> None:
        """Keep the cursor from passing a video that failed in a way that may pass."""
        if not _is_date(uploaded):
            self._retry_undated = True
        elif self._since is None or uploaded >= self._since:
            self._retry_from = min(self._retry_from or uploaded, uploaded)

    # -- lists --------------------------------------------------------------------------
    def _entries(self, ydl: yt_dlp.YoutubeDL) -> Iterator[dict[str, Any]]:
        """Flat entries (or full video infos), ``limit`` at most, each video once."""
        s = self.settings
        seen: set[str] = set()
        count = 0
        if s.search is not None:
            try:
                result = ydl.extract_info(f"ytsearch{s.limit}:{s.search}", download=False)
            except DownloadError as exc:
                raise SourceError(
                    f"source {self.name}: YouTube search failed: {short_error(str(exc))}"
                ) from None
            sources = [result]
        else:
            sources = s.urls or []
        for item in sources:
            for entry in self._expand(ydl, item, depth=0):
                key = entry.get("id") or entry.get("url")
                if key in seen:
                    continue
                seen.add(key)
                yield entry
                count += 1
                if count >= s.limit:
                    return

    def _expand(self, ydl: yt_dlp.YoutubeDL, item: str | dict, depth: int) -> Iterator[dict[str, Any]]:
        if isinstance(item, str):
            try:
                item = ydl.extract_info(item, download=False)
            except DownloadError as exc:
                self._failed(str(exc))
                return
        if not isinstance(item, dict):
            return
        if item.get("_type") in ("playlist", "multi_video"):
            for entry in item.get("entries") or []:
                if not entry:
                    continue
                if _is_list_entry(entry) and depth < 2:
                    yield from self._expand(ydl, entry, depth + 1)
                else:
                    yield entry
        elif _is_list_entry(item) and depth < 2:
            yield from self._expand(ydl, item.get("url"), depth + 1)
        else:
            yield item

    def _extract(self, ydl: yt_dlp.YoutubeDL, entry: dict[str, Any]) -> dict[str, Any] | None:
        url = entry.get("url") or entry.get("webpage_url")
        if not url and entry.get("id"):
            url = WATCH + entry["id"]
        if not url:
            self.report.reject("entry without a URL")
            return None
        try:
            info = ydl.extract_info(url, download=False)
        except DownloadError as exc:
            self._failed(str(exc), entry.get("id"), entry.get("upload_date"))
            return None
        return info if isinstance(info, dict) else None

    def _failed(self, message: str, video_id: str | None = None, uploaded: Any = None) -> None:
        """Count a video (or a list: ``video_id`` None) yt-dlp could not extract."""
        reason = failure_reason(message)
        if reason == "network error" and self.report.read == 0:
            raise SourceError(f"source {self.name}: YouTube unreachable: {short_error(message)}")
        self.report.reject(reason)
        if reason in RETRYABLE_REASONS:
            self._retry_next_time(uploaded)  # a list's videos are undated: the cursor stays
        log.warning("source %s: %s skipped (%s): %s", self.name, video_id or "a URL", reason,
                    short_error(message))

    # -- one video ----------------------------------------------------------------------
    def _record(self, ydl: yt_dlp.YoutubeDL, info: dict[str, Any]) -> Record | None:
        s = self.settings
        transcript, track = "", None
        picked = pick_subtitle(info, s.subtitle_languages)
        if picked is not None:
            lang, kind, sub = picked
            try:
                payload = self._download(ydl, sub, info)
            except _SubtitleError as exc:
                self.report.reject(f"subtitle download failed: {exc}")
                if exc.retryable:
                    self._retry_next_time(info.get("upload_date"))
                return None
            except RetryLater as exc:
                raise SourceError(f"source {self.name}: {exc.line('YouTube')}") from None
            transcript = subtitle_text(payload, sub.get("ext", ""))
            track = f"{lang} ({kind})"
        description = (info.get("description") or "").strip()
        if not transcript and s.require_subtitles:
            self.report.reject(f"no subtitles in {', '.join(s.subtitle_languages) or 'any language'}")
            return None
        text = transcript or description
        if not text:
            self.report.reject("no subtitles or description")
            return None
        uploaded = info.get("upload_date")
        meta: dict[str, Any] = {
            "channel": info.get("channel") or info.get("uploader"),
            "channel_id": info.get("channel_id"),
            "upload_date": f"{uploaded[:4]}-{uploaded[4:6]}-{uploaded[6:]}" if _is_date(uploaded) else None,
            "duration": info.get("duration"),
            "tags": list(info.get("tags") or []),
            "description": description,
            "subtitles": track,
        }
        video_id = info.get("id")
        return Record(
            text=text,
            title=info.get("title") or info.get("fulltitle"),
            url=info.get("webpage_url") or (WATCH + video_id if video_id else None),
            external_id=video_id,
            meta={k: v for k, v in meta.items() if v not in (None, "", [])},
        )

    def _download(self, ydl: yt_dlp.YoutubeDL, sub: dict[str, Any], info: dict[str, Any]) -> bytes:
        s = self.settings
        headers = dict(sub.get("http_headers") or info.get("http_headers") or {})
        extensions: dict[str, Any] = {}
        if sub.get("impersonate"):
            # As yt-dlp's own subtitle download does, when an impersonation backend exists.
            try:
                target, _ = ydl._parse_impersonate_targets(sub["impersonate"])
            except Exception:  # noqa: BLE001 - an optional refinement; plain request otherwise
                target = None
            if target is not None:
                extensions["impersonate"] = target
        policy = RetryPolicy(s.retries, s.retry_wait_seconds, s.max_retry_wait_seconds)
        attempt = 0
        while True:
            told = None
            try:
                with ydl.urlopen(Request(sub["url"], headers=headers, extensions=extensions)) as response:
                    return response.read()
            except HTTPError as exc:
                status = exc.status
                if status not in RETRY_STATUS:
                    raise _SubtitleError(f"HTTP {status}") from None
                told = retry_after_seconds(exc.response.headers.get("Retry-After"))
                problem = f"HTTP {status}"
            except RequestError as exc:
                problem = type(exc).__name__
            wait = policy.wait(attempt, told, "YouTube")  # RetryLater past the cap: the caller stops
            if wait is None:
                raise _SubtitleError(problem, retryable=True)
            log.info("source %s: subtitles %s, retry %d of %d in %.1fs", self.name, problem,
                     attempt + 1, s.retries, wait)
            self.sleep(wait)
            attempt += 1


class _SubtitleError(Exception):
    """A subtitle track could not be downloaded; ``retryable``: it may pass (429, 5xx, network)."""

    def __init__(self, problem: str, retryable: bool = False):
        super().__init__(problem)
        self.retryable = retryable


# -- subtitles ------------------------------------------------------------------------------
def pick_subtitle(info: dict[str, Any], languages: list[str]) -> tuple[str, str, dict] | None:
    """(language key, "manual"/"automatic", track) of the preferred subtitle, or None."""
    manual = info.get("subtitles") or {}
    automatic = info.get("automatic_captions") or {}
    for lang in languages:
        lang_l = lang.lower().replace("_", "-")
        pools = (
            ("manual", manual, [k for k in manual if k.lower() == lang_l]
             + sorted(k for k in manual if k.lower().startswith(lang_l + "-"))),
            ("automatic", automatic, [k for k in automatic if k.lower() == lang_l + "-orig"]
             + [k for k in automatic if k.lower() == lang_l]),
        )
        for kind, pool, keys in pools:
            for key in keys:
                tracks = [t for t in pool.get(key) or [] if isinstance(t, dict) and t.get("url")]
                for fmt in SUBTITLE_FORMATS:
                    for track in tracks:
                        if (track.get("ext") or "").lower() == fmt:
                            return key.removesuffix("-orig"), kind, track
    return None


def subtitle_text(payload: bytes, ext: str) -> str:
    text = payload.decode("utf-8", errors="replace")
    lines = json3_lines(text) if ext.lower() == "json3" else vtt_lines(text)
    return " ".join(collapse_repeats(lines))


_TAG = re.compile(r"<[^>]*>")
_TIMING = re.compile(r"^\s*(?:\d+:)?\d{1,2}:\d{2}[.,]\d{3}\s+-->\s+")


def vtt_lines(text: str) -> list[str]:
    """The text lines of a WebVTT file, in order: header, NOTE/STYLE blocks, cue ids,
    timings and inline tags (``<00:00:01.520><c> word</c>``) removed. A cue's text ends at
    an empty line (a line holding a space, as auto-captions have, is part of the cue)."""
    out: list[str] = []
    in_cue = False
    for line in text.replace("\ufeff", "").split("\n"):
        line = line.rstrip("\r")
        if not line:
            in_cue = False
        elif _TIMING.match(line):
            in_cue = True
        elif in_cue:
            out.append(html.unescape(_TAG.sub("", line)).replace("\u00a0", " ").strip())
    return out


def json3_lines(text: str) -> list[str]:
    """The text lines of YouTube's json3 timed text (``events[].segs[].utf8``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return []
    buffer = []
    for event in data.get("events") or []:
        for seg in event.get("segs") or []:
            buffer.append(seg.get("utf8") or "")
        if not event.get("aAppend"):
            buffer.append("\n")
    return [html.unescape(line).replace("\u00a0", " ").strip() for line in "".join(buffer).split("\n")]


def collapse_repeats(lines: list[str]) -> list[str]:
    """Drop empty lines and a line repeating the previous one (auto-captions roll each
    line up once, then show it again with the next)."""
    out: list[str] = []
    for line in lines:
        line = " ".join(line.split())
        if line and (not out or out[-1] != line):
            out.append(line)
    return out


def _is_video_info(entry: dict[str, Any]) -> bool:
    """A fully extracted video (not a flat ``_type: url`` entry)."""
    return entry.get("_type", "video") == "video" and bool(entry.get("title")) and (
        "formats" in entry or "subtitles" in entry or "automatic_captions" in entry
    )


def _is_list_entry(entry: dict[str, Any]) -> bool:
    """A flat entry that is itself a list (a channel's tab, a playlist), not a video."""
    if entry.get("_type") in ("playlist", "multi_video"):
        return True
    ie_key = entry.get("ie_key") or ""
    return (entry.get("_type") in ("url", "url_transparent") and ie_key != "Youtube"
            and ie_key.startswith("Youtube"))


def _is_date(value: Any) -> bool:
    return isinstance(value, str) and bool(_DATE.match(value))


def _date_cursor(cursor: Any) -> str | None:
    if cursor is None:
        return None
    if isinstance(cursor, str) and _DATE.match(cursor):
        return cursor
    log.warning("ignoring a YouTube cursor that is not an upload date YYYYMMDD")
    return None
