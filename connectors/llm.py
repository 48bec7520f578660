"""The client of an OpenAI-compatible endpoint (Ollama, vLLM, llama.cpp, LM Studio).

:class:`LLMClient` speaks OpenAI's wire format over httpx, with no SDK:

* :meth:`LLMClient.classify` - one ``POST {base_url}/chat/completions`` per text: the
  ``[llm] prompt`` as the user message, ``temperature: 0``, the label constrained by
  ``response_format: {"type": "json_schema", "json_schema": {"strict": true, "schema":
  {... "enum": classes}}}`` and ``logprobs: true, top_logprobs: 5``. A server that
  answers 400 naming ``response_format`` (or ``json_schema``) is asked for
  ``json_object`` from then on, then for no format; one naming ``logprobs`` is asked
  without them: each fallback happens once and holds for the client's lifetime. The
  content is parsed strictly either way: a JSON object with a ``label`` string, or a bare
  class name; a JSON label that is not a class is "outside" (counted, never returned as a
  label), anything else "malformed". The confidence is read from the label's first
  token: its ``top_logprobs`` alternatives that begin a class give each class its
  probability (alternatives shared by several classes are split by the label's later
  tokens), renormalised over the classes.
* a client of ``task = "multi_label"`` asks :meth:`LLMClient.classify` for a tag set
  instead: ``{"tags": [...]}``, an array whose items are an ``enum`` of the tags with
  ``uniqueItems``, without logprobs (:func:`parse_tags_answer`); the answer's label is the
  set's text form (sorted tags joined by ";", "" for none), with no confidence. A tag
  outside the set makes the answer "outside", as a label outside the classes does.
* :meth:`LLMClient.embed` - ``POST {base_url}/embeddings`` with ``{model, input: [...]}``
  per ``embedding_batch_size`` texts; ``data[i].embedding`` placed by ``data[i].index``;
  rows L2-normalised.

Faults: a 429's ``Retry-After`` (seconds or an HTTP date) is waited for up to
``max_retry_after_seconds`` (a longer one fails that request with a line naming the wait);
429 without it, 5xx, timeouts and lost connections are retried ``retries`` times after
``retry_wait_seconds``, doubled each time. A refused connection, 401, 403 or 404 means
the endpoint is unusable: :class:`LLMError` for the whole call, one line naming
``base_url`` and the status. ``max_concurrency`` requests are in flight at once.

The key (``api_key_env`` or the Prefect Secret block ``api_key_secret``) is read on the
first request and sent as ``Authorization: Bearer``; it is never in a log line, an error,
a repr or the lineage (a server's own error text is shown with it redacted).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import ssl
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import httpx
import numpy as np

from alflow import __version__
from alflow.connectors.http import redact, retry_after_seconds
from alflow.connectors.keys import KeyUnavailable, read_api_key
from alflow.tasks.multilabel.tags import format_tags

if TYPE_CHECKING:
    from alflow.config.settings import LLMSettings, Settings

log = logging.getLogger(__name__)

STATUSES = ("ok", "outside", "malformed", "failed")
TASKS = ("single_label", "multi_label")
TOP_LOGPROBS = 5
FATAL_STATUS = frozenset({401, 403, 404})
# Items in a row without an answer (at least; 2 x max_concurrency with more in flight) after
# which the endpoint counts as unusable: a server that times out on everything must not
# hold a cycle for items x timeout x (retries + 1) / max_concurrency seconds.
FAILURES_IN_A_ROW = 5
# What follows a class name at the end of its last token in a JSON answer: `spam"}`.
_LABEL_END = re.compile(r'^["}\s.,]*$')
_JSON_LABEL = re.compile(r'"label"\s*:\s*"')
_FORMAT_WORDS = ("response_format", "json_schema", "json schema", "structured output", "guided")
_SERVER_MESSAGE_CHARS = 200


class LLMError(RuntimeError):
    """The endpoint is unusable for this call (down, key refused, model unknown, or a batch
    of embeddings failed); the message is one line naming ``base_url``, never the key.
    ``usage``: what the call cost until it stopped (items never answered count as failed),
    or None when it failed before any request."""

    def __init__(self, message: str, usage: "LLMUsage | None" = None):
        super().__init__(message)
        self.usage = usage


@dataclass
class LLMAnswer:
    """The LLM's answer for one text.

    ``label``: one of the classes (a tag set's text form for a multi-label client), or
    None; ``confidence``: p(label) from token logprobs,
    None when the server gave none; ``proba``: (c,) over the classes in the order given,
    None without logprobs; ``status``: "ok", "outside" (a label not among the classes),
    "malformed" (no label could be read) or "failed" (no answer: ``reason`` says why).
    """

    label: str | None
    confidence: float | None
    proba: np.ndarray | None
    status: str
    reason: str | None = None


@dataclass
class LLMUsage:
    """What a call cost. ``requests``: HTTP requests sent (retries included); ``failed``:
    items (or embedding batches) with no answer; ``retried``: requests that were retries;
    ``outside``/``malformed``: answers counted so; tokens as the server reported them
    (None: it reported none); ``seconds``: wall time. ``reasons``: failure line -> count
    (not in :meth:`as_dict`). Addable: ``a + b``."""

    requests: int = 0
    failed: int = 0
    retried: int = 0
    outside: int = 0
    malformed: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "LLMUsage") -> "LLMUsage":
        if not isinstance(other, LLMUsage):
            return NotImplemented
        reasons = dict(self.reasons)
        for reason, count in other.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
        return LLMUsage(
            requests=self.requests + other.requests, failed=self.failed + other.failed,
            retried=self.retried + other.retried, outside=self.outside + other.outside,
            malformed=self.malformed + other.malformed,
            prompt_tokens=_add_optional(self.prompt_tokens, other.prompt_tokens),
            completion_tokens=_add_optional(self.completion_tokens, other.completion_tokens),
            seconds=self.seconds + other.seconds, reasons=reasons,
        )

    def as_dict(self) -> dict[str, Any]:
        """The counters for a report: every field but ``reasons``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reasons"}

    def count_tokens(self, usage: Any) -> None:
        """Adds a response's ``usage.{prompt_tokens, completion_tokens}`` where given."""
        if not isinstance(usage, dict):
            return
        for name in ("prompt_tokens", "completion_tokens"):
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, _add_optional(getattr(self, name), value))

    def fail(self, reason: str) -> None:
        self.failed += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def _add_optional(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


@dataclass(frozen=True)
class _Mode:
    """What a chat request asks of the server: the response format and logprobs."""

    response_format: str | None = "json_schema"  # "json_schema" | "json_object" | None
    logprobs: bool = True


class _Stopped(Exception):
    """A request ended the call's work; ``usage``: what that item's requests cost."""

    def __init__(self, message: str = "", usage: "LLMUsage | None" = None):
        super().__init__(message)
        self.usage = usage or LLMUsage()


class _Fatal(_Stopped):
    """The endpoint is unusable: the whole call fails (message: the reason, one line)."""


class _Failed(Exception):
    """This request has no answer (message: the reason, one line)."""


class _Rejected(Exception):
    """The server answered 400/422 (message: the status, path and its own error text,
    redacted)."""


class _Cancelled(_Stopped):
    """Another request of the call hit a fatal error: stop before sending more."""


class _Call:
    """One classify or embed call's shared state: ``stop`` (set when the call ends early)
    and the count of items that failed in a row, every thread's together."""

    def __init__(self, limit: int):
        self.stop = threading.Event()
        self.limit = limit
        self._in_a_row = 0
        self._lock = threading.Lock()

    def record(self, failed: str | None, usage: LLMUsage) -> None:
        """Counts an item's outcome (``failed``: its reason, None when it was answered);
        the ``limit``-th failure in a row means the endpoint is unusable: _Fatal."""
        with self._lock:
            self._in_a_row = self._in_a_row + 1 if failed else 0
            if failed and self._in_a_row >= self.limit:
                raise _Fatal(f"{self._in_a_row} items in a row had no answer (the last: {failed})", usage)


class LLMClient:
    """A client of one ``[llm]`` endpoint; see the module docstring.

    ``environ`` (default ``os.environ``) is where ``api_key_env`` is looked up;
    ``transport`` replaces httpx's (tests); ``labels`` are the classes the
    :attr:`prompt_hash` covers (:meth:`from_settings` passes ``Settings.labels``);
    ``sleep(seconds)`` waits between retries (default: an interruptible wait);
    ``task``: "single_label" (one class per text) or "multi_label" (a tag set per text;
    part of the prompt's hash, so the two never share cached answers).
    """

    def __init__(self, settings: "LLMSettings", environ: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, *, labels: Sequence[str] | None = None,
                 sleep: Callable[[float], None] | None = None, task: str = "single_label"):
        if settings.base_url is None:
            raise ValueError("[llm] base_url is not set: the LLM is off (use LLMClient.from_settings)")
        if task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
        self.task = task
        self.settings = settings
        self.base_url = settings.base_url
        self.environ = os.environ if environ is None else environ
        self.labels = list(labels) if labels is not None else None
        self.prompt_hash = self.prompt_hash_for(self.labels or [])
        self._sleep = sleep
        # a tag set's probability is not read from token logprobs (docs/llm.md): none asked
        self._mode = _Mode(logprobs=task == "single_label")
        self._mode_lock = threading.Lock()
        self._key_lock = threading.Lock()
        self._key: str | None = None
        self._key_read = False
        limits = httpx.Limits(max_connections=settings.max_concurrency,
                              max_keepalive_connections=settings.max_concurrency)
        self._http = httpx.Client(
            timeout=httpx.Timeout(settings.timeout_seconds), limits=limits, transport=transport,
            verify=_ssl_context(),
            headers={"User-Agent": f"alflow/{__version__}", "Content-Type": "application/json"},
        )

    @classmethod
    def from_settings(cls, settings: "Settings | LLMSettings", environ: Mapping[str, str] | None = None,
                      transport: httpx.BaseTransport | None = None) -> "LLMClient | None":
        """A client of ``settings.llm`` (or of the ``LLMSettings`` given), None when
        ``base_url`` is unset. Given the whole Settings, the prompt hash covers its labels
        and the client asks as its ``task`` says."""
        llm = getattr(settings, "llm", settings)
        if llm.base_url is None:
            return None
        return cls(llm, environ, transport, labels=getattr(settings, "labels", None),
                   task=getattr(settings, "task", "single_label"))

    def __repr__(self) -> str:  # never the key
        return f"LLMClient(base_url={self.base_url!r}, model={self.settings.model!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- lineage ---------------------------------------------------------------------------
    def prompt_hash_for(self, labels: Sequence[str]) -> str:
        """sha256 (first 16 hex digits) of the prompt template, the classes, their
        descriptions and ``max_text_chars`` (and a multi-label client's task): what makes
        two answers for one item and model comparable."""
        s = self.settings
        what = {"prompt": s.prompt, "labels": list(labels),
                "descriptions": dict(sorted(s.label_descriptions.items())), "max_text_chars": s.max_text_chars}
        if self.task != "single_label":  # single-label hashes stay as they were: their caches hold
            what["task"] = self.task
        payload = json.dumps(what, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    @property
    def lineage(self) -> dict[str, str | None]:
        """``{"base_url", "model", "prompt_hash"}``: where a pre-label came from; no key."""
        return {"base_url": self.base_url, "model": self.settings.model, "prompt_hash": self.prompt_hash}

    @property
    def mode(self) -> dict[str, Any]:
        """What chat requests ask for now (after any fallback): ``response_format`` and
        ``logprobs``."""
        return {"response_format": self._mode.response_format, "logprobs": self._mode.logprobs}

    def render(self, text: str, labels: Sequence[str]) -> str:
        """The user message for ``text`` (its first ``max_text_chars`` characters): the
        template with its placeholders filled."""
        described = [f"- {label}: {self.settings.label_descriptions[label]}" for label in labels
                     if label in self.settings.label_descriptions]
        return (self.settings.prompt.replace("{labels}", ", ".join(labels))
                .replace("{descriptions}", "\n".join(described))
                .replace("{text}", text[:self.settings.max_text_chars]))

    # -- chat: zero-shot labels ------------------------------------------------------------------
    def classify(self, texts: Sequence[str], labels: Sequence[str]) -> tuple[list[LLMAnswer], LLMUsage]:
        """One answer per text, in input order, and the call's usage: a class of ``labels``,
        or for a multi-label client a set of those tags (its text form, no confidence).

        A text with no answer gets status "failed" (the reason in ``LLMAnswer.reason`` and
        ``LLMUsage.reasons``); raises :class:`LLMError` only when the endpoint is unusable
        (connection refused, 401, 403, 404, the key unreadable, no ``model`` set).
        """
        labels = _check_labels(labels)
        if not self.settings.model:
            raise LLMError(f"LLM endpoint {self.base_url}: no chat model: set [llm] model")
        started = time.monotonic()
        results = self._run(lambda text, call: self._classify_one(text, labels, call), list(texts))
        answers = [answer for answer, _ in results]
        usage = sum((one for _, one in results), LLMUsage())
        usage.seconds = time.monotonic() - started
        return answers, usage

    def _classify_one(self, text: str, labels: list[str], call: _Call) -> tuple[LLMAnswer, LLMUsage]:
        answer, usage = self._ask(text, labels, call.stop)
        call.record(answer.reason if answer.status == "failed" else None, usage)
        return answer, usage

    def _ask(self, text: str, labels: list[str], stop: threading.Event) -> tuple[LLMAnswer, LLMUsage]:
        usage = LLMUsage()
        message = self.render(text, labels)
        while True:
            mode = self._mode
            try:
                data = self._post("/chat/completions", self._chat_body(message, labels, mode), usage, stop)
            except _Rejected as exc:
                if self._fall_back(mode, str(exc)):
                    continue
                reason = str(exc)
            except _Failed as exc:
                reason = str(exc)
            else:
                usage.count_tokens(data.get("usage"))
                answer = read_answer(data, labels) if self.task == "single_label" else read_tags_answer(data, labels)
                if answer.status == "failed":
                    usage.fail(answer.reason or "unreadable answer")
                elif answer.status != "ok":
                    setattr(usage, answer.status, getattr(usage, answer.status) + 1)
                return answer, usage
            usage.fail(reason)
            return LLMAnswer(None, None, None, "failed", reason), usage

    def _chat_body(self, message: str, labels: list[str], mode: _Mode) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.settings.model,
            "messages": [{"role": "user", "content": message}],
            "temperature": 0,
        }
        if mode.response_format == "json_schema" and self.task == "multi_label":
            # an object around the array: OpenAI's strict mode wants an object at the root
            tags = {"type": "array", "items": {"type": "string", "enum": labels}, "uniqueItems": True}
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "tags", "strict": True,
                "schema": {"type": "object", "properties": {"tags": tags}, "required": ["tags"],
                           "additionalProperties": False},
            }}
        elif mode.response_format == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "label", "strict": True,
                "schema": {"type": "object", "properties": {"label": {"type": "string", "enum": labels}},
                           "required": ["label"], "additionalProperties": False},
            }}
        elif mode.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        if mode.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = TOP_LOGPROBS
        return body

    def _fall_back(self, mode: _Mode, message: str) -> bool:
        """After a 400 to a request sent in ``mode``: ask less from now on if the server's
        message names what it rejects. True when the request should be sent again."""
        lowered = message.lower()
        with self._mode_lock:
            if self._mode != mode:
                return True  # another request already fell back: send this one again
            if "logprob" in lowered and mode.logprobs:
                self._mode = replace(mode, logprobs=False)
                asked = "without logprobs (no confidence)"
            elif any(word in lowered for word in _FORMAT_WORDS) and mode.response_format:
                fallback = "json_object" if mode.response_format == "json_schema" else None
                self._mode = replace(mode, response_format=fallback)
                asked = f"response_format {fallback}" if fallback else "no response_format"
            else:
                return False
        log.warning("LLM endpoint %s rejected a request (%s); asking with %s from now on",
                    self.base_url, message, asked)
        return True

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, texts: Sequence[str], model: str | None = None) -> tuple[np.ndarray, LLMUsage]:
        """(n, d) float32 L2-normalised rows in input order ((0, 0) for no texts), from
        ``model`` or ``[llm] embedding_model``, ``embedding_batch_size`` texts per request,
        each text's first ``max_text_chars`` characters.
        Raises :class:`LLMError` when a batch has no answer after its retries (the batches
        not yet sent are not)."""
        model = model or self.settings.embedding_model
        if not model:
            raise LLMError(f"LLM endpoint {self.base_url}: no embedding model: set [llm] embedding_model")
        limit = self.settings.max_text_chars  # a whole article would overflow the model's context
        texts = [text[:limit] for text in texts]
        started = time.monotonic()
        size = self.settings.embedding_batch_size
        batches = [(start, texts[start:start + size]) for start in range(0, len(texts), size)]
        results = self._run(lambda batch, call: self._embed_batch(batch, len(batches), model, call.stop), batches)
        usage = sum((one for _, one in results), LLMUsage())
        usage.seconds = time.monotonic() - started
        if not results:
            return np.zeros((0, 0), dtype=np.float32), usage
        dims = sorted({vectors.shape[1] for vectors, _ in results})
        if len(dims) > 1:
            raise LLMError(f"LLM endpoint {self.base_url}: model {model!r} answered vectors of {dims} "
                           "dimensions in one call", usage)
        matrix = np.vstack([vectors for vectors, _ in results]).astype(np.float32)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        np.divide(matrix, norms, out=matrix, where=norms > 0)
        return matrix, usage

    def _embed_batch(self, batch: tuple[int, list[str]], count: int, model: str,
                     stop: threading.Event) -> tuple[np.ndarray, LLMUsage]:
        """The (b, d) vectors of ``batch`` = (position of its first text, its texts), one
        of ``count``; a batch without them ends the call (_Fatal)."""
        start, texts = batch
        usage = LLMUsage()
        try:
            data = self._post("/embeddings", {"model": model, "input": texts}, usage, stop)
            vectors = read_embeddings(data, len(texts))
        except (_Rejected, _Failed) as exc:
            number = start // self.settings.embedding_batch_size + 1
            raise _Fatal(f"embeddings of items {start}-{start + len(texts) - 1} (batch {number} of {count}) "
                         f"failed: {exc}", usage) from None
        usage.count_tokens(data.get("usage"))
        return vectors, usage

    # -- transport ------------------------------------------------------------------------------
    def _run(self, one: Callable[[Any, _Call], tuple[Any, LLMUsage]],
             items: list) -> list[tuple[Any, LLMUsage]]:
        """``one(item, call)`` for every item, ``max_concurrency`` at once, results in input
        order. The first fatal error (a refused connection, 401/403/404, or
        ``2 x max_concurrency`` (at least 5) items in a row without an answer: an endpoint
        that is down for good) stops the rest and raises :class:`LLMError`."""
        if not items:
            return []
        self._authorization()  # an unreadable key fails the call before any request
        started = time.monotonic()
        call = _Call(max(FAILURES_IN_A_ROW, 2 * self.settings.max_concurrency))
        stop = call.stop

        def guarded(item: Any) -> tuple[Any, LLMUsage]:
            try:
                return one(item, call)
            except _Fatal:
                stop.set()  # here, not in the caller: the next item may already be starting
                raise

        workers = min(self.settings.max_concurrency, len(items))
        with ThreadPoolExecutor(workers, thread_name_prefix="alflow-llm") as pool:
            futures = [pool.submit(guarded, item) for item in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            if stop.is_set() or any(f.done() and f.exception() is not None for f in futures):
                stop.set()
                for future in futures:
                    future.cancel()
                wait(futures)  # the running ones end at their next request or retry wait
                finished = [f for f in futures if not f.cancelled()]
                errors = [f.exception() for f in finished if f.exception() is not None]
                fatal = next((e for e in errors if isinstance(e, _Fatal)), None)
                if fatal is None:
                    raise next(e for e in errors if not isinstance(e, _Cancelled))
                answered = [f.result()[1] for f in finished if f.exception() is None]
                usage = sum(answered, LLMUsage())
                # the stopped items' requests count; each of them is one failed item below
                usage = sum((replace(e.usage, failed=0) for e in errors if isinstance(e, _Stopped)), usage)
                usage.failed += len(items) - len(answered)
                usage.seconds = time.monotonic() - started
                raise LLMError(f"LLM endpoint {self.base_url}: {fatal}", usage) from None
        return [future.result() for future in futures]

    def _authorization(self) -> dict[str, str]:
        with self._key_lock:
            if not self._key_read:
                s = self.settings
                try:
                    self._key = read_api_key(s.api_key_env, s.api_key_secret, self.environ)
                except KeyUnavailable as exc:
                    raise LLMError(f"LLM endpoint {self.base_url}: {exc}") from None
                self._key_read = True
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def _server_message(self, response: httpx.Response) -> str:
        """The server's error text (OpenAI's ``error.message``, else the body), one line,
        short, with the key redacted."""
        try:
            data = response.json()
            message = data["error"]["message"] if isinstance(data.get("error"), dict) else data.get("error")
        except (ValueError, AttributeError, KeyError, TypeError):
            message = None
        text = str(message) if message else response.text
        text = " ".join(text.split())[:_SERVER_MESSAGE_CHARS] or "no message"
        return redact(text, (self._key,) if self._key else ())

    def _refused(self, status: int, path: str, response: httpx.Response) -> str:
        if status in (401, 403):
            s = self.settings
            where = (f"api_key_env = {s.api_key_env}" if s.api_key_env else
                     f"api_key_secret = {s.api_key_secret}" if s.api_key_secret else
                     "no key is configured: set api_key_env or api_key_secret")
            return f"HTTP {status} on {path}: the endpoint refused the key ({where})"
        return f"HTTP {status} on {path}: {self._server_message(response)}"

    def _post(self, path: str, body: dict, usage: LLMUsage, stop: threading.Event) -> dict:
        """The JSON answer of ``POST {base_url}{path}``, retried as the module docstring
        says. Raises _Fatal, _Failed, _Rejected or _Cancelled."""
        s = self.settings
        url = self.base_url + path
        headers = self._authorization()
        attempt = 0
        while True:
            if stop.is_set():
                raise _Cancelled(usage=usage)
            usage.requests += 1
            if attempt:
                usage.retried += 1
            retry_after = None
            try:
                response = self._http.post(url, json=body, headers=headers)
            except httpx.ConnectError as exc:
                detail = "connection refused" if "refused" in str(exc).lower() else type(exc).__name__
                raise _Fatal(f"cannot connect ({detail})", usage) from None
            except httpx.TimeoutException:
                problem = f"timed out after {s.timeout_seconds:g} s"
            except httpx.TransportError as exc:
                problem = f"connection lost ({type(exc).__name__})"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        data = response.json()
                    except ValueError:
                        data = None
                    if not isinstance(data, dict):
                        raise _Failed(f"HTTP 200 on {path} with a body that is not a JSON object")
                    return data
                if status in FATAL_STATUS:
                    raise _Fatal(self._refused(status, path, response), usage)
                if status in (400, 422):
                    raise _Rejected(f"HTTP {status} on {path}: {self._server_message(response)}")
                if status != 429 and status < 500:
                    raise _Failed(f"HTTP {status} on {path}: {self._server_message(response)}")
                problem = f"HTTP {status}"
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            if retry_after is not None and retry_after > s.max_retry_after_seconds:
                raise _Failed(f"{problem} on {path} asked to wait {math.ceil(retry_after)} s (Retry-After), more "
                              f"than max_retry_after_seconds = {s.max_retry_after_seconds:g}")
            if attempt >= s.retries:
                raise _Failed(f"{problem} on {path} after {s.retries} {'retry' if s.retries == 1 else 'retries'}")
            pause = retry_after if retry_after is not None else s.retry_wait_seconds * 2 ** attempt
            log.info("LLM endpoint %s: %s on %s, retry %d of %d in %.1f s", self.base_url, problem, path,
                     attempt + 1, s.retries, pause)
            if self._sleep is not None:
                self._sleep(pause)
            elif stop.wait(pause):
                raise _Cancelled(usage=usage)
            attempt += 1


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The system's CA bundle, loaded once per process (tens of ms each time otherwise)."""
    return httpx.create_ssl_context()


# -- reading answers ------------------------------------------------------------------------------
def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(label) for label in labels]
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        raise ValueError(f"labels must be two or more distinct non-empty classes (got {labels})")
    return labels


def match_class(value: str, labels: Sequence[str]) -> str | None:
    """The class ``value`` names: exactly (spaces around ignored), else the one class equal
    to it ignoring case; None otherwise."""
    value = value.strip()
    if value in labels:
        return value
    folded = [label for label in labels if label.casefold() == value.casefold()]
    return folded[0] if len(folded) == 1 else None


def parse_label(content: str, labels: Sequence[str]) -> tuple[str | None, str, str | None]:
    """(class, status, raw) for a chat answer's content; see the module docstring.

    ``raw`` is the label text as written in ``content`` (None when none was read); status
    is "ok", "outside" or "malformed".
    """
    text = content.strip()
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = text  # a bare class name
    if isinstance(data, dict):
        raw = data.get("label")
        if not isinstance(raw, str):
            return None, "malformed", None
        found = match_class(raw, labels)
        return (found, "ok", raw) if found else (None, "outside", raw)
    if not isinstance(data, str):
        return None, "malformed", None
    found = match_class(data, labels)
    return (found, "ok", data.strip()) if found else (None, "malformed", None)


def _choice(data: dict) -> tuple[dict, str] | LLMAnswer:
    """(choices[0], its message's content) of a chat completion's JSON, or the failed or
    malformed :class:`LLMAnswer` when it has none."""
    try:
        choice = data["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return LLMAnswer(None, None, None, "failed", "HTTP 200 on /chat/completions without choices[0].message")
    return (choice, content) if isinstance(content, str) else LLMAnswer(None, None, None, "malformed")


def read_answer(data: dict, labels: list[str]) -> LLMAnswer:
    """An :class:`LLMAnswer` from a chat completion's JSON."""
    read = _choice(data)
    if isinstance(read, LLMAnswer):
        return read
    choice, content = read
    label, status, raw = parse_label(content, labels)
    if label is None:
        return LLMAnswer(None, None, None, status)
    logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
    tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
    try:
        proba = label_proba(content, raw, label, labels, tokens) if isinstance(tokens, list) and tokens else None
    except (TypeError, ValueError, AttributeError, KeyError):
        proba = None  # logprobs not in OpenAI's shape: a label without a confidence
    confidence = float(proba[labels.index(label)]) if proba is not None else None
    return LLMAnswer(label, confidence, proba, "ok")


def parse_tags_answer(content: str, tags: Sequence[str]) -> tuple[str | None, str]:
    """(the tag set's text form, status) for a multi-label chat answer's content.

    A JSON object with a ``tags`` array, or a bare JSON array, of tag names (each matched
    as :func:`match_class` matches a class; a tag repeated counts once); ``[]`` is the
    empty set "". A name that is not a tag makes the whole answer "outside" (no part of
    it is used); anything else (prose, a non-array, a non-string item) is "malformed".
    """
    try:
        data: Any = json.loads(content.strip())
    except ValueError:
        return None, "malformed"
    if isinstance(data, dict):
        data = data.get("tags")
    if not isinstance(data, list) or not all(isinstance(name, str) for name in data):
        return None, "malformed"
    found = [match_class(name, tags) for name in data]
    if any(tag is None for tag in found):
        return None, "outside"
    return format_tags(found), "ok"


def read_tags_answer(data: dict, tags: list[str]) -> LLMAnswer:
    """An :class:`LLMAnswer` of a tag set from a chat completion's JSON: its text form as
    the label, no confidence (see :func:`parse_tags_answer`)."""
    read = _choice(data)
    if isinstance(read, LLMAnswer):
        return read
    label, status = parse_tags_answer(read[1], tags)
    return LLMAnswer(label, None, None, status)


def label_proba(content: str, raw: str | None, label: str, labels: list[str],
                tokens: list[dict]) -> np.ndarray | None:
    """(c,) probabilities over ``labels`` from the logprobs of the answer's label tokens,
    or None when they cannot be lined up with the content.

    The label's first token and its ``top_logprobs`` alternatives: each alternative that
    begins a class (or is a whole class) gives it its probability; an alternative that
    begins several classes is split between them, for the answered label's own first token
    by the probability of the label's later tokens. Renormalised over the classes.
    """
    try:
        texts = [str(t["token"]) for t in tokens]
        logprobs = [float(t["logprob"]) for t in tokens]
    except (KeyError, TypeError, ValueError):
        return None
    if "".join(texts) != content or raw is None:
        return None
    match = _JSON_LABEL.search(content)
    start = match.end() if match and content[match.end():].startswith(raw) else content.find(raw.strip())
    if start < 0:
        return None
    end = start + len(raw.strip())
    offsets = np.cumsum([0] + [len(t) for t in texts])
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    skip = start - int(offsets[first])  # characters of the first token before the label
    prefix = texts[first][:skip]
    alternatives = {str(a.get("token", "")): float(a.get("logprob", -math.inf))
                    for a in tokens[first].get("top_logprobs") or [] if isinstance(a, dict)}
    alternatives.setdefault(texts[first], logprobs[first])
    mass = np.zeros(len(labels))
    own_group: list[int] = []
    for alternative, logprob in alternatives.items():
        if not alternative.startswith(prefix):
            continue
        group = _classes_begun_by(alternative[skip:], labels)
        if not group:
            continue
        mass[group] += math.exp(logprob) / len(group)
        if alternative == texts[first]:
            own_group = group
    own = labels.index(label)
    if len(own_group) > 1 and own in own_group:
        later = [i for i in range(first + 1, len(texts)) if offsets[i] < end]
        p_rest = math.exp(sum(logprobs[i] for i in later))
        total = mass[own_group].sum()
        mass[own_group] = total * (1 - p_rest) / (len(own_group) - 1)
        mass[own] = total * p_rest
    if mass.sum() <= 0:
        return None
    return mass / mass.sum()


def _classes_begun_by(piece: str, labels: list[str]) -> list[int]:
    """Indexes of the classes ``piece`` begins (or is, followed by JSON's closing marks)."""
    folded = piece.casefold()
    if not folded.strip():
        return []
    return [j for j, label in enumerate(labels)
            if label.casefold().startswith(folded)
            or (folded.startswith(label.casefold()) and _LABEL_END.match(folded[len(label):]))]


def read_embeddings(data: dict, expected: int) -> np.ndarray:
    """(expected, d) float64 from an embeddings answer, rows placed by ``data[i].index``.
    Raises _Failed when the answer does not hold exactly one vector per input."""
    try:
        rows = data["data"]
        by_index = {int(row["index"]): row["embedding"] for row in rows}
    except (KeyError, TypeError, ValueError):
        raise _Failed("HTTP 200 on /embeddings without data[i].index and data[i].embedding") from None
    if sorted(by_index) != list(range(expected)) or len(rows) != expected:
        raise _Failed(f"HTTP 200 on /embeddings with {len(rows)} vectors for {expected} inputs")
    try:
        vectors = np.array([by_index[i] for i in range(expected)], dtype=np.float64)
    except (TypeError, ValueError):
        raise _Failed("HTTP 200 on /embeddings with vectors that are not lists of numbers") from None
    if vectors.ndim != 2 or not np.isfinite(vectors).all():
        raise _Failed("HTTP 200 on /embeddings with vectors of differing lengths or non-finite values")
    return vectors
