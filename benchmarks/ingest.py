"""Ingest throughput into DuckDB with dedup: ours vs two baselines, side by side in one run.

On a CSV of ``--rows`` records built from the shared AG News texts (seeded; about 5% of the
rows repeat an earlier one, so deduplication has work to do), measures:

* **ours**, through the public entry point: ``alflow ingest`` in a fresh process on a config
  whose files source is that CSV (a first run into an empty store, then a re-run of the
  unchanged file, then ``--full``, which reads and matches every row again). Reported as the
  wall of the command (start-up included) and as the in-task rate (the ``ingest-corpus``
  task run's time as Prefect recorded it);
* **previous**: the path this replaced, rebuilt here (``connector.fetch`` -> ``to_row`` per
  record -> a DataFrame per 5,000 -> ``NOT IN`` count + ``INSERT ... ON CONFLICT``, a
  connection per chunk), in-process;
* **floor**: DuckDB alone - ``read_csv`` + the same normalisation and sha256 in SQL + an
  anti-join insert into the same ``items`` table - in-process.

Prints the rates and the ratios, and writes ``benchmarks/results/ingest.md``. Run on a shared
machine, take the ratios (all measured in this run) over the absolute numbers.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ingest.py --rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AG_NEWS = REPO.parent / "shared" / "datasets" / "ag_news_7600.csv"
LABELS = ["world", "sports", "business", "scitech"]


def make_corpus(path: Path, rows: int, seed: int = 0, duplicate_share: float = 0.05) -> Path:
    """A CSV (title, text, label) of ``rows`` AG News records: each text made distinct by a
    number, then ``duplicate_share`` of the rows replaced by copies of earlier ones."""
    source = pd.read_csv(AG_NEWS)
    rng = np.random.default_rng(seed)
    frame = source.iloc[rng.integers(0, len(source), rows)].reset_index(drop=True)
    frame["text"] = frame["text"] + " (" + pd.Series(np.arange(rows)).astype(str) + ")"
    copies = rng.choice(np.arange(1, rows), size=int(rows * duplicate_share), replace=False)
    frame.iloc[copies] = frame.iloc[rng.integers(0, copies)].to_numpy()  # each a copy of an earlier row
    frame.to_csv(path, index=False)
    return path


def write_config(folder: Path, csv_path: Path) -> Path:
    config = folder / "alflow.toml"
    config.write_text(
        f'labels = {json.dumps(LABELS)}\ndatabase = "state/alflow.duckdb"\nmodels_dir = "state/models"\n'
        f'seed = 7\n\n[evaluation]\nmethod = "holdout"\nholdout_fraction = 0.2\n\n'
        f'[[sources]]\ntype = "files"\nname = "corpus"\npath = "{csv_path.as_posix()}"\n'
        'title_column = "title"\nlabel_column = "label"\n',
        encoding="utf-8",
    )
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Alflow:
    """The `alflow` command in fresh processes, against its own Prefect server on 127.0.0.1."""

    def __init__(self, config: Path, home: Path):
        self.config = config
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ALFLOW_"))}
        self.env.update(PREFECT_HOME=str(home), PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
                        PREFECT_LOGGING_LEVEL="WARNING")

    def __call__(self, *args: str) -> tuple[float, str]:
        """(wall seconds, stdout) of ``alflow ARGS --config CONFIG``; raises on a non-zero exit."""
        command = [sys.executable, "-m", "alflow.flows.cli", *args, "--config", str(self.config)]
        start = time.perf_counter()
        done = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return wall, done.stdout

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "alflow.flows.cli", "server", "stop", "--config", str(self.config)],
                       env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)


def in_task_seconds(api_url: str) -> float:
    """The last ``ingest-corpus`` task run's own time, as Prefect recorded it (its Running
    state: the ingest from opening the store to closing it, without the process start-up,
    the flow run around it and the artifact after it)."""
    import httpx

    runs = httpx.post(f"{api_url}/task_runs/filter", timeout=30, json={
        "sort": "END_TIME_DESC", "limit": 1, "task_runs": {"name": {"any_": ["ingest-corpus"]}}}).json()
    return float(runs[0]["total_run_time"])


def previous_path(csv_path: Path, database: Path) -> float:
    """Seconds of the ingest path this change replaced: a dict and a hash per record in
    Python, a pandas frame per 5,000, a count by ``NOT IN`` and ``ON CONFLICT DO NOTHING``."""
    from alflow.config import FilesSource
    from alflow.connectors import build_connector, to_row
    from alflow.tasks.store import Store

    store = Store(database)
    store.migrate()
    start = time.perf_counter()
    connector = build_connector(FilesSource(type="files", name="corpus", path=csv_path, title_column="title",
                                            label_column="label"))
    rows: list[dict] = []

    def flush() -> None:
        frame = pd.DataFrame(rows).drop_duplicates("item_id").assign(fetched_at=pd.Timestamp.now(), ingest_run="old")
        with store.transaction() as con:
            con.register("incoming", frame)
            con.execute("SELECT count(*) FROM incoming WHERE item_id NOT IN (SELECT item_id FROM items)").fetchone()
            con.execute("""INSERT INTO items BY NAME SELECT item_id, source, external_id, url, title, text,
                           gold_label, meta::JSON AS meta, fetched_at, ingest_run FROM incoming
                           ON CONFLICT DO NOTHING""")
            con.unregister("incoming")
        rows.clear()

    for record in connector.fetch():
        rows.append(to_row(record, "corpus"))
        if len(rows) >= 5000:
            flush()
    if rows:
        flush()
    return time.perf_counter() - start


def floor_path(csv_path: Path, database: Path) -> float:
    """Seconds of DuckDB alone: its CSV reader, the normalisation and hash in SQL (ASCII
    whitespace only, so not exactly the stored rule), one anti-join insert."""
    from alflow.tasks.store import Store

    store = Store(database)
    store.migrate()
    normal = "trim(regexp_replace(nfc_normalize({0}), '\\s+', ' ', 'g'))"
    start = time.perf_counter()
    with store.transaction() as con:
        con.execute(
            f"""INSERT INTO items BY NAME
            SELECT DISTINCT ON (item_id) * FROM (
                SELECT sha256(coalesce({normal.format('title')}, '') || chr(31) || {normal.format('text')}) AS item_id,
                       'corpus' AS source, {normal.format('title')} AS title, {normal.format('text')} AS text,
                       label AS gold_label, '{{}}'::JSON AS meta, now()::TIMESTAMP AS fetched_at,
                       'floor' AS ingest_run
                FROM read_csv(?, header = true, all_varchar = true))
            ANTI JOIN items USING (item_id)""",
            [str(csv_path)],
        )
    return time.perf_counter() - start


def arguments(argv: list[str] | None, doc: str, result: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / result)
    return parser.parse_args(argv)


@contextmanager
def bench_project(rows: int) -> Iterator[tuple[Alflow, Path, float]]:
    """A temporary project over ``make_corpus(rows)`` with its own Prefect server, started:
    (the `alflow` command on it, the corpus, the server's start-up seconds). The server is
    stopped and the folder removed on exit."""
    work = Path(tempfile.mkdtemp(prefix="alflow-bench-"))
    alflow = None
    try:
        csv_path = make_corpus(work / "corpus.csv", rows)
        alflow = Alflow(write_config(work, csv_path), work / "prefect-home")
        started, _ = alflow("server", "start")  # once: every command finds it running
        yield alflow, csv_path, started
    finally:
        if alflow is not None:
            alflow.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv, __doc__, "ingest.md")
    with bench_project(args.rows) as (alflow, csv_path, server):
        api = alflow.env["PREFECT_API_URL"]
        first_wall, first_out = alflow("ingest", "--no-progress")
        first_task = in_task_seconds(api)
        rerun_wall, rerun_out = alflow("ingest", "--no-progress")
        rerun_task = in_task_seconds(api)
        full_wall, full_out = alflow("ingest", "--no-progress", "--full")
        full_task = in_task_seconds(api)
        previous = previous_path(csv_path, csv_path.with_name("previous.duckdb"))
        floor = floor_path(csv_path, csv_path.with_name("floor.duckdb"))

    n = args.rows
    rate = lambda seconds: n / seconds
    rows = [
        ("ours, first run (in task)", first_task), ("ours, first run (`alflow ingest` wall)", first_wall),
        ("ours, re-run, file unchanged (in task)", rerun_task), ("ours, re-run (`alflow ingest` wall)", rerun_wall),
        ("ours, `--full` re-run, every row matched (in task)", full_task),
        ("ours, `--full` re-run (`alflow ingest` wall)", full_wall),
        ("previous path (in process)", previous), ("floor: DuckDB read_csv + SQL hash + insert (in process)", floor),
    ]
    lines = [
        f"# Ingest: {n:,} records into DuckDB with dedup", "",
        f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ingest.py --rows {n}` "
        f"({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)", "",
        f"`alflow ingest` said: first `{first_out.strip()}`; re-run `{rerun_out.strip()}`; "
        f"`--full` `{full_out.strip()}`. Prefect server start (once, before): {server:.1f} s.", "",
        "| path | seconds | records/s |", "|---|---:|---:|",
        *[f"| {name} | {seconds:.2f} | {rate(seconds):,.0f} |" for name, seconds in rows], "",
        "| ratio | value |", "|---|---:|",
        f"| first run in task: previous path / ours | {previous / first_task:.2f}× |",
        f"| first run in task: ours / floor | {first_task / floor:.2f}× |",
        f"| re-run in task: first run / re-run | {first_task / rerun_task:.1f}× |",
        f"| targets: first run ≥ 50k/s in task | {'met' if rate(first_task) >= 50_000 else 'NOT met'} "
        f"({rate(first_task):,.0f}/s) |",
        f"| targets: re-run ≥ 200k/s in task | {'met' if rate(rerun_task) >= 200_000 else 'NOT met'} "
        f"({rate(rerun_task):,.0f}/s) |",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
