"""FakeOpenAI: an OpenAI-compatible server on 127.0.0.1 with deterministic answers.

It speaks the real wire format of ``POST /v1/chat/completions`` and ``POST /v1/embeddings``
(what Ollama, vLLM, llama.cpp and LM Studio serve), so the client under test cannot tell
it from one of them:

* chat: the answer's label is the class of the keyword (case-insensitive) found earliest in
  the item's text: the last user message after its last ``Text:`` line (the default
  prompt's), or the whole message without one. With no keyword, the first class. The
  classes are the request's ``json_schema`` enum, else ``labels`` given to the
  constructor, else the keywords' classes in order. Content ``{"label": "<class>"}``;
  with ``logprobs`` each token carries its logprob and ``top_logprobs``; at the label's
  first token the alternatives are the classes' first tokens, p(answer) = ``confident``
  and the rest spread evenly over the other classes. A class is two tokens (its first
  three characters, then the rest), so classes sharing a prefix share a first token, as
  with a real tokenizer. ``usage`` always. Asked for a tag set (a ``json_schema`` whose
  ``tags`` is an array of an ``enum`` of tags, as a multi-label client asks), the answer is
  ``{"tags": [...]}``: the tag of every keyword found (sorted; ``[]`` with none), without
  logprobs.
* embeddings: hashed bag-of-words vectors of ``embedding_dim`` (blake2b of each lowercased
  word picks a dimension and a sign), L2-normalised: deterministic across processes, and
  texts sharing words are close.
* scripted faults: :meth:`fail_next` (429/5xx/any status, with ``Retry-After``),
  :meth:`malformed_next` (content not JSON), :meth:`outside_next` (a label not among the
  classes), :meth:`reply_next` (these contents as they are), ``delay`` (seconds before
  every answer: timeouts), :meth:`down` (the port refuses connections).
  ``json_schema=False`` answers a json_schema ``response_format`` with 400,
  ``reject_logprobs=True`` answers ``logprobs`` with 400, ``api_key`` answers a request
  without that Bearer key with 401, ``models`` answers another model with 404.

Every request is kept in ``requests`` as ``(path, body, headers)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

OUTSIDE_LABEL = "none of these"
MALFORMED_CONTENT = "I would say this text is probably about something."
WORD = re.compile(r"\w+")


def hashed_embedding(text: str, dim: int) -> np.ndarray:
    """The fake's embedding of ``text``: (dim,) float64, L2-normalised (zeros for no words)."""
    vector = np.zeros(dim)
    for word in WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest()
        value = int.from_bytes(digest, "little")
        vector[value % dim] += 1.0 if (value >> 32) & 1 else -1.0
    norm = np.linalg.norm(vector)
    return vector / norm if norm else vector


def label_tokens(label: str) -> list[str]:
    """How the fake tokenizes a class: its first three characters, then the rest."""
    return [label[:3], label[3:]] if len(label) > 3 else [label]


class FakeOpenAI:
    """The server; a context manager. ``base_url`` is ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, keywords: dict[str, str], confident: float = 0.9, embedding_dim: int = 64,
                 logprobs: bool = True, json_schema: bool = True, *, labels: list[str] | None = None,
                 reject_logprobs: bool = False, api_key: str | None = None,
                 models: set[str] | None = None):
        self.keywords = keywords
        self.confident = confident
        self.embedding_dim = embedding_dim
        self.logprobs = logprobs
        self.json_schema = json_schema
        self.labels = labels
        self.reject_logprobs = reject_logprobs
        self.api_key = api_key
        self.models = models
        self.delay = 0.0
        self.requests: list[tuple[str, dict, dict]] = []
        self._faults: list[tuple[int, float | str | None]] = []
        self._malformed = 0
        self._outside = 0
        self._replies: list[str] = []
        self._in_flight = 0
        self.max_in_flight = 0  # the most requests being answered at once
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def keywords(self) -> dict[str, str]:
        """keyword -> class; assignable (a test may change the rules mid-way)."""
        return self._keywords

    @keywords.setter
    def keywords(self, value: dict[str, str]) -> None:
        self._keywords = {word.lower(): label for word, label in value.items()}

    # -- scripting ---------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 500, retry_after: float | str | None = None) -> None:
        """The next ``n`` requests (any path) answer ``status``, with ``Retry-After`` if given
        (seconds, or an HTTP date as a string)."""
        with self._lock:
            self._faults.extend([(status, retry_after)] * n)

    def malformed_next(self, n: int) -> None:
        """The next ``n`` chat answers are prose, not JSON."""
        with self._lock:
            self._malformed += n

    def outside_next(self, n: int) -> None:
        """The next ``n`` chat answers name a label that is not one of the classes."""
        with self._lock:
            self._outside += n

    def reply_next(self, *contents: str) -> None:
        """The next chat answers carry these contents as they are (no logprobs)."""
        with self._lock:
            self._replies.extend(contents)

    def down(self) -> None:
        """Stop serving and close the port: connections are refused from now on."""
        if not self._closed:
            self._closed = True
            self._server.shutdown()
            self._server.server_close()

    def close(self) -> None:
        self.down()

    def __enter__(self) -> "FakeOpenAI":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def paths(self) -> list[str]:
        """The path of every request so far, in arrival order."""
        with self._lock:
            return [path for path, _, _ in self.requests]

    # -- answering -------------------------------------------------------------------------
    def _take(self, what: str) -> bool:
        with self._lock:
            left = getattr(self, what)
            if left:
                setattr(self, what, left - 1)
            return bool(left)

    def _next_fault(self) -> tuple[int, float | str | None] | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def answer(self, path: str, body: dict, headers: dict) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers) for one request."""
        with self._lock:
            self.requests.append((path, body, headers))
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            return self._answer(path, body, headers)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, path: str, body: dict, headers: dict) -> tuple[int, dict, dict]:
        fault = self._next_fault()
        if fault is not None:
            status, retry_after = fault
            extra = {"Retry-After": str(retry_after)} if retry_after is not None else {}
            return status, _error(f"scripted fault {status}", "server_error"), extra
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            # Like OpenAI's, the message quotes the key it was given: a client must not repeat it.
            given = headers.get("authorization", "").removeprefix("Bearer ")
            return 401, _error(f"Incorrect API key provided: {given}", "invalid_request_error"), {}
        if self.models is not None and body.get("model") not in self.models:
            return 404, _error(f"model '{body.get('model')}' not found", "not_found_error"), {}
        if path == "/v1/chat/completions":
            return self._chat(body)
        if path == "/v1/embeddings":
            return self._embeddings(body)
        return 404, _error(f"no route {path}", "not_found_error"), {}

    def _classes(self, body: dict) -> list[str]:
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema":
            schema = response_format["json_schema"]["schema"]
            if "tags" in schema["properties"]:
                return list(schema["properties"]["tags"]["items"]["enum"])
            return list(schema["properties"]["label"]["enum"])
        if self.labels:
            return list(self.labels)
        return list(dict.fromkeys(self.keywords.values()))

    def _chat(self, body: dict) -> tuple[int, dict, dict]:
        response_format = (body.get("response_format") or {}).get("type")
        if response_format == "json_schema" and not self.json_schema:
            return 400, _error("response_format type 'json_schema' is not supported", "invalid_request_error"), {}
        if body.get("logprobs") and self.reject_logprobs:
            return 400, _error("logprobs are not supported by this model", "invalid_request_error"), {}
        classes = self._classes(body)
        schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}
        tagging = "tags" in (schema.get("properties") or {})
        user = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
        text = user[-1] if user else ""
        marker = text.rfind("Text:\n")
        text = text[marker + len("Text:\n"):] if marker >= 0 else text
        label = self.label_of(text, classes)
        with self._lock:
            reply = self._replies.pop(0) if self._replies else None
        if reply is not None:
            content, tokens = reply, None
        elif self._take("_malformed"):
            content, tokens = MALFORMED_CONTENT, None
        elif self._take("_outside"):
            content, tokens = json.dumps({"tags": [OUTSIDE_LABEL]} if tagging else {"label": OUTSIDE_LABEL}), None
        elif tagging:
            content, tokens = json.dumps({"tags": self.tags_of(text, classes)}), None
        else:
            tokens = self._label_logprobs(label, classes, int(body.get("top_logprobs") or 0))
            content = "".join(token["token"] for token in tokens)
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content},
                                  "finish_reason": "stop", "logprobs": None}
        if self.logprobs and body.get("logprobs") and tokens is not None:
            choice["logprobs"] = {"content": tokens}
        completion = len(tokens) if tokens else len(content.split())
        prompt = sum(len(WORD.findall(m.get("content", ""))) for m in body.get("messages", []))
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }, {}

    def label_of(self, text: str, classes: list[str]) -> str:
        """The class of the keyword found earliest in ``text``; the first class without one."""
        lowered = text.lower()
        found = [(lowered.find(word), label) for word, label in self.keywords.items()
                 if word in lowered and label in classes]
        return min(found)[1] if found else classes[0]

    def tags_of(self, text: str, tags: list[str]) -> list[str]:
        """The tags of every keyword found in ``text``, sorted ([] with none)."""
        lowered = text.lower()
        return sorted({tag for word, tag in self.keywords.items() if word in lowered and tag in tags})

    def _label_logprobs(self, label: str, classes: list[str], top: int) -> list[dict]:
        """The answer's tokens with their logprobs and ``top`` alternatives each."""
        others = [c for c in classes if c != label]
        p = {c: (self.confident if c == label else (1 - self.confident) / len(others)) for c in classes}
        first: dict[str, float] = {}
        for c in classes:
            first[label_tokens(c)[0]] = first.get(label_tokens(c)[0], 0.0) + p[c]
        own = label_tokens(label)
        group = first[own[0]]
        alternatives = sorted(first.items(), key=lambda kv: -kv[1])[:max(top, 1)]

        def token(text: str, prob: float, alts: list[tuple[str, float]] | None = None) -> dict:
            alts = alts if alts is not None else [(text, prob)]
            return {"token": text, "logprob": _log(prob), "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [{"token": t, "logprob": _log(q), "bytes": list(t.encode("utf-8"))}
                                     for t, q in alts[:top]]}

        tokens = [token('{"', 1.0), token("label", 1.0), token('":', 1.0), token(' "', 1.0),
                  token(own[0], group, alternatives)]
        if len(own) > 1:
            tokens.append(token(own[1], p[label] / group))
        tokens.append(token('"}', 1.0))
        return tokens

    def _embeddings(self, body: dict) -> tuple[int, dict, dict]:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            return 400, _error("input must be a string or a list of strings", "invalid_request_error"), {}
        data = [{"object": "embedding", "index": i,
                 "embedding": hashed_embedding(t, self.embedding_dim).round(6).tolist()}
                for i, t in enumerate(inputs)]
        data.reverse()  # the index, not the position, says which input a vector belongs to
        tokens = sum(len(WORD.findall(t)) for t in inputs)
        return 200, {"object": "list", "data": data, "model": body.get("model"),
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, {}


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -9999.0


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _handler(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers and httpx's pool expect
        # The headers and the body are two writes: with Nagle's algorithm the body waits for
        # the client's delayed ACK (40 ms a request on Linux), which real servers never pay.
        disable_nagle_algorithm = True

        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = self.path.split("?")[0]
            if not isinstance(body, dict):
                status, answer, extra = 400, _error("the body is not a JSON object", "invalid_request_error"), {}
            else:
                status, answer, extra = server.answer(path, body, headers)
            payload = json.dumps(answer).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            pass

    return Handler
