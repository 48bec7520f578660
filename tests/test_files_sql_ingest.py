"""Files read by DuckDB's own reader store what Python's reader stored.

The same files (CSV with quotes, line breaks, a byte order mark and CRLF; JSONL; Parquet;
Latin-1 with ``encoding``; empty, whitespace-only, oversized, malformed and duplicate rows)
ingested through ``ingest_source`` by either reader give the expected store rows, written out
here (item ids are sha256 of title, 0x1f, text, computed with hashlib), and the same counts,
``ingests`` row and cursor. Generated CSVs give the same rows by both readers. Where DuckDB
would read a file otherwise, Python's reader takes over.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alflow.config import load_config
from alflow.connectors import SourceError
from alflow.connectors.base import content_hash, normalise_text
from alflow.connectors.files import WHITESPACE, FilesConnector, content_hash_sql, normalise_sql
from alflow.tasks import ingest as ingest_module
from alflow.tasks.ingest import ingest_source
from alflow.tasks.store import Store

LABEL_MAP = {"0": "ham", "1": "spam"}


def project(directory: Path, path: Path, **keys) -> object:
    """Settings of a project over one files source ``corpus`` with these source keys."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f'path = "{path.as_posix()}"'] + [
        f"{key} = {_inline(value) if isinstance(value, dict) else json.dumps(value)}" for key, value in keys.items()]
    config = directory / "alflow.toml"
    config.write_text('labels = ["ham", "spam"]\ndatabase = "state/alflow.duckdb"\n\n'
                      '[[sources]]\ntype = "files"\nname = "corpus"\n' + "\n".join(lines) + "\n", encoding="utf-8")
    settings = load_config(config, environ={})
    Store(settings.database).migrate()
    return settings


def _inline(table: dict) -> str:
    return "{ " + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items()) + " }"


def item(text: str, title: str | None = None, **columns) -> dict:
    """An expected ``items`` row."""
    key = hashlib.sha256(f"{title or ''}\x1f{text}".encode("utf-8")).hexdigest()
    return {"item_id": key, "source": "corpus", "external_id": columns.get("external_id"), "url": None,
            "title": title, "text": text, "gold_label": columns.get("gold_label"), "meta": columns.get("meta", "{}")}


def stored(settings) -> tuple[list[dict], list[tuple]]:
    """(the items, sorted by item_id; each ingests row's counts and bad_reasons)."""
    store = Store(settings.database)
    items = store.query_df("SELECT item_id, source, external_id, url, title, text, gold_label, meta::VARCHAR AS meta "
                           "FROM items ORDER BY item_id").to_dict("records")
    items = [{k: (None if v is None or v != v else v) for k, v in row.items()} for row in items]
    ingests = [tuple(row) for row in store.query_df(
        "SELECT n_read, n_new, n_duplicate, n_bad, bad_reasons FROM ingests ORDER BY finished_at").values.tolist()]
    return items, ingests


@pytest.fixture(params=["duckdb", "python"])
def reader(request, monkeypatch) -> str:
    """Which reader the ingest may use: DuckDB's (Python's fetch fails the test) or Python's
    (the path every file took before)."""
    if request.param == "duckdb":
        def no_python(self, progress=None):
            raise AssertionError(f"{self.path.name} was read by Python's reader ({self.why_python})")
        monkeypatch.setattr(FilesConnector, "fetch", no_python)
    else:
        monkeypatch.setattr(FilesConnector, "record_scan", lambda self, looked=True: None)
    return request.param


# -- the same store rows by either reader ------------------------------------------------------
def messy_csv(path: Path) -> Path:
    """A UTF-8 CSV with a byte order mark and CRLF line ends, quoted fields holding delimiters,
    quotes and line breaks, and every kind of row the ingest counts."""
    rows = [
        "id,title,text,label,note,_private",
        '1,Glacier,"Glacier retreats, ""fast""\r\nsays report",0,first,x',
        '2,Glacier,"Glacier  retreats, ""fast"" says\treport",0,second,y',  # the same item, spaced otherwise
        "3,,Volcano wakes up,1,,",
        "4,Empty,   ,0,,",                                    # empty text
        "5,Wide,\u3000\u2003,0,,",                            # whitespace only (not ASCII)
        "6,Long," + "x" * 61 + ",1,,",                        # longer than max_text_chars
        "7,Cafe,Cafe\u0301 au lait,1, spaced note ,",         # not NFC; a note kept as it is
        "8,Cafe,Caf\u00e9 au lait,1,dup,",                    # the same item in NFC
        "9,Storm,Storm in the north,0,a,b,extra",              # more cells than columns
        "10,Short",                                            # fewer: no text
        "11,Rain,Rain all week",                               # fewer: no label, no note
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode("utf-8") + b"\r\n")
    return path


def test_a_csv_gives_the_expected_items_by_either_reader(tmp_path, reader):
    settings = project(tmp_path, messy_csv(tmp_path / "messy.csv"), title_column="title", id_column="id",
                       label_column="label", label_map=LABEL_MAP, max_text_chars=60)
    report = ingest_source(settings, "corpus", "ingest-1")
    assert report.line() == ("corpus: 6 read, 4 new, 2 duplicates, 5 failed (3 empty text, 1 malformed CSV row, "
                             "1 text longer than max_text_chars (60))")
    expected = [
        item('Glacier retreats, "fast" says report', "Glacier", external_id="1", gold_label="ham",
             meta='{"note": "first"}'),
        item("Volcano wakes up", external_id="3", gold_label="spam"),
        item("Caf\u00e9 au lait", "Cafe", external_id="7", gold_label="spam", meta='{"note": " spaced note "}'),
        item("Rain all week", "Rain", external_id="11"),
    ]
    reasons = {"empty text": 3, "malformed CSV row": 1, "text longer than max_text_chars (60)": 1}
    assert stored(settings) == (sorted(expected, key=lambda row: row["item_id"]), [(6, 4, 2, 5, json.dumps(reasons))])
    cursor = Store(settings.database).source_cursor("corpus").value
    assert (cursor["read"], cursor["bad_reasons"]) == (6, reasons)


def test_jsonl_and_parquet_give_the_expected_items_by_either_reader(tmp_path, reader):
    lines = [
        '{"id": 1, "body": "first message", "cls": "ham", "score": 0.5, "n": 3, "ok": true, "none": null, "_p": 1}',
        '{"id": 2, "body": "  second   message ", "cls": "spam", "big": 18446744073709551615, "tiny": 1e-07}',
        '["not", "an object"]',
        "",
        '{"cls": "ham"}',
        '{"id": 4, "body": "", "cls": "ham"}',
        '{"id": 5, "body": 12.5, "cls": "spam", "note": "caf\\u00e9 \\"quoted\\""}',
        '{"id": 6, "body": "first message", "cls": "spam"}',
    ]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = project(tmp_path / "jsonl", jsonl, text_column="body", id_column="id", label_column="cls")
    report = ingest_source(settings, "corpus", "ingest-1")
    assert report.line() == ("corpus: 4 read, 3 new, 1 duplicates, 3 failed "
                             "(1 JSON line is not an object, 1 empty text, 1 no 'body' field)")
    expected = [
        item("first message", external_id="1", gold_label="ham", meta='{"score": 0.5, "n": 3, "ok": true}'),
        item("second message", external_id="2", gold_label="spam",
             meta='{"big": 18446744073709551615, "tiny": 1e-07}'),
        item("12.5", external_id="5", gold_label="spam", meta='{"note": "caf\u00e9 \\"quoted\\""}'),
    ]
    assert stored(settings)[0] == sorted(expected, key=lambda row: row["item_id"])

    parquet = tmp_path / "items.parquet"
    pd.DataFrame({"text": ["one parquet row", "two parquet row", None, "  one parquet   row "],
                  "headline": ["T1", None, "T3", "T1"], "label": [0, 1, 0, 1], "n": [1, 2, 3, 4],
                  "f": [0.5, float("nan"), 1.0, float("inf")], "b": [True, False, None, True]}
                 ).to_parquet(parquet, index=False)
    settings = project(tmp_path / "parquet", parquet, title_column="headline", label_column="label",
                       label_map=LABEL_MAP)
    assert ingest_source(settings, "corpus", "ingest-1").line() == \
        "corpus: 3 read, 2 new, 1 duplicates, 1 failed (1 empty text)"
    expected = [item("one parquet row", "T1", gold_label="ham", meta='{"n": 1, "f": 0.5, "b": true}'),
                item("two parquet row", gold_label="spam", meta='{"n": 2, "b": false}')]
    assert stored(settings)[0] == sorted(expected, key=lambda row: row["item_id"])


def test_a_latin1_file_with_encoding_and_without(tmp_path, reader):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9 cr\u00e8me,0\n".encode("latin-1"))
    settings = project(tmp_path / "set", path, label_column="label", label_map=LABEL_MAP, encoding="latin-1")
    assert ingest_source(settings, "corpus", "ingest-1").line() == "corpus: 1 read, 1 new, 0 duplicates, 0 failed"
    assert stored(settings)[0] == [item("caf\u00e9 cr\u00e8me", gold_label="ham")]


def test_a_file_duckdb_would_read_otherwise_is_read_by_python(tmp_path, monkeypatch, caplog):
    """Bytes that do not decode, quoting Python's reader reads its own way, a value only
    Python turns into text: the Python reader reads the file, nothing is written twice."""
    caplog.set_level("INFO", logger="alflow")
    cases = {
        "undecodable.csv": (b"text,label\ncaf\xe9,0\nfine,1\n", {},
                            "corpus: 1 read, 1 new, 0 duplicates, 1 failed (1 undecodable as utf-8: set encoding)"),
        "spaced.csv": (b'text,label\n "quoted", 0\n', {}, "corpus: 1 read, 1 new, 0 duplicates, 0 failed"),
        "unclosed.csv": (b'text,label\nshort,0\n"never closed,1\nrow,0\n', {"max_text_chars": 10},
                         "corpus: 1 read, 1 new, 0 duplicates, 1 failed (1 text longer than max_text_chars (10))"),
        "nested.jsonl": (b'{"text": "x", "label": "0", "extra": {"k": 1}}\n', {},
                         "corpus: 1 read, 1 new, 0 duplicates, 0 failed"),
        "cp1252.csv": ("text,label\nsmart \u2019quote\u2019,0\n".encode("cp1252"), {"encoding": "cp1252"},
                       "corpus: 1 read, 1 new, 0 duplicates, 0 failed"),
        "nul.csv": (b"text,label\na\x00\xcc\x81,0\n", {}, "corpus: 1 read, 1 new, 0 duplicates, 0 failed"),
    }
    metas, texts = {}, {}
    for name, (data, keys, line) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        settings = project(tmp_path / name.replace(".", "_"), path, label_column="label", label_map=LABEL_MAP, **keys)
        assert ingest_source(settings, "corpus", "ingest-1").line() == line, name
        items, ingests = stored(settings)
        metas[name], texts[name] = [row["meta"] for row in items], [row["text"] for row in items]
        assert len(ingests) == 1
    assert metas["nested.jsonl"] == ["{\"extra\": \"{'k': 1}\"}"]  # as Python writes a dict
    assert texts["nul.csv"] == ["a\x00\u0301"]  # DuckDB's NFC would drop the NUL and the accent
    assert sum("read by Python's reader" in r.message for r in caplog.records) == len(cases)


# -- generated CSVs: the same rows by both readers ----------------------------------------------
_CELLS = st.lists(st.sampled_from(list("ab ,\"'\n\r\t") + ["\u00e9", "e\u0301", "\u3000", "\u00a0", "\u2028", "\x0b",
                                                           "ham", "spam"]), max_size=8).map("".join)


@st.composite
def csv_files(draw) -> tuple[bytes, dict]:
    """A CSV as a writer makes one (line ends, quoting, a byte order mark chosen), with
    repeated, short and long rows; and the source keys to read it with."""
    width = draw(st.integers(1, 4))
    header = ["text", "title", "label", "note"][:width]
    rows = draw(st.lists(st.lists(_CELLS, min_size=width, max_size=width), max_size=8))
    for index in draw(st.lists(st.integers(0, 7), max_size=3)):  # copies of earlier rows
        if rows:
            rows.append(list(rows[index % len(rows)]))
    if rows and draw(st.booleans()):
        rows.insert(draw(st.integers(0, len(rows))), rows[0][: draw(st.integers(0, width + 1))] + ["x"] * (width == 0))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"])),
                        quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
    writer.writerows([header, *rows])
    data = buffer.getvalue().encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    keys = {"max_text_chars": draw(st.sampled_from([8, 100]))}
    if width > 1 and draw(st.booleans()):
        keys["title_column"] = "title"
    if width > 2:
        keys.update(label_column="label", label_map={"": "ham", "a": "ham", "b": "spam", "ham": "ham",
                                                     "spam": "spam"})
    return data, keys


def test_generated_csvs_give_the_same_rows_by_both_readers(tmp_path, monkeypatch):
    """About 4 s: 15 files, each read by both readers."""
    sql_read = []
    original = ingest_module.ingest_scan

    def spy(*args, **kwargs):
        original(*args, **kwargs)
        sql_read.append(1)

    monkeypatch.setattr(ingest_module, "ingest_scan", spy)

    @settings(max_examples=15, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(csv_files())
    def same_rows(case):
        data, keys = case
        results = []
        for name, scan in (("duckdb", FilesConnector.record_scan), ("python", lambda self, looked=True: None)):
            (tmp_path / name).mkdir(exist_ok=True)
            path = tmp_path / name / "generated.csv"
            path.write_bytes(data)
            settings = project(tmp_path / name, path, **keys)
            with Store(settings.database).transaction() as con:
                for table in ("items", "ingests", "source_cursors"):
                    con.execute(f"DELETE FROM {table}")
            with monkeypatch.context() as patched:
                patched.setattr(FilesConnector, "record_scan", scan)
                try:
                    line = ingest_source(settings, "corpus", "ingest-1").line()
                except SourceError as exc:
                    line = str(exc)
            results.append((line, *stored(settings)))
        assert results[0] == results[1]

    same_rows()
    assert len(sql_read) >= 5  # not all of them went Python's way


# -- the rules in SQL -----------------------------------------------------------------------------
def test_whitespace_is_what_str_split_splits_on():
    import sys

    assert WHITESPACE == "".join(ch for ch in map(chr, range(sys.maxunicode + 1)) if ch.isspace())


_DUCKDB = []  # one connection for every example


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.lists(st.sampled_from(list(WHITESPACE) + ["a", "\u00e9", "e\u0301", "\u212b", "\u0301",
                                                                       "x y"])).map("".join),
                          st.one_of(st.none(), st.text(st.characters(exclude_characters="\x00"), max_size=6))),
                max_size=20))
def test_normalisation_and_hash_in_sql_are_the_python_ones(pairs):
    """(DuckDB's NFC drops a NUL followed by a combining mark: a file with a NUL in a text or
    title is read by Python, see test_a_file_duckdb_would_read_otherwise_is_read_by_python.)"""
    import duckdb

    texts = [text for text, _ in pairs]
    titles = [title for _, title in pairs]
    if not _DUCKDB:
        _DUCKDB.append(duckdb.connect())
    hashed = content_hash_sql(normalise_sql("p[1]"), f"nullif({normalise_sql('p[2]')}, '')")
    rows = _DUCKDB[0].execute(
        f"""SELECT list_transform(?::VARCHAR[], lambda t: {normalise_sql('t')}),
                   list_transform(list_zip(?::VARCHAR[], ?::VARCHAR[]), lambda p: {hashed})""",
        [texts, texts, titles]).fetchone()
    assert rows[0] == [normalise_text(text) for text in texts]
    assert rows[1] == [content_hash(text, title) for text, title in pairs]


# -- what issue 21 built, on the SQL path ------------------------------------------------------------
def clean_csv(path: Path, labels: list[str]) -> Path:
    path.write_text("text,label\n" + "".join(f"message number {n},{label}\n" for n, label in enumerate(labels)),
                    encoding="utf-8")
    return path


def test_a_file_ingest_loads_neither_pandas_nor_scikit_learn(tmp_path):
    """What `alflow ingest` runs for a file, read and then found unchanged, in a fresh process:
    pandas (0.2-0.4 s of the command's start-up) and scikit-learn (1.1-1.4 s) stay unloaded."""
    import subprocess
    import sys

    settings = project(tmp_path, clean_csv(tmp_path / "clean.csv", ["ham", "spam"]), label_column="label")
    code = ("import sys\nfrom alflow.config import load_config\nfrom alflow.tasks.ingest import ingest_source\n"
            f"settings = load_config({str(settings.config_path)!r}, environ={{}}, check_model=False)\n"
            "lines = [ingest_source(settings, 'corpus', run).line() for run in ('first', 'again')]\n"
            "print(lines, sorted(m for m in ('pandas', 'sklearn', 'scipy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == ("['corpus: 2 read, 2 new, 0 duplicates, 0 failed', "
                                   "'corpus: 2 read, 0 new, 2 duplicates, 0 failed'] []"), done.stderr


def test_gold_labels_outside_labels_store_the_chunks_before_them(tmp_path, reader, monkeypatch):
    monkeypatch.setattr(ingest_module, "WRITE_CHUNK", 4)
    labels = ["ham"] * 9 + ["Spam"] + ["ham"] * 3 + ["HAM"] * 2
    settings = project(tmp_path, clean_csv(tmp_path / "gold.csv", labels), label_column="label")
    with pytest.raises(SourceError) as info:
        ingest_source(settings, "corpus", "ingest-1")
    assert str(info.value) == ("source corpus: gold labels not in labels ['ham', 'spam']: 'HAM' (2), 'Spam' (1); "
                               "fix label_column or map them with label_map")
    assert info.value.report.line().endswith("(15 read, 8 new, 0 duplicates before it stopped)")
    items, ingests = stored(settings)
    assert sorted(row["text"] for row in items) == [f"message number {n}" for n in range(8)]  # chunks 1 and 2
    assert ingests == [] and Store(settings.database).source_cursor("corpus") is None


def test_a_crash_in_the_transaction_leaves_nothing_and_the_next_run_completes(tmp_path, monkeypatch):
    """The fault points of tasks/faults.py, on the SQL path: read and staged but not stored
    (ingest-mid-chunk), items and ingests row written but not the cursor (ingest-after-write)."""
    from alflow.tasks.store import cursors

    class Crash(BaseException):
        pass

    settings = project(tmp_path, clean_csv(tmp_path / "c.csv", ["ham", "spam"] * 5), label_column="label")
    for module, point in ((ingest_module, "ingest-mid-chunk"), (cursors, "ingest-after-write")):
        def crash(name, point=point):
            if name == point:
                raise Crash(name)

        with monkeypatch.context() as patched:
            patched.setattr(module, "fault_point", crash)
            with pytest.raises(Crash):
                ingest_source(settings, "corpus", f"ingest-{point}")
        assert stored(settings) == ([], []) and Store(settings.database).source_cursor("corpus") is None, point
    monkeypatch.setattr(FilesConnector, "fetch", lambda self, progress=None: pytest.fail("read by Python"))
    assert ingest_source(settings, "corpus", "ingest-2").line() == "corpus: 10 read, 10 new, 0 duplicates, 0 failed"
    staged = []
    monkeypatch.setattr(Store, "staged_scan", lambda self, scan: staged.append(scan))
    assert ingest_source(settings, "corpus", "ingest-3").line() == "corpus: 10 read, 0 new, 10 duplicates, 0 failed"
    assert staged == []  # the unchanged file: not read again


def test_parquet_row_groups_read_in_parallel_keep_the_first_copy(tmp_path):
    """DuckDB reads row groups on several threads; the staged rows keep the file's order
    (https://duckdb.org/docs/2.0/sql/dialect/order_preservation), so the first copy of an
    item is the one stored, as by Python's reader."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 6000
    texts = [f"text {i % 3000}" for i in range(n)]  # each text twice, 3,000 rows apart
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"text": texts, "copy": [i // 3000 for i in range(n)]}), path, row_group_size=250)
    settings = project(tmp_path, path)
    assert ingest_source(settings, "corpus", "ingest-1").line() == \
        "corpus: 6000 read, 3000 new, 3000 duplicates, 0 failed"
    assert set(Store(settings.database).query_df("SELECT meta::VARCHAR AS m FROM items")["m"]) == {'{"copy": 0}'}


def test_no_row_of_the_file_becomes_a_python_object(tmp_path, monkeypatch):
    """Python's peak allocation while ingesting 40,000 rows (1 MB) stays within a few of the
    blocks it hashes the file by (64 KB here), whatever the rows."""
    from alflow.connectors import files

    monkeypatch.setattr(files, "_BLOCK", 1 << 16)
    path = clean_csv(tmp_path / "big.csv", ["ham", "spam"] * 20_000)
    settings = project(tmp_path, path, label_column="label")
    tracemalloc.start()
    try:
        report = ingest_source(settings, "corpus", "ingest-1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.new == 40_000 and path.stat().st_size > 1_000_000
    assert peak < 4 * (1 << 16), f"{peak:,} bytes at peak"
