"""Settings of the network sources: ``type = "wikipedia"``, ``"youtube"`` and ``"google"``.

Each is one ``[[sources]]`` table in ``alflow.toml``, validated at start-up like the rest of
the settings (unknown keys and bad values are one-line errors naming the key). The
connectors that read them live in ``connectors/wikipedia.py``, ``youtube.py`` and
``google.py``.

Secrets never live here: a Custom Search API key is named by the environment variable or
the Prefect Secret block that holds it, and validators never echo a value that might be a
key.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

_NAME = Field(..., min_length=1, max_length=64, pattern=r"^[\w.-]+$",
              description="The source's unique name, stored with its items.")
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]{1,8})*$|^simple$")
_SUB_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# Library defaults and tools that say nothing about who is calling (Wikimedia's policy asks
# for a name and a way to contact you: https://foundation.wikimedia.org/wiki/Policy:User-Agent_policy).
_GENERIC_AGENTS = re.compile(
    r"^\s*(python-requests|python-httpx|python-urllib|python/|urllib|aiohttp|httpx|requests|curl|"
    r"wget|mozilla/|go-http-client|java/|okhttp|libwww-perl|scrapy|wikipedia-api|node-fetch|"
    r"axios|postman|alflow\s*$)",
    re.IGNORECASE,
)
_CONTACT = re.compile(r"@|https?://|www\.|\bUser:", re.IGNORECASE)
USER_AGENT_EXAMPLE = "my-project/1.0 (https://example.org/my-project; me@example.org)"
GOOGLE_NEWS_RSS = "https://news.google.com/rss/search"
CUSTOM_SEARCH_ENDPOINT = "https://customsearch.googleapis.com/customsearch/v1"


def _nested(key: str, message: str) -> ValueError:
    """An error reported under ``key`` of this source (see config.settings._format_error)."""
    from alflow.config import settings  # loaded by the time a source is validated

    nested = getattr(settings, "_NestedError", None)
    if nested is None:
        return ValueError(f"{key}: {message}")
    return nested((key,), message)


def _http_url(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{what} must be an http(s) URL (got {value!r})")
    return value


def key_env_name(value: str | None, example: str, key_prefixes: tuple[str, ...] = ()) -> str | None:
    """An ``api_key_env`` value: the NAME of the environment variable holding a key
    (``example``, e.g. "GOOGLE_API_KEY"), never a key; a value starting with one of
    ``key_prefixes`` is a key pasted by mistake. The error never echoes the value."""
    if value is not None and (not _ENV_NAME.match(value) or value.startswith(key_prefixes)):
        raise ValueError(
            "must be the NAME of an environment variable holding the key, "
            f"e.g. api_key_env = \"{example}\" (never the key itself)"
        )
    return value


def key_block_name(value: str | None, key_prefixes: tuple[str, ...] = ()) -> str | None:
    """An ``api_key_secret`` value: the name of a Prefect Secret block, never a key (see
    :func:`key_env_name`)."""
    if value is not None and (not _BLOCK_NAME.match(value) or value.startswith(key_prefixes)):
        raise ValueError(
            "must be the name of a Prefect Secret block holding the key "
            "(lowercase letters, digits and dashes), never the key itself"
        )
    return value


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = _NAME
    timeout_seconds: float = Field(30.0, gt=0, le=600, description="Seconds before one request times out.")
    retries: int = Field(
        3, ge=0, le=10,
        description="Retries of one request after a timeout, a 429 or a 5xx, with exponential backoff from "
                    "retry_wait_seconds; a Retry-After header replaces the computed wait.",
    )
    retry_wait_seconds: float = Field(
        1.0, ge=0, le=300, description="The first wait before a retry, in seconds, doubled with each retry."
    )
    max_retry_wait_seconds: float = Field(
        120.0, ge=0, le=3600,
        description="The longest single wait before a retry, in seconds. A Retry-After asking for more "
                    "stops the source with one line saying when to retry (an hourly ingest must not "
                    "sleep for a day); a page host asking for more fails only that page, to be asked "
                    "for again by the next fetch.",
    )

    @property
    def label_map(self) -> dict[str, str]:
        """These sources carry no gold labels (ingest maps gold labels through this)."""
        return {}


class WikipediaSource(_Source):
    """Pages of Wikipedia (or any MediaWiki with TextExtracts, via ``api_url``).

    Exactly one of ``search`` (full-text search), ``titles`` or ``category`` (its pages,
    and sub-categories' pages down to ``category_depth``) chooses the pages.
    """

    type: Literal["wikipedia"] = Field(..., description="The source type.")
    search: str | None = Field(
        None, min_length=1, description="Full-text search: the pages it finds (one of search, titles, category)."
    )
    titles: list[str] | None = Field(
        None, min_length=1, max_length=10_000, description="These pages, by title (one of search, titles, category)."
    )
    category: str | None = Field(
        None, min_length=1,
        description='The pages of this category ("Physics" means "Category:Physics"; a localised prefix is '
                    "kept); one of search, titles, category.",
    )
    category_depth: int = Field(
        0, ge=0, le=10, description="With category: also the pages of sub-categories down to this depth."
    )
    limit: int = Field(100, ge=1, le=10_000, description="At most this many pages per fetch.")
    language: str = Field("en", description='The Wikipedia language code, e.g. "en", "de", "zh-yue" or "simple".')
    content: Literal["text", "summary"] = Field(
        "text", description='"text": the whole plain text of each page; "summary": its lead section.'
    )
    user_agent: str | None = Field(
        None, validate_default=True,
        description="Required: names your project and a contact (an e-mail address or URL); Wikimedia blocks "
                    "generic user agents.",
    )
    api_url: str | None = Field(
        None,
        description="Another MediaWiki's api.php (a company wiki, a mirror; it needs the TextExtracts "
                    "extension) instead of Wikipedia's.",
    )

    @field_validator("titles")
    @classmethod
    def _titles_not_blank(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not title.strip() for title in value):
            raise ValueError("a title is empty")
        return [title.strip() for title in value] if value is not None else None

    @field_validator("category")
    @classmethod
    def _category_title(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        # "Physics" means "Category:Physics"; a localised prefix ("Kategorie:Physik") is kept.
        return value if ":" in value else f"Category:{value}"

    @field_validator("language")
    @classmethod
    def _language_code(cls, value: str) -> str:
        value = value.strip().lower()
        if not _LANGUAGE.match(value):
            raise ValueError(f"not a Wikipedia language code like 'en' or 'zh-yue' (got {value!r})")
        return value

    @field_validator("user_agent")
    @classmethod
    def _descriptive_user_agent(cls, value: str | None) -> str:
        if value is None or not value.strip():
            raise ValueError(
                "Wikipedia requires a descriptive user agent with contact information, "
                f"e.g. user_agent = \"{USER_AGENT_EXAMPLE}\""
            )
        value = value.strip()
        if _GENERIC_AGENTS.match(value):
            raise ValueError(
                f"{value!r} is a generic user agent; Wikipedia blocks those. Name your project "
                f"and a contact, e.g. \"{USER_AGENT_EXAMPLE}\""
            )
        if not _CONTACT.search(value):
            raise ValueError(
                f"{value!r} has no contact information (an e-mail address or URL); "
                f"Wikipedia requires one, e.g. \"{USER_AGENT_EXAMPLE}\""
            )
        return value

    @field_validator("api_url")
    @classmethod
    def _api_url(cls, value: str | None) -> str | None:
        return _http_url(value, "api_url (a MediaWiki api.php)")

    @model_validator(mode="after")
    def _one_selector(self) -> "WikipediaSource":
        given = [key for key in ("search", "titles", "category") if getattr(self, key) is not None]
        if len(given) != 1:
            key = given[1] if len(given) > 1 else "search"
            got = " and ".join(given) if given else "none"
            raise _nested(key, f"give exactly one of search, titles or category (got {got})")
        if "category_depth" in self.model_fields_set and self.category is None:
            raise _nested("category_depth", "only applies with category")
        return self


class YouTubeSource(_Source):
    """Videos of YouTube read with yt-dlp: metadata and subtitle text, never the video."""

    type: Literal["youtube"] = Field(..., description="The source type.")
    search: str | None = Field(None, min_length=1, description="A YouTube search (one of search, urls).")
    urls: list[str] | None = Field(
        None, min_length=1, max_length=1000, description="Videos, playlists or channels (one of search, urls)."
    )
    limit: int = Field(20, ge=1, le=5000, description="At most this many videos per fetch.")
    subtitle_languages: list[str] = Field(
        default_factory=lambda: ["en"], max_length=20,
        description="Subtitle languages in order of preference; manual subtitles before automatic captions.",
    )
    require_subtitles: bool = Field(
        False,
        description="Reject a video without subtitles in those languages (by default its description is the "
                    "text).",
    )

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for url in value:
                _http_url(url.strip(), "each of urls")
            return [url.strip() for url in value]
        return None

    @field_validator("subtitle_languages")
    @classmethod
    def _languages(cls, value: list[str]) -> list[str]:
        for lang in value:
            if not _SUB_LANGUAGE.match(lang):
                raise ValueError(f"not a language code like 'en' or 'pt-BR' (got {lang!r})")
        return value

    @model_validator(mode="after")
    def _one_selector(self) -> "YouTubeSource":
        if (self.search is None) == (self.urls is None):
            key = "urls" if self.search is not None else "search"
            raise _nested(key, "give exactly one of search or urls")
        return self


class GoogleSource(_Source):
    """Google results: Google News RSS search (no key) or the Custom Search JSON API."""

    type: Literal["google"] = Field(..., description="The source type.")
    backend: Literal["news_rss", "custom_search"] = Field(
        "news_rss",
        description='"news_rss": Google News RSS search, no key; "custom_search": the Programmable Search JSON '
                    "API (closed to new customers; whole-web search ends 2027-01-01).",
    )
    search: str = Field(..., min_length=1, description="The search terms.")
    limit: int = Field(
        50, ge=1, le=100, description="At most this many results per fetch (both backends stop at 100)."
    )
    rss_url: str | None = Field(
        None, description="news_rss: replaces https://news.google.com/rss/search."
    )
    hl: str | None = Field(None, description='news_rss: the interface language (unset: "en-US").')
    gl: str | None = Field(None, description='news_rss: the country (unset: "US").')
    ceid: str | None = Field(None, description="news_rss: the edition (unset: gl, then hl's language: \"US:en\").")
    # The key comes from an environment variable or a Prefect Secret block, never from this file.
    cx: str | None = Field(None, description="custom_search (required): the search engine ID.")
    api_key_env: str | None = Field(
        None,
        description="custom_search: the NAME of the environment variable holding the API key (one of "
                    "api_key_env, api_key_secret).",
    )
    api_key_secret: str | None = Field(
        None,
        description="custom_search: the name of the Prefect Secret block holding the API key (one of "
                    "api_key_env, api_key_secret).",
    )
    endpoint: str | None = Field(None, description="custom_search: replaces the API's URL.")
    fetch_pages: bool = Field(
        False,
        description="Make each result's text the main text of its page (trafilatura; robots.txt obeyed, one "
                    "request per site every page_delay_seconds) instead of the headline or snippet.",
    )
    page_delay_seconds: float = Field(
        1.0, ge=0, le=600, description="With fetch_pages: seconds between two requests to the same site."
    )
    allow_private_addresses: bool = Field(
        False,
        description="Let fetch_pages read pages on loopback and private addresses (an intranet). "
                    "By default a result or redirect leading to a non-public address is counted "
                    "bad ('private address') and never fetched; link-local addresses (cloud "
                    "metadata services), multicast and 0.0.0.0 are refused always.",
    )
    user_agent: str | None = Field(
        None, description='The User-Agent of every request (unset: "alflow/VERSION (active-learning ingest)").'
    )

    @field_validator("rss_url", "endpoint")
    @classmethod
    def _urls(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _http_url(value, info.field_name)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        return key_env_name(value, "GOOGLE_API_KEY", ("AIza",))  # Google's keys start "AIza"

    @field_validator("api_key_secret")
    @classmethod
    def _block_name(cls, value: str | None) -> str | None:
        return key_block_name(value, ("aiza",))

    @model_validator(mode="after")
    def _backend_keys(self) -> "GoogleSource":
        news_only = ("rss_url", "hl", "gl", "ceid")
        search_only = ("cx", "api_key_env", "api_key_secret", "endpoint")
        foreign = news_only if self.backend == "custom_search" else search_only
        if "allow_private_addresses" in self.model_fields_set and not self.fetch_pages:
            raise _nested("allow_private_addresses", "only applies with fetch_pages = true")
        for key in foreign:
            if getattr(self, key) is not None:
                raise _nested(key, f"does not apply to backend = \"{self.backend}\"")
        if self.backend == "custom_search":
            if not self.cx:
                raise _nested("cx", "backend = \"custom_search\" needs cx (the search engine ID)")
            if (self.api_key_env is None) == (self.api_key_secret is None):
                raise _nested(
                    "api_key_env",
                    "backend = \"custom_search\" needs exactly one of api_key_env (an environment "
                    "variable) or api_key_secret (a Prefect Secret block) holding the API key",
                )
        return self

    # Resolved defaults of the news_rss parameters.
    def news_params(self) -> dict[str, Any]:
        hl = self.hl or "en-US"
        gl = self.gl or "US"
        ceid = self.ceid or f"{gl}:{hl.split('-')[0]}"
        return {"q": self.search, "hl": hl, "gl": gl, "ceid": ceid}


NETWORK_SOURCES = (WikipediaSource, YouTubeSource, GoogleSource)
