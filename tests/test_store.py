"""The DuckDB store: schema, transactions, append-only labels, the pool, the file lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from itertools import islice
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from alflow.config import FilesSource
from alflow.connectors import Record, build_connector, content_hash, to_row
from alflow.tasks.store import (
    SCHEMA_VERSION,
    SKIP,
    Answer,
    Store,
    StoreError,
    StoreLockedError,
    holdout_sql,
)

TABLES = {"items", "ingests", "predictions", "batches", "batch_items", "labels", "models",
          "cycles", "schema_version"}


def item_rows(texts, source: str = "test", gold=None) -> pd.DataFrame:
    gold = gold if gold is not None else [None] * len(texts)
    return pd.DataFrame([to_row(Record(text=t, gold_label=g), source) for t, g in zip(texts, gold)])


def ids(*texts: str) -> list[str]:
    return [content_hash(t) for t in texts]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "state" / "alflow.duckdb", lock_timeout=5)
    s.migrate()
    return s


@pytest.fixture
def abc(store: Store) -> list[str]:
    """Five stored items without gold labels; their ids in text order."""
    texts = ["alpha item", "bravo item", "charlie item", "delta item", "echo item"]
    store.upsert_items(item_rows(texts), "ingest-1")
    return ids(*texts)


@pytest.fixture
def sms_store(store: Store, small_csv: Path) -> Store:
    """The first 300 SMS rows (with gold labels), ingested."""
    connector = build_connector(FilesSource(type="files", name="sms", path=small_csv, label_column="label"))
    store.upsert_items(pd.DataFrame([to_row(r, "sms") for r in connector.fetch()]), "ingest-sms")
    return store


def n_labels(store: Store) -> int:
    return int(store.scalar("SELECT count(*) FROM labels"))


def effective(store: Store) -> dict[str, str]:
    frame = store.query_df("SELECT item_id, label FROM effective_labels")
    return dict(zip(frame["item_id"], frame["label"]))


# -- schema ------------------------------------------------------------------------------
def test_migrate_creates_schema(tmp_path: Path):
    store = Store(tmp_path / "new" / "db.duckdb")
    assert store.migrate() == SCHEMA_VERSION
    assert (tmp_path / "new" / "db.duckdb").exists()
    tables = set(store.query_df("SELECT table_name FROM information_schema.tables")["table_name"])
    assert TABLES | {"effective_labels"} <= tables
    versions = store.query_df("SELECT version FROM schema_version ORDER BY version")["version"].tolist()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    with store.connect() as con:
        assert store.schema_version(con) == SCHEMA_VERSION


def test_migrate_is_idempotent_and_keeps_data(store: Store, abc):
    store.record_labels([Answer(abc[0], "spam")], annotator="a", origin="cli")
    assert store.migrate() == SCHEMA_VERSION
    assert Store(store.path).migrate() == SCHEMA_VERSION
    assert store.scalar("SELECT count(*) FROM schema_version") == SCHEMA_VERSION
    assert store.scalar("SELECT max(version) FROM schema_version") == SCHEMA_VERSION
    assert store.scalar("SELECT count(*) FROM items") == 5
    assert n_labels(store) == 1


def test_migrate_refuses_a_newer_schema(store: Store):
    with store.transaction() as con:
        con.execute("INSERT INTO schema_version VALUES (?, now())", [SCHEMA_VERSION + 1])
    with pytest.raises(StoreError, match=f"v{SCHEMA_VERSION + 1}.*newer"):
        store.migrate()


# Each thread of each process migrates the same fresh file at once, for several fresh
# files in turn. A migrator that reads the version in a connection of its own (outside a
# transaction) then waits there for all the others (a file barrier): a migrate that read
# the version first and applied the steps in later transactions would have every migrator
# read version 0 and apply every step. The rounds repeat the race of opening a file that
# another process is creating at that moment.
MIGRATOR = textwrap.dedent(
    """
    import json, os, sys, threading, time
    from contextlib import contextmanager
    from alflow.tasks.store import Store

    folder, parties, n_threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def meet(phase):
        open(os.path.join(folder, f"{phase}-{os.getpid()}-{threading.get_ident()}"), "w").close()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if sum(name.startswith(f"{phase}-") for name in os.listdir(folder)) >= parties:
                return
            time.sleep(0.002)

    original_connect, original_transaction = Store.connect, Store.transaction
    local = threading.local()

    @contextmanager
    def transaction(self):
        local.writing = True
        try:
            with original_transaction(self) as con:
                yield con
        finally:
            local.writing = False

    @contextmanager
    def connect(self):
        with original_connect(self) as con:
            yield con
        if not getattr(local, "writing", False) and not local.met:
            local.met = True
            meet(f"read{local.round}")

    Store.connect, Store.transaction = connect, transaction
    results = {}

    def migrate():
        for round in range(rounds):
            local.round, local.met = round, False
            meet(f"start{round}")
            try:
                result = Store(os.path.join(folder, f"db{round}", "alflow.duckdb"), lock_timeout=30).migrate()
            except Exception as exc:
                result = f"{type(exc).__name__}: {exc}".splitlines()[0]
            results.setdefault(round, []).append(result)

    threads = [threading.Thread(target=migrate) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results), flush=True)
    """
)


def test_concurrent_migrations_of_a_fresh_file_apply_each_step_once(tmp_path: Path):
    import json

    n_processes, n_threads, rounds = 4, 3, 2
    children = [
        subprocess.Popen([sys.executable, "-c", MIGRATOR, str(tmp_path), str(n_processes * n_threads),
                          str(n_threads), str(rounds)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n_processes)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results += [r for per_round in json.loads(out.strip().splitlines()[-1]).values() for r in per_round]
    assert results == [SCHEMA_VERSION] * (n_processes * n_threads * rounds)
    for round in range(rounds):
        store = Store(tmp_path / f"db{round}" / "alflow.duckdb")
        versions = store.query_df("SELECT version FROM schema_version ORDER BY version")["version"].tolist()
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        tables = set(store.query_df("SELECT table_name FROM information_schema.tables")["table_name"])
        assert TABLES <= tables


# DuckDB creates a new file in place: for a moment the file exists without its header, and
# a process opening it then is told "not a valid DuckDB database file" (not "locked", so
# it is not retried). This creator stretches that moment to a second.
SLOW_CREATOR = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import duckdb
    from alflow.tasks.store import Store

    real_connect = duckdb.connect

    def connect(database, *args, **kwargs):
        path = Path(database)
        if not path.exists():
            path.touch()  # the file is there, its header not yet
            print("creating", flush=True)
            time.sleep(1.0)
            path.unlink()
        return real_connect(database, *args, **kwargs)

    duckdb.connect = connect
    print(Store(sys.argv[1], lock_timeout=30).migrate(), flush=True)
    """
)


def test_opening_a_file_another_process_is_creating(tmp_path: Path):
    path = tmp_path / "new" / "alflow.duckdb"
    path.parent.mkdir()
    creator = subprocess.Popen([sys.executable, "-c", SLOW_CREATOR, str(path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert creator.stdout.readline().strip() == "creating", creator.stderr.read()
        assert Store(path, lock_timeout=30).migrate() == SCHEMA_VERSION
    finally:
        out, err = creator.communicate(timeout=60)
    assert creator.returncode == 0 and out.strip() == str(SCHEMA_VERSION), err
    assert Store(path).scalar("SELECT count(*) FROM schema_version") == SCHEMA_VERSION
    assert sorted(p.name for p in path.parent.iterdir()) == ["alflow.duckdb"]  # nothing left aside


# -- transactions ------------------------------------------------------------------------
def test_transaction_rolls_back_every_write_of_the_block(store: Store, abc):
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction() as con:
            for item in abc[:2]:
                con.execute(
                    "INSERT INTO labels (item_id, label, annotator, origin, created_at) "
                    "VALUES (?, 'spam', 'a', 'cli', now())", [item])
            con.execute("DELETE FROM items WHERE item_id = ?", [abc[4]])
            assert con.execute("SELECT count(*) FROM labels").fetchone()[0] == 2
            raise RuntimeError("boom")
    assert n_labels(store) == 0
    assert store.scalar("SELECT count(*) FROM items") == 5


def test_transaction_commits_on_success(store: Store, abc):
    with store.transaction() as con:
        con.execute("INSERT INTO labels (item_id, label, annotator, origin, created_at) "
                    "VALUES (?, 'ham', 'a', 'cli', now())", [abc[0]])
    assert n_labels(store) == 1


def test_failed_sql_statement_rolls_back_the_block(store: Store, abc):
    with pytest.raises(duckdb.Error):
        with store.transaction() as con:
            con.execute("INSERT INTO labels (item_id, label, annotator, origin, created_at) "
                        "VALUES (?, 'ham', 'a', 'cli', now())", [abc[0]])
            # violates the origin CHECK constraint
            con.execute("INSERT INTO labels (item_id, label, annotator, origin, created_at) "
                        "VALUES (?, 'ham', 'a', 'telepathy', now())", [abc[1]])
    assert n_labels(store) == 0


# -- items -------------------------------------------------------------------------------
def test_upsert_items_counts_new_and_duplicates(store: Store):
    first = item_rows(["one", "two", "one", "  one  "], source="s1")  # 'one' three times (spacing)
    assert store.upsert_items(first, "run-1") == (2, 2)
    assert store.scalar("SELECT count(*) FROM items") == 2
    again = item_rows(["two", "three", "three", "four", "one"], source="s2")
    assert store.upsert_items(again, "run-2") == (2, 3)
    assert store.scalar("SELECT count(*) FROM items") == 4
    # A duplicate does not overwrite the stored row.
    row = store.query_df("SELECT source, ingest_run FROM items WHERE item_id = ?", ids("two")).iloc[0]
    assert (row["source"], row["ingest_run"]) == ("s1", "run-1")
    assert store.upsert_items(item_rows([]).reindex(columns=first.columns), "run-3") == (0, 0)


def test_items_in_the_given_order(store: Store, abc):
    frame = store.items([abc[3], "not-there", abc[0]])
    assert frame["item_id"].tolist() == [abc[3], abc[0]]
    assert frame["text"].tolist() == ["delta item", "alpha item"]


def test_sms_ingest_counts_every_duplicate(tmp_path: Path):
    connector = build_connector(FilesSource(type="files", name="sms", path=Path(__file__).resolve().parents[1]
                                            / "data" / "sms_spam.csv", label_column="label"))
    rows = pd.DataFrame([to_row(r, "sms") for r in connector.fetch()])
    store = Store(tmp_path / "sms.duckdb")
    store.migrate()
    assert store.upsert_items(rows, "run") == (5160, 414)
    assert store.upsert_items(rows.iloc[:1000], "run-again") == (0, 1000)
    assert store.scalar("SELECT count(*) FROM items") == 5160


# -- labels ------------------------------------------------------------------------------
def test_record_labels_is_all_or_nothing(store: Store, abc):
    with pytest.raises(StoreError, match="not-an-item"):
        store.record_labels([Answer(abc[0], "spam"), Answer("not-an-item", "ham"), Answer(abc[1], "ham")],
                            annotator="a", origin="cli")
    assert n_labels(store) == 0


def test_record_labels_rejects_bad_calls(store: Store, abc):
    with pytest.raises(StoreError, match="origin"):
        store.record_labels([Answer(abc[0], "spam")], annotator="a", origin="email")
    with pytest.raises(StoreError, match="twice"):
        store.record_labels([Answer(abc[0], "spam"), Answer(abc[0], "ham")], annotator="a", origin="cli")
    assert n_labels(store) == 0
    assert store.record_labels([], annotator="a", origin="cli").new == 0


def test_labels_are_append_only(store: Store, abc):
    first = store.record_labels([Answer(abc[0], "spam"), Answer(abc[1], "ham")], annotator="ann", origin="cli")
    assert (first.new, first.corrections, first.duplicates) == (2, 0, 0)

    same = store.record_labels([Answer(abc[0], "spam"), Answer(abc[1], "ham")], annotator="ann", origin="cli")
    assert (same.new, same.corrections, same.duplicates) == (0, 0, 2)
    assert n_labels(store) == 2

    fix = store.record_labels([Answer(abc[0], "ham"), Answer(abc[2], "spam")], annotator="ann", origin="cli")
    assert (fix.new, fix.corrections, fix.duplicates) == (1, 1, 0)
    history = store.labels()
    assert history.loc[history["item_id"] == abc[0], "label"].tolist() == ["spam", "ham"]
    assert history["label_id"].is_monotonic_increasing
    assert effective(store)[abc[0]] == "ham"

    # Going back to the first answer is a correction again (the latest answer was 'ham').
    back = store.record_labels([Answer(abc[0], "spam")], annotator="ann", origin="cli")
    assert back.corrections == 1
    assert store.labels().query("item_id == @abc[0]")["label"].tolist() == ["spam", "ham", "spam"]
    assert effective(store)[abc[0]] == "spam"


def test_another_annotator_is_not_a_duplicate(store: Store, abc):
    store.record_labels([Answer(abc[0], "spam")], annotator="a", origin="cli")
    other = store.record_labels([Answer(abc[0], "spam")], annotator="b", origin="cli")
    assert other.new == 1 and other.duplicates == 0
    assert n_labels(store) == 2


def test_effective_labels_latest_per_annotator_then_majority(store: Store, abc):
    a, b, c, d, e = abc
    store.record_labels([Answer(a, "spam"), Answer(b, "spam"), Answer(c, "spam"), Answer(d, SKIP), Answer(e, "ham")],
                        annotator="x", origin="cli")
    store.record_labels([Answer(a, "ham")], annotator="x", origin="cli")            # x corrects a
    store.record_labels([Answer(b, "ham"), Answer(c, "spam")], annotator="y", origin="cli")
    store.record_labels([Answer(c, "ham")], annotator="z", origin="cli")
    store.record_labels([Answer(e, SKIP)], annotator="x", origin="cli")              # skip after an answer

    frame = store.query_df("SELECT item_id, label, votes FROM effective_labels").set_index("item_id")
    assert frame.loc[a, "label"] == "ham" and frame.loc[a, "votes"] == 1   # latest answer of x only
    assert b not in frame.index                                            # 1 spam vs 1 ham: a tie
    assert frame.loc[c, "label"] == "spam" and frame.loc[c, "votes"] == 2  # 2 to 1
    assert d not in frame.index                                            # only skipped
    assert e not in frame.index        # x's answer is now skip: one rule, an annotator's answer is their latest
    assert store.counts()["skipped"] == 2                                  # d and e

    store.record_labels([Answer(b, "spam")], annotator="z", origin="cli")   # z breaks the tie
    assert effective(store)[b] == "spam"


def test_skip_leaves_the_pool_without_a_label(store: Store, abc):
    assert store.pool_size() == 5
    store.record_labels([Answer(abc[0], SKIP)], annotator="a", origin="cli")
    assert store.pool_size() == 4
    assert abc[0] not in effective(store)
    counts = store.counts()
    assert (counts["labeled"], counts["skipped"], counts["pool"], counts["label_rows"]) == (0, 1, 4, 1)
    frame, watermark = store.training_set()
    assert frame.empty and watermark == 1


def test_training_set_uses_effective_labels(store: Store, abc):
    store.record_labels([Answer(abc[0], "spam"), Answer(abc[1], "ham")], annotator="a", origin="cli")
    store.record_labels([Answer(abc[0], "ham")], annotator="a", origin="cli")
    frame, watermark = store.training_set()
    assert dict(zip(frame["item_id"], frame["label"])) == {abc[0]: "ham", abc[1]: "ham"}
    assert watermark == int(store.scalar("SELECT max(label_id) FROM labels")) == 3


# -- batches -----------------------------------------------------------------------------
def picks_frame(item_ids, ranks=None) -> pd.DataFrame:
    ranks = ranks or list(range(1, len(item_ids) + 1))
    return pd.DataFrame({
        "item_id": item_ids,
        "rank": ranks,
        "score": [0.9 - 0.1 * r for r in ranks],
        "prelabel": ["spam"] * len(item_ids),
        "confidence": [0.6] * len(item_ids),
        "picked_by": ["uncertainty"] * len(item_ids),
    })


def test_create_batch_and_read_it_back(store: Store, abc):
    batch_id = store.create_batch("run-1", "margin", 3, picks_frame([abc[2], abc[0], abc[4]], ranks=[2, 3, 1]))
    batch = store.batch(batch_id)
    assert (batch["status"], batch["size"], batch["strategy"], batch["model_version"]) == ("open", 3, "margin", 3)
    assert store.batch_for_run("run-1")["batch_id"] == batch_id
    assert store.batch("nope") is None
    items = store.batch_items(batch_id)
    assert items["item_id"].tolist() == [abc[4], abc[2], abc[0]]  # rank order
    assert items["rank"].tolist() == [1, 2, 3]
    assert items["text"].tolist() == ["echo item", "charlie item", "alpha item"]
    assert items["answer"].isna().all()

    store.record_labels([Answer(abc[2], "ham")], annotator="rev", origin="ui", batch_id=batch_id)
    items = store.batch_items(batch_id).set_index("item_id")
    assert items.loc[abc[2], "answer"] == "ham" and items.loc[abc[2], "answered_by"] == "rev"
    assert pd.isna(items.loc[abc[0], "answer"])


def test_pool_excludes_open_batches_until_closed(store: Store, abc):
    batch_id = store.create_batch(None, "coverage", None, picks_frame(abc[:2]))
    assert store.pool_size() == 3
    assert store.counts()["open_batches"] == 1
    store.record_labels([Answer(abc[0], "spam")], annotator="a", origin="ui", batch_id=batch_id)
    store.close_batch(batch_id, "labeled")
    closed = store.batch(batch_id)
    assert closed["status"] == "labeled" and not pd.isna(closed["closed_at"])
    # The unanswered item of the closed batch is back in the pool; the answered one is not.
    assert store.pool_size() == 4
    pool = set(store.query_df(f"SELECT item_id FROM items i WHERE {store._pool_where(None)}")["item_id"])
    assert abc[1] in pool and abc[0] not in pool
    assert store.batches("open").empty and store.batches("labeled")["batch_id"].tolist() == [batch_id]


def test_close_batch_only_closes_open_batches(store: Store, abc):
    batch_id = store.create_batch(None, "margin", 1, picks_frame(abc[:1]))
    with pytest.raises(StoreError):
        store.close_batch(batch_id, "open")
    with pytest.raises(StoreError):
        store.close_batch(batch_id, "finished")
    store.close_batch(batch_id, "expired")
    store.close_batch(batch_id, "labeled")  # already closed: no change
    assert store.batch(batch_id)["status"] == "expired"


def test_duplicates_are_per_batch(store: Store, abc):
    b1 = store.create_batch(None, "margin", 1, picks_frame(abc[:1]))
    store.record_labels([Answer(abc[0], "spam")], annotator="a", origin="ui", batch_id=b1)
    again = store.record_labels([Answer(abc[0], "spam")], annotator="a", origin="import", batch_id=b1)
    assert again.duplicates == 1 and n_labels(store) == 1


def test_keep_batch_answers(store: Store, abc):
    batch_id = store.create_batch(None, "margin", 1, picks_frame(abc[:3]))
    # Answered during the pause (e.g. `alflow label`): a by another reviewer, b by 'form'.
    store.record_labels([Answer(abc[0], "spam")], annotator="cli-user", origin="cli", batch_id=batch_id)
    store.record_labels([Answer(abc[1], "ham")], annotator="form", origin="cli", batch_id=batch_id)
    # The Resume form comes back with its pre-filled values for all three.
    result = store.record_labels(
        [Answer(abc[0], "ham"), Answer(abc[1], "ham"), Answer(abc[2], "spam")],
        annotator="form", origin="ui", batch_id=batch_id,
        form_defaults={abc[0]: "ham", abc[1]: "ham", abc[2]: "spam"})  # all three untouched
    assert (result.new, result.kept, result.duplicates, result.corrections) == (1, 1, 1, 0)
    assert result.kept_items == [abc[0]]
    history = store.labels()
    assert history.query("item_id == @abc[0]")["label"].tolist() == ["spam"]  # the form's 'ham' not written
    assert history.query("item_id == @abc[1]")["label"].tolist() == ["ham"]
    assert n_labels(store) == 3
    assert store.batch_items(batch_id).set_index("item_id").loc[abc[0], "answer"] == "spam"

    # Without form_defaults the same form value is recorded (a second annotator's vote).
    plain = store.record_labels([Answer(abc[0], "ham")], annotator="form", origin="ui", batch_id=batch_id)
    assert plain.new == 1 and n_labels(store) == 4


# -- pool paging and holdout -------------------------------------------------------------
def test_unscored_chunks_pages_through_the_pool(sms_store: Store):
    pool = set(sms_store.query_df(f"SELECT item_id FROM items i WHERE {sms_store._pool_where(None)}")["item_id"])
    assert len(pool) == sms_store.pool_size() > 250
    # islice: a pager that never advances must fail here, not hang
    chunks = list(islice(sms_store.unscored_chunks(1, 37), len(pool) // 37 + 3))
    seen = [item for chunk in chunks for item in chunk.column("item_id").to_pylist()]
    assert len(seen) == len(set(seen)) == len(pool)
    assert set(seen) == pool
    assert all(0 < chunk.num_rows <= 37 for chunk in chunks) and len(chunks) >= -(-len(pool) // 37)
    assert all(isinstance(doc, str) and doc for chunk in chunks for doc in chunk.column("doc").to_pylist())
    assert sms_store.count_unscored(1) == len(pool)


def test_unscored_chunks_skips_scored_items(sms_store: Store):
    first = next(sms_store.unscored_chunks(1, 50)).to_pandas()
    assert len(first) == 50
    sms_store.write_predictions(pd.DataFrame({
        "item_id": first["item_id"], "label": "ham", "proba": [[0.7, 0.3]] * len(first),
        "least_confidence": 0.3, "margin": 0.4, "entropy": 0.6,
    }), model_version=1)
    rest = [i for chunk in islice(sms_store.unscored_chunks(1, 64), 10) for i in chunk.column("item_id").to_pylist()]
    assert set(rest).isdisjoint(first["item_id"])
    assert len(rest) == sms_store.pool_size() - 50 == sms_store.count_unscored(1)
    # Another model version has scored nothing yet.
    assert sms_store.count_unscored(2) == sms_store.pool_size()
    ids_, proba, labels = sms_store.pool_predictions(1, 2)
    assert sorted(ids_) == sorted(first["item_id"]) and proba.shape == (50, 2)
    assert (labels == "ham").all()


def test_holdout_is_excluded_from_the_pool_and_stable(sms_store: Store, abc):
    total = sms_store.scalar("SELECT count(*) FROM items")
    holdout = sms_store.holdout_set(0.2)
    held = set(holdout["item_id"])
    # A stable function of the content hash, only for items with a gold label.
    gold = sms_store.query_df("SELECT item_id, gold_label FROM items")
    expected = {i for i, g in zip(gold["item_id"], gold["gold_label"])
                if g is not None and not pd.isna(g) and int(i[:8], 16) / 2**32 < 0.2}
    assert held == expected
    assert 0.1 * 295 < len(held) < 0.3 * 295
    assert set(abc).isdisjoint(held)  # no gold label, never held out
    assert set(holdout["label"]) <= {"ham", "spam"}

    assert sms_store.pool_size(0.2) == total - len(held)
    pool = [i for chunk in islice(sms_store.unscored_chunks(1, 100, holdout_fraction=0.2), 10)
            for i in chunk.column("item_id").to_pylist()]
    assert len(set(pool)) == len(pool)
    pool = set(pool)
    assert pool.isdisjoint(held) and len(pool) == total - len(held)
    sample = sms_store.sample_pool(1000, seed=0, holdout_fraction=0.2)
    assert set(sample["item_id"]).isdisjoint(held)

    # Held-out items never enter the training set, even when someone labels one.
    one = sorted(held)[0]
    sms_store.record_labels([Answer(one, "ham")], annotator="a", origin="cli")
    frame, _ = sms_store.training_set(0.2)
    assert one not in set(frame["item_id"])
    assert one in set(sms_store.training_set(None)[0]["item_id"])

    # Stable: a new Store on the same file and more items do not move it.
    sms_store.upsert_items(item_rows([f"extra {n}" for n in range(50)], gold=["ham"] * 50), "more")
    again = set(Store(sms_store.path).holdout_set(0.2)["item_id"])
    assert held <= again
    assert again - held == {content_hash(f"extra {n}") for n in range(50)
                            if int(content_hash(f"extra {n}")[:8], 16) / 2**32 < 0.2}
    assert sms_store.counts(0.2)["holdout"] == len(again)


def test_holdout_sql_without_fraction_holds_nothing(sms_store: Store):
    assert holdout_sql(None) == holdout_sql(0) == "FALSE"
    assert sms_store.pool_size(None) == sms_store.scalar("SELECT count(*) FROM items")
    assert sms_store.holdout_set(0).empty
    assert sms_store.scalar(f"SELECT count(*) FROM items i WHERE {holdout_sql(1.0)}") == \
        sms_store.scalar("SELECT count(*) FROM items WHERE gold_label IS NOT NULL")


# -- the file lock, held by another process ----------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys, time
    import duckdb
    con = duckdb.connect(sys.argv[1])
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
    """
)


def hold_lock(path: Path, seconds: float) -> subprocess.Popen:
    """Another process holding the database file; returns once it has the lock."""
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if line.strip() != "locked":
        child.kill()
        raise AssertionError(f"lock holder did not start: {line!r} {child.stderr.read()}")
    return child


def test_write_waits_for_another_process_then_succeeds(store: Store, abc):
    child = hold_lock(store.path, 2.0)
    try:
        waiting = Store(store.path, lock_timeout=10)
        start = time.monotonic()
        result = waiting.record_labels([Answer(abc[0], "spam")], annotator="a", origin="cli")
        waited = time.monotonic() - start
        new, _ = waiting.upsert_items(item_rows(["written after the wait"]), "late")
    finally:
        child.wait(timeout=30)
    assert waited >= 1.0
    assert result.new == 1 and new == 1
    assert store.labels()["item_id"].tolist() == [abc[0]]
    assert store.scalar("SELECT count(*) FROM items WHERE text = 'written after the wait'") == 1
    assert child.returncode == 0


def test_lock_held_too_long_names_the_holder(store: Store, abc):
    child = hold_lock(store.path, 30.0)
    try:
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as info:
            Store(store.path, lock_timeout=1).record_labels([Answer(abc[0], "spam")], annotator="a", origin="cli")
        waited = time.monotonic() - start
    finally:
        child.kill()
        child.wait(timeout=30)
    message = str(info.value)
    assert f"PID {child.pid}" in message
    assert str(store.path) in message and "\n" not in message
    assert 1.0 <= waited < 5  # it kept trying for the whole lock_timeout
    assert isinstance(info.value, StoreError)
    assert n_labels(store) == 0  # nothing was written



def test_answers_and_batch_close_are_one_transaction(store: Store, abc):
    """A batch is closed with its answers or not at all."""
    batch_id = store.create_batch("run-9", "margin", 1, picks_frame(abc[:2]))
    with pytest.raises(StoreError, match="not in the store"):
        store.record_labels([Answer(abc[0], "ham"), Answer("f" * 64, "ham")], annotator="a", origin="ui",
                            batch_id=batch_id, close_batch="labeled")
    assert store.batch(batch_id)["status"] == "open" and n_labels(store) == 0
    written = store.record_labels([Answer(abc[0], "ham"), Answer(abc[1], SKIP)], annotator="a", origin="ui",
                                  batch_id=batch_id, close_batch="labeled")
    assert written.new == 2 and store.batch(batch_id)["status"] == "labeled"
    assert store.batch(batch_id)["owner"].endswith(f":{os.getpid()}")
    with pytest.raises(StoreError, match="close_batch, review_round and late need a batch_id"):
        store.record_labels([Answer(abc[2], "ham")], annotator="a", origin="cli", close_batch="labeled")
    before = n_labels(store)
    other = store.create_batch("run-10", "margin", 1, picks_frame(abc[2:3]))
    with pytest.raises(StoreError, match="batch status must be one of"):
        store.record_labels([Answer(abc[2], "ham")], annotator="a", origin="ui", batch_id=other, close_batch="done")
    assert n_labels(store) == before and store.batch(other)["status"] == "open"


# -- rollback of the store's own writes --------------------------------------------------
class _FailingConnection:
    """A connection whose ``unregister`` (the last step of a write) raises."""

    def __init__(self, con):
        self._con = con

    def __getattr__(self, name):
        return getattr(self._con, name)

    def unregister(self, name):
        raise RuntimeError("injected failure after the inserts")


def fail_after_the_inserts(monkeypatch) -> None:
    from contextlib import contextmanager

    original = Store.transaction

    @contextmanager
    def transaction(self):
        with original(self) as con:
            yield _FailingConnection(con)

    monkeypatch.setattr(Store, "transaction", transaction)


def table_counts(store: Store) -> dict[str, int]:
    return {t: int(store.scalar(f"SELECT count(*) FROM {t}"))
            for t in ("items", "batches", "batch_items", "labels")}


def test_upsert_items_rolls_back_the_whole_chunk(store: Store, abc, monkeypatch):
    before = table_counts(store)
    rows = item_rows(["new one", "new two", "new three", "new four"])
    rows.loc[2:, "text"] = None  # the second half violates text NOT NULL
    with pytest.raises(duckdb.ConstraintException):
        store.upsert_items(rows, "run-bad")
    assert table_counts(store) == before

    fail_after_the_inserts(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        store.upsert_items(item_rows(["new one", "new two"]), "run-bad")
    assert table_counts(store) == before
    assert store.scalar("SELECT count(*) FROM items WHERE ingest_run = 'run-bad'") == 0


def test_create_batch_rolls_back_the_batch_with_its_items(store: Store, abc, monkeypatch):
    before = table_counts(store)
    picks = picks_frame(abc[:4])
    picks.loc[2:, "picked_by"] = None  # batch_items.picked_by NOT NULL: fails after the batch row
    with pytest.raises(duckdb.ConstraintException):
        store.create_batch("run-1", "margin", 1, picks)
    assert table_counts(store) == before and store.batch_for_run("run-1") is None

    fail_after_the_inserts(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        store.create_batch("run-1", "margin", 1, picks_frame(abc[:4]))
    assert table_counts(store) == before and store.batch_for_run("run-1") is None
    assert store.pool_size() == 5


# -- create_batch checks the pool itself -------------------------------------------------
def test_create_batch_refuses_items_that_left_the_pool(store: Store, abc):
    """An item answered, in an open batch, or not stored is refused, naming it; nothing of
    the batch is written."""
    first = store.create_batch("run-1", "margin", 1, picks_frame(abc[:2]))
    store.record_labels([Answer(abc[2], "ham")], annotator="a", origin="cli")
    before = table_counts(store)
    for taken, why in [(abc[1], f"is in open batch {first}"), (abc[2], "is already answered"),
                       ("f" * 64, "is not in the store")]:
        with pytest.raises(StoreError, match=f"item {taken} {why}"):
            store.create_batch("run-2", "margin", 1, picks_frame([abc[3], taken, abc[4]]))
        assert table_counts(store) == before and store.batch_for_run("run-2") is None
    with pytest.raises(StoreError, match=f"item {abc[3]} is picked twice"):
        store.create_batch("run-2", "margin", 1, picks_frame([abc[3], abc[3]]))
    assert table_counts(store) == before

    # Once the first batch is closed its unanswered item is back in the pool.
    store.close_batch(first, "expired")
    second = store.create_batch("run-2", "margin", 1, picks_frame([abc[3], abc[1], abc[4]]))
    assert store.batch_items(second)["item_id"].tolist() == [abc[3], abc[1], abc[4]]


def _query_settings(tmp_path: Path, small_csv: Path):
    from conftest import write_config

    from alflow.config import load_config

    return load_config(write_config(tmp_path, labels=["ham", "spam"], source_path=small_csv), environ={})


def _ingest(settings) -> Store:
    from alflow.tasks.ingest import ingest_source

    store = Store(settings.database, settings.store.lock_timeout_seconds)
    store.migrate()
    ingest_source(settings, "corpus", "ingest-1")
    return store


def test_query_returns_the_runs_existing_batch_and_writes_nothing(tmp_path: Path, small_csv: Path):
    from alflow.tasks.query import query_batch

    settings = _query_settings(tmp_path, small_csv)
    store = _ingest(settings)
    batch_id = query_batch(store, settings, None, "run-1")
    before = table_counts(store)
    assert before["batches"] == 1 and before["batch_items"] == 20
    assert query_batch(store, settings, None, "run-1") == batch_id
    assert query_batch(store, settings, 3, "run-1", budget_left=5) == batch_id  # whatever else asked
    assert table_counts(store) == before
    other = query_batch(store, settings, None, "run-2")
    assert other != batch_id and table_counts(store)["batches"] == 2


def test_concurrent_queries_never_share_an_item(tmp_path: Path, small_csv: Path, monkeypatch):
    """Two cycles query the same pool at once (both pick before either records): the
    second batch recorded is refused by the store and picked again from what is left."""
    import threading

    from alflow.tasks.query import query_batch

    settings = _query_settings(tmp_path, small_csv)
    store = _ingest(settings)
    both_picked = threading.Barrier(2)
    original = Store.create_batch
    local = threading.local()

    def create_batch(self, *args, **kwargs):
        if not getattr(local, "met", False):
            local.met = True
            try:
                both_picked.wait(timeout=5)
            except threading.BrokenBarrierError:
                pass
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "create_batch", create_batch)
    results, errors = {}, []

    def query(run_id: str) -> None:
        try:
            results[run_id] = query_batch(Store(store.path), settings, None, run_id)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=query, args=(run,)) for run in ("run-a", "run-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(set(results.values())) == 2
    rows = store.query_df("SELECT batch_id, item_id FROM batch_items")
    assert len(rows) == 40 and rows["item_id"].is_unique
    assert set(store.batches("open")["batch_id"]) == set(results.values())
    assert {store.batch(b)["flow_run_id"] for b in results.values()} == {"run-a", "run-b"}


# -- gold labels at ingest ---------------------------------------------------------------
def _labeled_csv(path: Path, labels: list[str]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([f"message number {n}", label] for n, label in enumerate(labels))
    return path


def test_ingest_maps_gold_labels_with_label_map(tmp_path: Path):
    from conftest import write_config

    from alflow.config import load_config
    from alflow.tasks.ingest import ingest_source

    csv_path = _labeled_csv(tmp_path / "binary.csv", ["0", "1", "0", "ham"])
    config = write_config(tmp_path, labels=["ham", "spam"], source_path=csv_path)
    config.write_text(config.read_text() + 'label_map = { 0 = "ham", 1 = "spam" }\n')
    settings = load_config(config, environ={})
    Store(settings.database).migrate()
    report = ingest_source(settings, "corpus", "ingest-1")
    assert (report.read, report.new) == (4, 4)
    gold = Store(settings.database).query_df("SELECT text, gold_label FROM items ORDER BY text")
    assert gold["gold_label"].tolist() == ["ham", "spam", "ham", "ham"]


def test_ingest_stops_writing_at_the_first_chunk_with_unknown_gold_labels(tmp_path: Path, monkeypatch):
    """Chunks before the first bad one are stored (they were valid); from it on nothing is
    written, but the whole source is read so that the error counts every bad value."""
    from conftest import write_config

    from alflow.config import load_config
    from alflow.connectors import SourceError
    from alflow.tasks import ingest

    monkeypatch.setattr(ingest, "WRITE_CHUNK", 10)
    labels = ["ham"] * 25 + ["Spam"] + ["ham"] * 10 + ["HAM"] * 3 + ["Spam"] * 2 + ["spam"] * 9
    csv_path = _labeled_csv(tmp_path / "mixed.csv", labels)
    settings = load_config(write_config(tmp_path, labels=["ham", "spam"], source_path=csv_path), environ={})
    Store(settings.database).migrate()
    with pytest.raises(SourceError) as info:
        ingest.ingest_source(settings, "corpus", "ingest-1")
    assert str(info.value) == (
        "source corpus: gold labels not in labels ['ham', 'spam']: 'HAM' (3), 'Spam' (3); "
        "fix label_column or map them with label_map"
    )
    store = Store(settings.database)
    assert store.scalar("SELECT count(*) FROM items") == 20  # chunks 1 and 2; chunk 3 held 'Spam'
    assert store.scalar("SELECT count(*) FROM items WHERE gold_label NOT IN ('ham', 'spam')") == 0
    assert store.scalar("SELECT count(*) FROM ingests") == 0
