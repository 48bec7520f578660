"""The LLM client against an OpenAI-compatible endpoint: embeddings of a big pool, and the
throughput of zero-shot pre-labels at a few concurrencies, side by side in one run.

The endpoint is ``FakeOpenAI`` (tests/openai_server.py) on 127.0.0.1 in this process: it
answers in OpenAI's wire format with hashed bag-of-words vectors and keyword labels, so
what is measured is the client's own cost (request bodies, JSON parsing, ordering,
normalisation, retries bookkeeping, the thread pool) over the server's.

* **embeddings**: ``LLMClient.embed`` over ``--pool`` texts (the SMS corpus' texts, each
  made distinct by a number), ``embedding_batch_size`` texts per request and
  ``max_concurrency`` requests in flight; against the **floor**: the same number of
  ``POST /v1/embeddings`` requests with the request bodies precomputed, sent over as many
  keep-alive connections with ``http.client`` and the answers read as bytes, not parsed -
  what the fake server itself costs. The ratio ours / floor is the yardstick (1.0: the
  client adds nothing).
* **pre-labels**: ``LLMClient.classify`` over ``--items`` texts with the fake answering
  each chat request after ``--delay`` seconds (a model's latency), at concurrency 1, 4 and
  16; against the ideal ``items x delay / concurrency``.

Prints both tables and writes ``benchmarks/results/llm.md``.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/llm.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from datetime import date
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from openai_server import FakeOpenAI  # the tests' endpoint, the same wire format

from alflow.config.settings import LLMSettings
from alflow.connectors.llm import LLMClient

LABELS = ["ham", "spam"]
KEYWORDS = {"free": "spam", "prize": "spam", "claim": "spam", "txt": "spam", "win": "spam"}
COMMAND = "OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/llm.py"


def pool_texts(n: int) -> list[str]:
    """``n`` distinct texts: the SMS corpus' texts in turn, each with its number."""
    base = pd.read_csv(REPO / "data" / "sms_spam.csv")["text"].astype(str).tolist()
    return [f"{base[i % len(base)]} ({i})" for i in range(n)]


def client_for(server: FakeOpenAI, concurrency: int, batch_size: int) -> LLMClient:
    settings = LLMSettings(base_url=server.base_url, model="fake-chat", embedding_model="fake-embed",
                           max_concurrency=concurrency, embedding_batch_size=batch_size)
    return LLMClient(settings, environ={})


def embed_ours(server: FakeOpenAI, texts: list[str], concurrency: int, batch_size: int) -> tuple[float, int]:
    """(seconds, requests) of ``LLMClient.embed`` over ``texts``."""
    with client_for(server, concurrency, batch_size) as client:
        started = time.perf_counter()
        vectors, usage = client.embed(texts)
        seconds = time.perf_counter() - started
    assert vectors.shape == (len(texts), server.embedding_dim) and usage.failed == 0
    return seconds, usage.requests


def embed_floor(server: FakeOpenAI, texts: list[str], concurrency: int, batch_size: int) -> tuple[float, int]:
    """(seconds, requests) of the same requests with precomputed bodies, answers unread."""
    bodies = [json.dumps({"model": "fake-embed", "input": texts[i:i + batch_size]}).encode("utf-8")
              for i in range(0, len(texts), batch_size)]
    queue = list(reversed(bodies))
    lock = threading.Lock()
    errors: list[int] = []

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port)
        while True:
            with lock:
                if not queue:
                    break
                body = queue.pop()
            connection.request("POST", "/v1/embeddings", body=body,
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors.append(response.status)
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    assert not errors, errors
    return seconds, len(bodies)


def prelabel(server: FakeOpenAI, texts: list[str], concurrency: int) -> tuple[float, int]:
    """(seconds, answered items) of ``LLMClient.classify`` over ``texts``."""
    with client_for(server, concurrency, 64) as client:
        started = time.perf_counter()
        answers, usage = client.classify(texts, LABELS)
        seconds = time.perf_counter() - started
    assert usage.failed == 0
    return seconds, sum(a.status == "ok" for a in answers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=100_000, help="texts to embed")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per /embeddings request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight while embedding")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours and of the floor, alternating")
    parser.add_argument("--items", type=int, default=200, help="texts to pre-label at each concurrency")
    parser.add_argument("--delay", type=float, default=0.05, help="the fake model's seconds per chat answer")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "llm.md")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    texts = pool_texts(args.pool)

    with FakeOpenAI(KEYWORDS, labels=LABELS) as server:
        embed_floor(server, texts[:2000], args.concurrency, args.batch_size)  # warm both paths
        embed_ours(server, texts[:2000], args.concurrency, args.batch_size)
        ours, floor = [], []
        for _ in range(args.repeat):
            seconds, requests = embed_floor(server, texts, args.concurrency, args.batch_size)
            floor.append(seconds)
            seconds, ours_requests = embed_ours(server, texts, args.concurrency, args.batch_size)
            ours.append(seconds)
            assert ours_requests == requests, (ours_requests, requests)
        server.delay = args.delay
        rates = {}
        for concurrency in (1, 4, 16):
            seconds, answered = prelabel(server, texts[:args.items], concurrency)
            assert answered == args.items
            rates[concurrency] = seconds
        requests_total = len(server.requests)
    load_after = os.getloadavg()[0]

    ours_s, floor_s = statistics.median(ours), statistics.median(floor)
    embed_rows = [
        f"| `LLMClient.embed` ({args.concurrency} in flight) | {requests} | {ours_s:.2f} | "
        f"{args.pool / ours_s:,.0f} | **{ours_s / floor_s:.2f}x** |",
        f"| floor: the same requests, bodies precomputed, answers unread | {requests} | {floor_s:.2f} | "
        f"{args.pool / floor_s:,.0f} | 1.00x |",
    ]
    label_rows = []
    for concurrency, seconds in rates.items():
        ideal = args.items * args.delay / concurrency
        label_rows.append(
            f"| {concurrency} | {seconds:.2f} | {args.items / seconds:.1f} | {rates[1] / seconds:.2f}x | "
            f"{ideal:.2f} | {seconds / ideal:.2f}x |")
    text = "\n".join([
        f"# The LLM client: embeddings of a {args.pool:,}-text pool, pre-labels at 1, 4 and 16 in flight",
        "",
        f"`{COMMAND}` ({date.today().isoformat()}, {os.cpu_count()} cores; 1-minute load average "
        f"{load_before:.1f} at the start, {load_after:.1f} at the end: above 0 is other work sharing the "
        "cores, and the times are only as good as that). The endpoint is `FakeOpenAI` "
        "(`tests/openai_server.py`) on 127.0.0.1 in the same process, so the client and the server share "
        f"its GIL; {requests_total:,} requests in all.",
        "",
        f"Embeddings: {args.pool:,} texts, {args.batch_size} per request, {server.embedding_dim} dimensions, "
        f"median of {args.repeat} alternating runs (ours: {', '.join(f'{s:.2f}' for s in ours)} s; floor: "
        f"{', '.join(f'{s:.2f}' for s in floor)} s).",
        "",
        "| measured side by side | requests | seconds | texts/s | ratio to the floor |",
        "|---|---:|---:|---:|---:|",
        *embed_rows,
        "",
        f"Pre-labels: `LLMClient.classify` over {args.items} texts, the fake answering each chat request after "
        f"{args.delay * 1000:.0f} ms; the ideal is items x delay / concurrency.",
        "",
        "| max_concurrency | seconds | items/s | speed-up over 1 | ideal seconds | ratio to the ideal |",
        "|---:|---:|---:|---:|---:|---:|",
        *label_rows,
        "",
    ])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
