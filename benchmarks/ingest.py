"""Ingest throughput into DuckDB with dedup: the `alflow ingest` command against DuckDB alone,
side by side in one run.

On a CSV of ``--rows`` records built from the shared AG News texts (seeded; about 5% of the
rows repeat an earlier one, so deduplication has work to do), measures:

* **ours**, through the public entry point: ``alflow ingest`` in a fresh process on a config
  whose files source is that CSV - a first run into an empty store (``--repeat`` times, each
  into a new store), then a re-run of the unchanged file, then ``--full`` (which reads and
  matches every row again). Reported as the wall of the whole command (start-up, Prefect's
  flow and task runs and the artifact included), its CPU seconds (every thread of the
  process, DuckDB's included) and as the in-task time (the ``ingest-corpus`` task run's
  time as Prefect recorded it);
* **floor**: DuckDB alone, in this process - ``read_csv``, the same normalisation and sha256
  in SQL (``normalise_sql``/``content_hash_sql`` of the files connector, the exact rule), the
  first copy of each item, one anti-join insert into the same ``items`` table, committed -
  before each first run of ours. Checked to store the very items ours stores;
* **floor, every run replaced**: the same with the normalisation written as the previous
  benchmark wrote it (``regexp_replace`` of every whitespace run, single spaces included;
  the same result, about four times the regex work);
* **Python's reader**: the path every file took before (``connector.fetch``, a record per row
  in Python, chunks of ``WRITE_CHUNK``), through ``ingest_source`` in this process, once;
* **start-up**: what the command imports before it reads a row, each in a fresh process
  (Prefect and the ingest flow's modules; scikit-learn, which the config's check of
  ``model.classifier`` imports), to say where the time outside the task goes.

Prints the rates and the ratios (medians over the repeats), and writes
``benchmarks/results/ingest.md``. Run on a shared machine, take the ratios (each measured
in this run) over the absolute numbers.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ingest.py --rows 1000000
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
import threading
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
        """(wall seconds, stdout) of ``alflow ARGS --config CONFIG``; raises on a non-zero exit.
        ``last_cpu``: the command's CPU seconds (user + system, all its threads); ``last_peak``:
        its process tree's peak resident bytes, sampled every 0.1 s (the children's
        ``ru_maxrss`` would report this process's own size: a child counts its parent's pages
        until it execs)."""
        wall, out, _, _, _ = self.measured(*args, timeout=1800)
        return wall, out

    def measured(self, *args: str, every: float = 0.1,
                 timeout: float = 3600) -> tuple[float, str, int, float, float]:
        """(wall seconds, stdout, peak resident bytes of its process tree, CPU seconds of the
        tree, CPU seconds of its descendants as last sampled) of ``alflow ARGS``, the tree
        sampled every ``every`` seconds; raises on a non-zero exit (``last_cpu`` and
        ``last_peak`` set first). The tree's CPU seconds count every process of it that was
        reaped (the Dask workers are: their cluster is closed before the command ends)."""
        command = [sys.executable, "-m", "alflow.flows.cli", *args, "--config", str(self.config)]
        cpu = children_cpu()
        start = time.perf_counter()
        process = subprocess.Popen(command, env=self.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        peak, seen, done = 0, {}, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_sample(process.pid, seen))
                done.wait(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out, err = process.communicate(timeout=timeout)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        self.last_cpu, self.last_peak = children_cpu() - cpu, peak
        if process.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{out}\n{err}")
        return wall, out, peak, self.last_cpu, sum(c for p, c in seen.items() if p != process.pid)

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "alflow.flows.cli", "server", "stop", "--config", str(self.config)],
                       env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's ended and reaped children so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def import_seconds(modules: str) -> float:
    """Wall seconds of ``import MODULES`` in a fresh interpreter (its start-up subtracted)."""
    def timed(code: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, timeout=300)
        return time.perf_counter() - start

    return timed(f"import {modules}") - timed("pass")


def tree_sample(pid: int, cpu: dict[int, float]) -> int:
    """Resident bytes of process ``pid`` and all its descendants now (0 once it is gone);
    records each one's CPU seconds so far in ``cpu`` (by pid)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            with process.oneshot():
                total += process.memory_info().rss
                times = process.cpu_times()
                cpu[process.pid] = times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def in_task_seconds(api_url: str) -> float:
    """The last ``ingest-corpus`` task run's own time, as Prefect recorded it (its Running
    state: the ingest from opening the store to closing it, without the process start-up,
    the flow run around it and the artifact after it)."""
    import httpx

    runs = httpx.post(f"{api_url}/task_runs/filter", timeout=30, json={
        "sort": "END_TIME_DESC", "limit": 1, "task_runs": {"name": {"any_": ["ingest-corpus"]}}}).json()
    return float(runs[0]["total_run_time"])


def python_reader_path(config: Path) -> float:
    """Seconds of the ingest as every file went before this change: Python's reader (a
    record per row), through ``ingest_source`` in this process, into a new store."""
    from alflow.config import load_config
    from alflow.connectors.files import FilesConnector
    from alflow.tasks.ingest import ingest_source
    from alflow.tasks.store import Store

    settings = load_config(config, environ={})
    new_store(settings.database.parent)
    Store(settings.database).migrate()
    scan = FilesConnector.record_scan
    FilesConnector.record_scan = lambda self, looked=True: None
    try:
        start = time.perf_counter()
        ingest_source(settings, "corpus", "python-reader")
        return time.perf_counter() - start
    finally:
        FilesConnector.record_scan = scan


def new_store(state: Path) -> None:
    """Empty the state folder for a new store, but for the Prefect server's pid file and log
    (`alflow server stop` finds the server by its pid file: without it, it would outlive the
    benchmark)."""
    for path in state.glob("*"):
        if not path.name.startswith("prefect-server"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def every_run_sql(expr: str) -> str:
    """The normalisation as the previous benchmark wrote it: every whitespace run replaced."""
    from alflow.connectors.files import _SPACE

    return f"trim(regexp_replace(nfc_normalize({expr}), '{_SPACE}+', ' ', 'g'))"


def floor_path(csv_path: Path, database: Path, normalise=None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of DuckDB alone: its CSV reader, the normalisation and hash
    in SQL, one copy of each item (the corpus repeats rows whole: any copy is the first one's
    twin), one anti-join insert, committed (the file closed, as ours closes it)."""
    from alflow.connectors.files import content_hash_sql, normalise_sql
    from alflow.tasks.store import Store

    normalise = normalise or normalise_sql
    for stale in (database, database.with_name(database.name + ".wal")):
        stale.unlink(missing_ok=True)
    store = Store(database)
    store.migrate()
    start, cpu = time.perf_counter(), time.process_time()
    with store.transaction() as con:
        con.execute(
            f"""INSERT INTO items BY NAME
            SELECT DISTINCT ON (item_id) * FROM (
                SELECT {content_hash_sql('text', 'title')} AS item_id, 'corpus' AS source, title, text,
                       gold_label, '{{}}'::JSON AS meta, now()::TIMESTAMP AS fetched_at, 'floor' AS ingest_run
                FROM (SELECT nullif({normalise('title')}, '') AS title, {normalise('text')} AS text,
                             label AS gold_label
                      FROM read_csv(?, header = true, all_varchar = true)))
            ANTI JOIN items USING (item_id)""",
            [str(csv_path)],
        )
    return time.perf_counter() - start, time.process_time() - cpu


def items_digest(database: Path) -> tuple[int, int]:
    """(count, an order-free hash) of the stored items' content columns."""
    import duckdb

    with duckdb.connect(str(database), read_only=True) as con:
        return tuple(con.execute(
            "SELECT count(*), bit_xor(hash(item_id, title, text, gold_label, meta::VARCHAR)) FROM items").fetchone())


def median(values: list[float]) -> float:
    return float(np.median(values))


def arguments(argv: list[str] | None, doc: str, result: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="first runs of ours and floors, each in a new store")
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
    load_start = os.getloadavg()[0]
    firsts, first_cpus, first_peaks, tasks, floors, floor_cpus, every_run = [], [], [], [], [], [], []
    with bench_project(args.rows) as (alflow, csv_path, server):
        api = alflow.env["PREFECT_API_URL"]
        state = alflow.config.parent / "state"
        for _ in range(args.repeat):
            wall, cpu = floor_path(csv_path, csv_path.with_name("floor.duckdb"))
            floors.append(wall)
            floor_cpus.append(cpu)
            every_run.append(floor_path(csv_path, csv_path.with_name("every-run.duckdb"), every_run_sql)[0])
            new_store(state)
            wall, first_out = alflow("ingest", "--no-progress")
            firsts.append(wall)
            first_cpus.append(alflow.last_cpu)
            first_peaks.append(alflow.last_peak)
            tasks.append(in_task_seconds(api))
        peak_rss = max(first_peaks)
        ours_items = items_digest(state / "alflow.duckdb")
        if ours_items != items_digest(csv_path.with_name("floor.duckdb")) or \
                ours_items != items_digest(csv_path.with_name("every-run.duckdb")):
            raise AssertionError("the floors stored other items than ours: not the same work")
        rerun_wall, rerun_out = alflow("ingest", "--no-progress")
        rerun_task = in_task_seconds(api)
        full_wall, full_out = alflow("ingest", "--no-progress", "--full")
        full_task = in_task_seconds(api)
        python_reader = python_reader_path(alflow.config)
    startup = {"Prefect and the ingest flow's modules": import_seconds("alflow.flows.ingest"),
               "scikit-learn (the config's model.classifier check)": import_seconds("sklearn.linear_model")}
    load_end = os.getloadavg()[0]

    n = args.rows
    first, task, floor, slow_floor = median(firsts), median(tasks), median(floors), median(every_run)
    first_cpu, floor_cpu = median(first_cpus), median(floor_cpus)

    def rate(seconds: float) -> str:
        return f"{n / seconds:,.0f}"

    def spread(values: list[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    rows = [
        ("ours, first run: `alflow ingest` wall", first, firsts),
        ("ours, first run: in task", task, tasks),
        ("ours, re-run, file unchanged: `alflow ingest` wall", rerun_wall, [rerun_wall]),
        ("ours, re-run, file unchanged: in task", rerun_task, [rerun_task]),
        ("ours, `--full` re-run, every row matched: `alflow ingest` wall", full_wall, [full_wall]),
        ("ours, `--full` re-run: in task", full_task, [full_task]),
        ("floor: DuckDB read_csv + the same SQL normalisation and sha256 + anti-join insert", floor, floors),
        ("floor, every whitespace run replaced (the previous benchmark's SQL)", slow_floor, every_run),
        ("Python's reader, the path before this change (in process)", python_reader, [python_reader]),
    ]
    command = (f"OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ingest.py --rows {n} "
               f"--repeat {args.repeat}")
    meets = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [
        f"# Ingest: {n:,} CSV records into DuckDB with dedup", "",
        f"`{command}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, load average {load_start:.1f} at the "
        f"start, {load_end:.1f} at the end). Medians over {args.repeat} first runs, each into a new store, each "
        "after the two floors.", "",
        f"`alflow ingest` said: first `{first_out.strip()}`; re-run `{rerun_out.strip()}`; "
        f"`--full` `{full_out.strip()}`. Prefect server start (once, before): {server:.1f} s. Peak RSS of a first "
        f"run's `alflow ingest` (its process, sampled every 0.1 s): {peak_rss / 2**20:,.0f} MiB. Each floor stored the very items ours stored.", "",
        "| path | seconds | records/s | runs (s) |", "|---|---:|---:|---|",
        *[f"| {name} | {seconds:.2f} | {rate(seconds)} | {spread(values)} |" for name, seconds, values in rows], "",
        f"Outside the task (start-up, imports, Prefect's flow and task runs, the artifact): "
        f"{first - task:.2f} s of the first run's wall, {rerun_wall - rerun_task:.2f} s of the re-run's; of it, "
        "imports alone (each in a fresh process, measured in this run): "
        + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in startup.items()) + ".", "",
        f"CPU seconds (less changed by other work on the machine than wall seconds): the first run's whole "
        f"`alflow ingest` process {first_cpu:.2f} s ({spread(first_cpus)}), the floor {floor_cpu:.2f} s "
        f"({spread(floor_cpus)}).", "",
        "| ratio | value |", "|---|---:|",
        f"| first run: `alflow ingest` wall rate / floor rate | {floor / first:.2f} |",
        f"| first run: in task rate / floor rate | {floor / task:.2f} |",
        f"| first run: floor CPU seconds / `alflow ingest` CPU seconds | {floor_cpu / first_cpu:.2f} |",
        f"| first run: `alflow ingest` wall rate / every-run floor rate | {slow_floor / first:.2f} |",
        f"| first run in task: Python's reader / ours | {python_reader / task:.1f}x |",
        f"| target: first run (`alflow ingest` wall) >= 0.75 of the floor | {meets(floor / first >= 0.75)} "
        f"({floor / first:.2f}) |",
        f"| target: unchanged re-run >= 1M records/s, in task | {meets(n / rerun_task >= 1e6)} "
        f"({rate(rerun_task)}/s) |",
        f"| target: unchanged re-run >= 1M records/s, `alflow ingest` wall | {meets(n / rerun_wall >= 1e6)} "
        f"({rate(rerun_wall)}/s) |",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
