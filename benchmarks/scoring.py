"""Pre-label + query at 10k, 100k and 1M items vs the floor and vs modAL, side by side.

For each pool size, from the AG News texts of ``../shared/datasets/ag_news_7600.csv``
(items recombined from two texts' word spans, seeded, so every item is distinct and keeps
the first text's gold label), one store is built like a run leaves it after its cold
start (20 coverage picks answered from the gold labels, model v1 trained; evaluation on a
20% gold holdout). Then, each in its own subprocess (its own peak RSS, VmHWM):

* **alflow**: ``prelabel_pool`` (Arrow chunks out of DuckDB, bulk writes) + ``query_batch``
  (margin, 10% exploration, near-duplicate filter: the shipped defaults) on the pool;
* **floor**: bare ``model.predict_proba`` + margin + ``argpartition`` on the same pool texts,
  already in memory (the least any implementation must do);
* **modAL**: ``modAL.uncertainty.margin_sampling`` on the same texts with the same model;
* **margin query** and **badge query**: ``query_batch`` alone over the scored pool.

With ``--run-size N`` it also times the real command at N items: a config with a files
source on a generated CSV, ``alflow ingest`` once, then ``alflow run --auto --cycles 2
--no-ingest`` (cold start, then a full pre-label and query), its peak RSS from
``RUSAGE_CHILDREN`` of a wrapper process, against the floor of the same two cycles' model
work in one process (fit, holdout predictions, predict_proba over the pool, argpartition).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/scoring.py --sizes 10000,100000,1000000 \\
        --run-size 1000000 --out benchmarks/results/scoring.md

``--profile N`` prints where pre-label's time goes at size N (cProfile), next to the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
AG_NEWS = REPO.parent / "shared" / "datasets" / "ag_news_7600.csv"
LABELS = ["world", "sports", "business", "scitech"]
BATCH = 20
SEED = 7


# -- data -------------------------------------------------------------------------------------
def build_items(n: int, seed: int = SEED) -> pd.DataFrame:
    """``n`` distinct (text, label) items recombined from AG News: 60% of the words of one
    text (from a random offset) then 40% of another's; the label is the first text's."""
    frame = pd.read_csv(AG_NEWS)
    words = [str(t).split() for t in frame["text"]]
    labels = frame["label"].to_numpy()
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    gold: list[str] = []
    seen: set[str] = set()
    while len(texts) < n:
        m = int((n - len(texts)) * 1.01) + 16
        a, b = rng.integers(0, len(words), m), rng.integers(0, len(words), m)
        ua, ub = rng.random(m), rng.random(m)
        for i in range(m):
            wa, wb = words[a[i]], words[b[i]]
            la, lb = max(6, int(len(wa) * 0.6)), max(4, int(len(wb) * 0.4))
            sa, sb = int(ua[i] * max(1, len(wa) - la)), int(ub[i] * max(1, len(wb) - lb))
            text = " ".join(wa[sa:sa + la] + wb[sb:sb + lb])
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            gold.append(labels[a[i]])
            if len(texts) == n:
                break
    return pd.DataFrame({"text": texts, "label": gold})


def write_config(directory: Path, csv: Path) -> Path:
    config = directory / "alflow.toml"
    config.write_text(textwrap.dedent(f"""
        labels = {json.dumps(LABELS)}
        database = "state/alflow.duckdb"
        models_dir = "state/models"
        seed = {SEED}

        [query]
        batch_size = {BATCH}

        [evaluation]
        method = "holdout"
        holdout_fraction = 0.2

        [[sources]]
        type = "files"
        name = "corpus"
        path = "{csv.as_posix()}"
        text_column = "text"
        label_column = "label"
        """), encoding="utf-8")
    return config


def setup_store(directory: Path, n: int) -> dict:
    """A store of ``n`` items after a run's cold start (model v1); the pool's texts and
    the labeled ones as Parquet for the baselines. Returns setup timings."""
    from alflow.config import load_config
    from alflow.connectors.base import content_hash
    from alflow.tasks.query import query_batch
    from alflow.tasks.review import simulated_answers
    from alflow.tasks.store import DOC_SQL, Store
    from alflow.tasks.train import retrain

    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    items = build_items(n)
    csv = directory / "items.csv"
    items.to_csv(csv, index=False)
    settings = load_config(write_config(directory, csv))
    store = Store(settings.database, 120)
    store.migrate()
    started = time.perf_counter()
    for start in range(0, n, 100_000):
        part = items.iloc[start:start + 100_000]
        store.upsert_items(pd.DataFrame({
            "item_id": [content_hash(t) for t in part["text"]], "source": "corpus", "external_id": None,
            "url": None, "title": None, "text": part["text"], "gold_label": part["label"], "meta": "{}",
        }), "bench")
    stored = time.perf_counter() - started
    started = time.perf_counter()
    batch_id = query_batch(store, settings, None, None)
    answers = simulated_answers(store, store.batch_items(batch_id), settings.labels)
    store.record_labels(answers, annotator="simulated", origin="simulated", batch_id=batch_id,
                        close_batch="labeled")
    cold = time.perf_counter() - started
    result = retrain(store, settings)
    assert result.model_version == 1, result
    pool = store._pool_where(settings.holdout_fraction)
    with store.connect() as con:
        con.execute(f"COPY (SELECT {DOC_SQL} AS doc FROM items i WHERE {pool}) "
                    f"TO '{directory / 'pool.parquet'}' (FORMAT parquet)")
    return {"store_s": stored, "cold_start_s": cold}


# -- measurements, each in its own process ------------------------------------------------------
def _peak_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``getrusage``: on Linux its ru_maxrss carries the
    parent's peak across fork + exec, so every child would report at least the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(directory: Path):
    from alflow.config import load_config
    from alflow.tasks import modeling

    settings = load_config(directory / "alflow.toml")
    path = settings.models_dir / "model-0001.skops"
    return settings, modeling.load_model(path, modeling.trusted_types(settings.model, settings.labels))


def measure(kind: str, directory: Path) -> dict:
    """One measurement in this process: {"seconds", "peak_mb", ...}."""
    if kind in ("floor", "modal"):
        import pyarrow.parquet as pq

        settings, model = _model(directory)
        docs = pq.read_table(directory / "pool.parquet").column("doc").to_pylist()
        model.predict_proba(docs[:10])  # first-call imports and set-up, outside the clock
        started, cpu = time.perf_counter(), time.process_time()
        if kind == "floor":
            proba = model.predict_proba(docs)
            top2 = -np.partition(-proba, 1, axis=1)[:, :2]
            picks = np.argpartition(top2[:, 0] - top2[:, 1], BATCH)[:BATCH]
        else:
            from modAL.uncertainty import margin_sampling

            picks = margin_sampling(model, np.asarray(docs, dtype=object), n_instances=BATCH)[0]
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "cpu_s": time.process_time() - cpu, "peak_mb": _peak_mb(), "n": len(docs),
                "picked": int(len(picks))}

    from alflow.tasks.prelabel import prelabel_pool
    from alflow.tasks.query import query_task
    from alflow.tasks.store import Store

    settings, model = _model(directory)
    store = Store(settings.database, 120)
    if kind == "profile":
        return profile_prelabel(store, settings, model)
    model.predict_proba(["warm up"])  # first-call imports and set-up, outside the clock
    if kind == "alflow":
        started, cpu = time.perf_counter(), time.process_time()
        n = prelabel_pool(store, model, 1, settings.labels, settings.query.chunk_size, settings.holdout_fraction)
        prelabel_s = time.perf_counter() - started
        batch_id = query_task.fn(settings, 1, None)  # the query step, minus Prefect
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "cpu_s": time.process_time() - cpu, "prelabel_s": prelabel_s,
                "query_s": seconds - prelabel_s, "peak_mb": _peak_mb(), "n": n, "picked": len(store.batch_items(batch_id))}
    strategy = kind.removeprefix("query-")
    settings = settings.model_copy(update={"query": settings.query.model_copy(update={"strategy": strategy})})
    started, cpu = time.perf_counter(), time.process_time()
    batch_id = query_task.fn(settings, 1, None)  # the query step, minus Prefect
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "cpu_s": time.process_time() - cpu, "peak_mb": _peak_mb(),
            "picked": len(store.batch_items(batch_id))}


def profile_prelabel(store, settings, model) -> dict:
    """Where pre-label's time goes (cProfile, by own time), next to bare predict_proba on the
    same texts in the same process. Scores the pool again as a throw-away model version."""
    import cProfile
    import io
    import pstats

    import pyarrow.parquet as pq

    from alflow.tasks.prelabel import prelabel_pool

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    prelabel_pool(store, model, 999, settings.labels, settings.query.chunk_size, settings.holdout_fraction)
    profiler.disable()
    prelabel_s = time.perf_counter() - started
    with store.transaction() as con:
        con.execute("DELETE FROM predictions WHERE model_version = 999")
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    docs = pq.read_table(store.path.parent.parent / "pool.parquet").column("doc").to_pylist()
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    model.predict_proba(docs)
    profiler.disable()
    floor_s = time.perf_counter() - started
    floor = io.StringIO()
    pstats.Stats(profiler, stream=floor).sort_stats("tottime").print_stats(6)

    def body(text: str) -> str:
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if "ncalls" in line)
        return "\n".join(line[:150] for line in lines[start:] if line.strip())

    return {"seconds": prelabel_s, "floor_s": floor_s, "peak_mb": _peak_mb(),
            "prelabel": body(out.getvalue()), "floor": body(floor.getvalue())}


def run_command(directory: Path, args: list[str]) -> dict:
    """``alflow ARGS`` as a child of this process: wall seconds and the child's peak RSS."""
    alflow = Path(sys.executable).with_name("alflow")
    started = time.perf_counter()
    done = subprocess.run([str(alflow), *args, "--config", str(directory / "alflow.toml")],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"alflow {' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
            "output": done.stdout.strip().splitlines()[-3:]}


def floor_of_run(directory: Path) -> dict:
    """The model work of the two cycles `alflow run` did, bare, in one process: fit v1 on the
    cold start's labels and predict the holdout; predict_proba over the pool + argpartition;
    fit v2 on all labels and predict the holdout. Each fit is the configured one, so with
    self-training it includes reading its pool sample (drawn beforehand, untimed)."""
    from alflow.config import load_config
    from alflow.tasks import modeling
    from alflow.tasks.store import DOC_SQL, Store

    settings = load_config(directory / "alflow.toml")
    store = Store(settings.database, 120)
    labeled = store.query_df(f"""SELECT {DOC_SQL} AS doc, l.label, l.batch_id, l.label_id FROM labels l
                                 JOIN items i USING (item_id) ORDER BY l.label_id""")
    first = labeled[labeled["batch_id"] == labeled["batch_id"].iloc[0]]
    holdout = store.holdout_set(settings.holdout_fraction)
    scored = store.query_df(f"""SELECT {DOC_SQL} AS doc FROM items i JOIN predictions p USING (item_id)
                                WHERE p.model_version = 1""")["doc"].tolist()
    gold_docs = holdout["doc"].tolist()
    modeling.fit(settings.model, first["doc"].tolist(), first["label"].tolist()).predict_proba(["warm up"])
    rng = np.random.default_rng(0)
    sample = ([scored[i] for i in rng.choice(len(scored), min(len(scored), settings.model.self_training_sample),
                                             replace=False)] if settings.model.self_training else None)
    started, cpu = time.perf_counter(), time.process_time()
    v1, _ = modeling.fit_self_trained(settings.model, first["doc"].tolist(), first["label"].tolist(), sample)
    v1.predict(gold_docs)
    proba = v1.predict_proba(scored)
    top2 = -np.partition(-proba, 1, axis=1)[:, :2]
    np.argpartition(top2[:, 0] - top2[:, 1], BATCH)
    v2, _ = modeling.fit_self_trained(settings.model, labeled["doc"].tolist(), labeled["label"].tolist(), sample)
    v2.predict(gold_docs)
    return {"seconds": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
            "peak_mb": _peak_mb(), "pool": len(scored),
            "holdout": len(gold_docs)}


def _cycle_timings(directory: Path) -> list[str]:
    """Each cycle's step seconds as the run recorded them (table cycle_timings)."""
    from alflow.config import load_config
    from alflow.tasks.store import Store

    store = Store(load_config(directory / "alflow.toml").database, 120)
    try:
        frame = store.query_df("SELECT cycle, seconds FROM cycle_timings ORDER BY cycle")
    except Exception:  # noqa: BLE001 - an older schema without the breakdown
        return []
    lines = []
    for cycle, seconds in zip(frame["cycle"], frame["seconds"]):
        parts = json.loads(seconds) if isinstance(seconds, str) else seconds
        lines.append(f"cycle {cycle}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    return lines


def child(kind: str, directory: Path) -> dict:
    """Run one measurement in a fresh process; its JSON result."""
    command = [sys.executable, __file__, "--child", kind, "--dir", str(directory)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement {kind} at {directory} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = ["| pool | alflow pre-label + query | floor (predict_proba + argpartition) | alflow ÷ floor "
             "(CPU) | modAL margin_sampling | modAL ÷ floor (CPU) | alflow peak RSS | floor RSS | modAL RSS "
             "| margin query | badge query | badge ÷ margin | badge RSS |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a, f, m, qm, qb = r["alflow"], r["floor"], r["modal"], r["query-margin"], r["query-badge"]
        lines.append(
            f"| {r['pool']:,} | {a['seconds']:.1f} s ({a['prelabel_s']:.1f} + {a['query_s']:.2f}) "
            f"| {f['seconds']:.1f} s | **{a['seconds'] / f['seconds']:.2f}×** ({a['cpu_s'] / f['cpu_s']:.2f}×) "
            f"| {m['seconds']:.1f} s | {m['seconds'] / f['seconds']:.2f}× ({m['cpu_s'] / f['cpu_s']:.2f}×) "
            f"| {a['peak_mb']:.0f} MB | {f['peak_mb']:.0f} MB "
            f"| {m['peak_mb']:.0f} MB | {qm['seconds']:.2f} s | {qb['seconds']:.2f} s "
            f"| **{qb['seconds'] / qm['seconds']:.2f}×** | {qb['peak_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--run-size", type=int, default=0, help="also time `alflow run` at this size (0: no)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/alflow-scoring"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scoring.md")
    parser.add_argument("--profile", type=int, default=0, help="cProfile pre-label at this size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "floor-run":
        print(json.dumps(floor_of_run(args.dir)))
        return
    if args.child and args.child.startswith("alflow-run"):
        print(json.dumps(run_command(args.dir, ["run", "--auto", "--cycles", "2", "--no-ingest", "--no-progress"])))
        return
    if args.child:
        print(json.dumps(measure(args.child, args.dir)))
        return

    header = (f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} nice -n {os.nice(0)} "
              f"python benchmarks/scoring.py {' '.join(sys.argv[1:])}` on {os.cpu_count()} cores, "
              f"load average at start {os.getloadavg()[0]:.1f}")
    print(header, flush=True)
    rows = []
    profiles = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        directory = args.work / f"pool-{n}"
        setup = setup_store(directory, n)
        row = {"items": n, **setup}
        for kind in ("floor", "modal", "alflow", "query-margin", "query-badge"):
            row[kind] = child(kind, directory)
            print(f"{n:>9,} {kind:13} {json.dumps(row[kind])}", flush=True)
        if n == args.profile:
            profiles.append((n, child("profile", directory)))
        row["pool"] = row["alflow"]["n"]
        rows.append(row)

    run = None
    if args.run_size:
        directory = args.work / f"run-{args.run_size}"
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        csv = directory / "items.csv"
        build_items(args.run_size).to_csv(csv, index=False)
        write_config(directory, csv)
        # A Prefect server of its own, started before the clock runs (a first start migrates
        # its database, a minute on a busy machine): the run is timed, not the server.
        os.environ.setdefault("PREFECT_HOME", str(args.work / "prefect-home"))
        os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4391/api")
        run_command(directory, ["server", "start"])
        ingest = run_command(directory, ["ingest", "--no-progress"])
        print(f"ingest {args.run_size:,}: {ingest['seconds']:.1f} s", flush=True)
        measured = child("alflow-run", directory)
        floor = child("floor-run", directory)
        timings = _cycle_timings(directory)
        run = {"size": args.run_size, "ingest_s": ingest["seconds"], "run": measured, "floor": floor,
               "timings": timings}
        print(f"alflow run: {json.dumps(measured)}\nfloor: {json.dumps(floor)}", flush=True)
        subprocess.run([str(Path(sys.executable).with_name("alflow")), "server", "stop",
                        "--config", str(directory / "alflow.toml")], capture_output=True)

    report = ["# Scoring at scale (`benchmarks/scoring.py`)\n", header + "\n",
              f"Batch {BATCH}; the shipped model (TF-IDF 1-2 grams + LogisticRegression) trained on "
              "the 20 cold-start labels; pool = items minus the 20% gold holdout. Each cell is one "
              "process (its own peak RSS). alflow: `prelabel_pool` + `query_batch` (margin, 10% "
              "exploration, near-duplicate filter); floor: `predict_proba` + margin + `argpartition` "
              "on the same texts already in memory; modAL: `margin_sampling` (predict_proba over "
              "the pool + its own selection) with the same model; margin/badge query: "
              "`query_batch` alone on the scored pool.\n", table(rows)]
    if run:
        r, f = run["run"], run["floor"]
        report += ["\n## `alflow run --auto --cycles 2 --no-ingest` at "
                   f"{run['size']:,} items\n",
                   f"After `alflow ingest` ({run['ingest_s']:.1f} s). Cold start, then a full pre-label "
                   f"of {f['pool']:,} pool items and a query; the floor is the same two cycles' model "
                   f"work bare in one process (fit v1 on 20 labels, predict the {f['holdout']:,}-item "
                   "holdout, predict_proba over the pool + argpartition, fit v2 on 40 labels, predict "
                   "the holdout; each fit self-trained as configured, its pool sample read from "
                   "memory).\n",
                   "| | wall | CPU | peak RSS |", "|---|---:|---:|---:|",
                   f"| `alflow run` | {r['seconds']:.1f} s | {r['cpu_s']:.1f} s | {r['peak_mb']:.0f} MB |",
                   f"| floor | {f['seconds']:.1f} s | {f['cpu_s']:.1f} s | {f['peak_mb']:.0f} MB |",
                   f"| ratio | **{r['seconds'] / f['seconds']:.2f}×** | {r['cpu_s'] / f['cpu_s']:.2f}× | |",
                   "\nThe run's own breakdown per cycle (seconds, `cycle_timings`):\n",
                   "```", *run["timings"], "```"]
    for n, prof in profiles:
        report += [f"\n## Where pre-label's time goes at {n:,} items (cProfile, by own time)\n",
                   f"Profiled: pre-label {prof['seconds']:.1f} s vs bare predict_proba {prof['floor_s']:.1f} s on "
                   "the same texts in the same process (profiling slows both).\n",
                   "```", prof["prelabel"], "```", "\nbare predict_proba:\n", "```", prof["floor"], "```"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n", encoding="utf-8")
    (args.out.with_suffix(".json")).write_text(json.dumps({"rows": rows, "run": run}, indent=1, default=str))
    print("\n".join(report[3:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
