"""The files connector (CSV, JSONL, Parquet, a folder of .txt) and the shared normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import AG_NEWS_CSV, SMS_CSV

from alflow.config import FilesSource
from alflow.connectors import (
    Connector,
    Record,
    SourceError,
    build_connector,
    content_hash,
    normalise_text,
    to_row,
)


def source(path: Path, **kw) -> FilesSource:
    return FilesSource(type="files", name=kw.pop("name", "src"), path=path, **kw)


def read(path: Path, **kw):
    connector = build_connector(source(path, **kw))
    return list(connector.fetch()), connector.report


# -- CSV ---------------------------------------------------------------------------------
def test_sms_csv_reads_every_row_with_gold_labels():
    connector = build_connector(source(SMS_CSV, name="sms", label_column="label"))
    assert isinstance(connector, Connector)
    ticks = []
    records = list(connector.fetch(progress=ticks.append))
    assert len(records) == connector.report.read == 5574
    assert connector.report.n_bad == 0
    assert sum(ticks) == 5574
    assert {r.gold_label for r in records} == {"ham", "spam"}
    assert sum(r.gold_label == "spam" for r in records) == 747
    assert records[1].text == "Ok lar... Joking wif u oni..."
    assert records[0].meta == {} and records[0].title is None
    rows = [to_row(r, "sms") for r in records]
    assert len({row["item_id"] for row in rows}) == 5160  # 414 exact duplicates, counted
    assert all(row["source"] == "sms" for row in rows)


def test_sms_csv_without_label_column_has_no_gold():
    records, _ = read(SMS_CSV)
    assert len(records) == 5574
    assert all(r.gold_label is None for r in records)
    assert records[0].meta == {"label": "ham"}  # unused columns are kept as meta


def test_csv_with_title_and_extra_columns():
    records, report = read(AG_NEWS_CSV, title_column="title", label_column="label")
    assert len(records) == 800 and report.n_bad == 0
    assert {r.gold_label for r in records} == {"world", "sports", "business", "scitech"}
    first = records[0]
    assert first.title == "Sun to shine spotlight on new operating system, Solaris 10"
    assert first.text.startswith("Sun to shine spotlight") and first.gold_label == "scitech"


def test_csv_bad_rows_are_counted_by_reason(tmp_path: Path):
    path = tmp_path / "messy.csv"
    path.write_bytes(
        b"id,text,label,note\n"
        b"1,fine row,ham,\n"
        b"2,\"caf\xff bad byte\",spam,\n"        # not UTF-8
        b"3,,ham,\n"                              # empty text
        b"4,   ,ham,\n"                           # only spaces
        b"5,too,many,cells,here\n"               # more cells than columns
        b"6,bad byte in an extra column,ham,x\xfey\n"
        b"7,\"quoted, with comma\",spam,a note\n"
    )
    records, report = read(path, id_column="id", label_column="label")
    assert [r.external_id for r in records] == ["1", "7"]
    assert records[1].text == "quoted, with comma" and records[1].meta == {"note": "a note"}
    assert report.read == 2
    assert report.bad == {"undecodable as utf-8: set encoding": 2, "empty text": 2, "malformed CSV row": 1}
    assert report.n_bad == 5
    # What was read can be stored: every field encodes.
    for record in records:
        json.dumps(to_row(record, "src"), ensure_ascii=False).encode("utf-8")


def test_csv_other_encoding(tmp_path: Path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text\ncafé crème\n".encode("latin-1"))
    records, report = read(path, encoding="latin-1")
    assert [r.text for r in records] == ["café crème"] and report.n_bad == 0
    records, report = read(path)  # as UTF-8 the byte does not decode
    assert records == [] and report.bad == {"undecodable as utf-8: set encoding": 1}


def test_missing_column_raises_naming_it(tmp_path: Path):
    with pytest.raises(SourceError, match="'category'") as info:
        read(SMS_CSV, label_column="category")
    assert "label_column" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SourceError, match="'body'"):
        read(SMS_CSV, text_column="body")


def test_missing_path_raises(tmp_path: Path):
    with pytest.raises(SourceError) as info:
        build_connector(source(tmp_path / "absent.csv", name="gone"))
    assert "absent.csv" in str(info.value) and "gone" in str(info.value)


def test_unknown_extension_raises_unless_format_given(tmp_path: Path):
    path = tmp_path / "data.tsvx"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(SourceError, match="format"):
        build_connector(source(path))
    records, _ = read(path, format="csv")
    assert [r.text for r in records] == ["hello"]


def test_empty_csv_yields_nothing(tmp_path: Path):
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")
    records, report = read(path)
    assert records == [] and report.read == 0 and report.n_bad == 0


# -- JSONL -------------------------------------------------------------------------------
def test_jsonl_bad_lines_are_counted_not_fatal(tmp_path: Path):
    path = tmp_path / "items.jsonl"
    lines = [
        json.dumps({"id": 1, "body": "first message", "cls": "ham", "extra": {"k": 1}}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
        json.dumps({"id": 2, "body": "second message", "cls": "spam", "score": 0.5}),
        json.dumps({"id": 3, "cls": "ham"}),          # no text field
        json.dumps({"id": 4, "body": "", "cls": "ham"}),
        '{"id": 5, "body": "lone \\ud800 surrogate"}',  # valid JSON, cannot be stored
        json.dumps({"id": 6, "body": "third message", "cls": None}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records, report = read(path, text_column="body", id_column="id", label_column="cls")
    assert [r.text for r in records] == ["first message", "second message", "third message"]
    assert [r.external_id for r in records] == ["1", "2", "6"]
    assert [r.gold_label for r in records] == ["ham", "spam", None]
    assert records[0].meta == {"extra": "{'k': 1}"}
    assert records[1].meta == {"score": 0.5}
    assert report.read == 3
    assert report.bad == {"malformed JSON line": 1, "JSON line is not an object": 1,
                          "no 'body' field": 1, "empty text": 1, "lone surrogate in the text": 1}
    for record in records:
        json.dumps(to_row(record, "src"), ensure_ascii=False).encode("utf-8")


# -- Parquet -----------------------------------------------------------------------------
def test_parquet(tmp_path: Path):
    path = tmp_path / "items.parquet"
    frame = pd.DataFrame({
        "text": ["one parquet row", "two parquet row", None, "four parquet row"],
        "headline": ["T1", None, "T3", "T4"],
        "url": ["https://a.example/1", None, None, None],
        "label": ["a", "b", "a", None],
        "n": [1, 2, 3, 4],
    })
    frame.to_parquet(path, index=False)
    connector = build_connector(source(path, title_column="headline", url_column="url", label_column="label"))
    assert connector.expected_total() == 4
    records = list(connector.fetch())
    assert [r.text for r in records] == ["one parquet row", "two parquet row", "four parquet row"]
    assert [r.title for r in records] == ["T1", None, "T4"]
    assert [r.url for r in records] == ["https://a.example/1", None, None]
    assert [r.gold_label for r in records] == ["a", "b", None]
    assert [r.meta for r in records] == [{"n": 1}, {"n": 2}, {"n": 4}]
    assert connector.report.read == 3 and connector.report.bad == {"empty text": 1}


def test_parquet_missing_column(tmp_path: Path):
    path = tmp_path / "items.parquet"
    pd.DataFrame({"body": ["x"]}).to_parquet(path, index=False)
    with pytest.raises(SourceError, match="'text'"):
        read(path)


def test_parquet_that_is_not_parquet(tmp_path: Path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(SourceError, match="broken.parquet"):
        read(path)


# -- a folder of .txt files --------------------------------------------------------------
def test_txt_folder_with_labels_from_folders(tmp_path: Path):
    root = tmp_path / "corpus"
    (root / "spam").mkdir(parents=True)
    (root / "ham").mkdir()
    (root / "spam" / "win-a-prize.txt").write_text("You won!\n\nCall now.", encoding="utf-8")
    (root / "ham" / "lunch.txt").write_text("Lunch at noon?", encoding="utf-8")
    (root / "ham" / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "ham" / "broken.txt").write_bytes(b"\xff\xfe\xfa")
    (root / "ham" / "notes.md").write_text("not a txt file", encoding="utf-8")
    (root / "top.txt").write_text("At the top level", encoding="utf-8")

    connector = build_connector(source(root, label_from_folder=True))
    assert connector.expected_total() == 5
    records = {r.external_id: r for r in connector.fetch()}
    assert set(records) == {"spam/win-a-prize.txt", "ham/lunch.txt", "top.txt"}
    prize = records["spam/win-a-prize.txt"]
    assert (prize.title, prize.gold_label, prize.text) == ("win-a-prize", "spam", "You won!\n\nCall now.")
    assert records["ham/lunch.txt"].gold_label == "ham"
    assert records["top.txt"].gold_label is None  # no class folder
    assert records["ham/lunch.txt"].meta == {}
    assert connector.report.bad == {"undecodable as utf-8: set encoding": 1, "empty text": 1}
    assert connector.report.read == 3

    records, _ = read(root)  # without label_from_folder: no gold labels
    assert all(r.gold_label is None for r in records)


def test_txt_format_needs_a_folder(tmp_path: Path):
    path = tmp_path / "one.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(SourceError, match="folder"):
        read(path, format="txt")


# -- normalisation and the content hash -------------------------------------------------
def test_normalise_text():
    assert normalise_text("  a\tb\n\nc  ") == "a b c"
    assert normalise_text("e\u0301") == "\u00e9"  # NFC
    assert normalise_text("a\u00a0b") == "a b"    # no-break space is whitespace


def test_content_hash_ignores_spacing_not_content():
    base = content_hash("Free entry in 2 a wkly comp")
    for variant in ["Free entry in 2 a wkly comp ", "  Free  entry\tin 2\na wkly comp",
                    "Free entry in 2 a wkly comp\r\n"]:
        assert content_hash(variant) == base
    assert content_hash("free entry in 2 a wkly comp") != base
    assert len(base) == 64 and int(base, 16) >= 0
    # The title is part of the identity; text and title do not run together.
    assert content_hash("body", "Title") == content_hash(" body ", "  Title")
    assert content_hash("body", "Title") != content_hash("body")
    assert content_hash("b c", "a") != content_hash("c", "a b")
    assert content_hash("x", "") == content_hash("x", None) == content_hash("x")


def test_to_row_normalises_and_hashes():
    record = Record(text="  hello   world ", title=" A  title ", url="https://x", external_id="7",
                    gold_label="ham", meta={"k": "v"})
    row = to_row(record, "src")
    assert row == {
        "item_id": content_hash("hello world", "A title"),
        "source": "src", "external_id": "7", "url": "https://x", "title": "A title",
        "text": "hello world", "gold_label": "ham", "meta": '{"k": "v"}',
    }
    assert to_row(Record(text="hello world"), "s")["item_id"] == content_hash("hello  world")
    assert to_row(Record(text="x", title="   "), "s")["title"] is None


def test_normalise_text_is_the_regex_rule_for_every_kind_of_space():
    """The split/join rule equals the stored hashes' rule: NFC, then ``\\s+`` -> one space, stripped."""
    import re
    import unicodedata

    def by_regex(text: str) -> str:
        return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()

    for text in ["", "  ", "a", " a\tb\r\nc ", "x\x0by\x0cz", "u\x1cv\x1dw\x1ex\x1fy", "n\x85o\xa0p",
                 "\u1680q\u2000\u200a r\u2028\u2029s\u202ft\u205fu\u3000", "zero\u200bwidth stays",
                 "e\u0301 caf\u00e9", "\u212b ångström", "tab\t\tend\t"]:
        assert normalise_text(text) == by_regex(text), repr(text)


def test_csv_rows_of_ascii_cells_give_the_records_of_the_general_rule(tmp_path: Path):
    """ASCII rows are read by column position (no dict per row): the same records as the
    general rule, with repeated column names, `_` columns, blank and padded cells."""
    import csv as csv_module

    path = tmp_path / "mixed.csv"
    path.write_text(
        "text,headline,note,_private,note,label,extra\n"
        "  plain text  ,  A title ,first,hidden,second,ham, kept as is \n"
        "caf\u00e9 text,T\u00eetle,x,y,,spam,\n"        # not ASCII: the general rule
        "   ,no text,a,b,c,ham,d\n"                      # empty text
        "short row,Title\n"                               # fewer cells: the general rule
        "\"quoted, text\",,,,  ,,\n",
        encoding="utf-8",
    )
    settings = source(path, title_column="headline", label_column="label")
    connector = build_connector(settings)
    records = list(connector.fetch())
    general = build_connector(settings)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv_module.reader(handle))
    expected = [general._record(dict(zip(rows[0], cells + [None] * (len(rows[0]) - len(cells)))))
                for cells in rows[1:]]
    assert records == [record for record in expected if record is not None]
    assert records[0] == Record(text="plain text", title="A title", gold_label="ham",
                                meta={"note": "second", "extra": " kept as is "})
    assert connector.report.bad == general.report.bad == {"empty text": 1}


# -- a whole file read wrong: one line naming the key to set --------------------------------
def test_texts_longer_than_max_text_chars_are_rejected_and_counted(tmp_path: Path):
    """An unclosed quote swallows the rows after it into one cell: too long to be an item."""
    path = tmp_path / "quote.csv"
    path.write_text('text,label\nshort one,ham\n"never closed,spam\n' + "".join(f"row {n},ham\n" for n in range(50))
                    + "caf\u00e9 " + "x" * 60 + ",ham\n", encoding="utf-8")
    records, report = read(path, max_text_chars=40)
    assert [r.text for r in records] == ["short one"]
    assert report.bad == {"text longer than max_text_chars (40)": 1}  # the quote ate the rest of the file
    path.write_text("text\nshort one\n" + "x" * 41 + "\n" + "\u00e9" * 41 + "\n", encoding="utf-8")
    records, report = read(path, max_text_chars=40)  # ASCII rows and the general rule alike
    assert [r.text for r in records] == ["short one"] and report.bad == {"text longer than max_text_chars (40)": 2}
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("y" * 41, encoding="utf-8")
    assert read(folder, max_text_chars=40)[1].bad == {"text longer than max_text_chars (40)": 1}
    assert read(folder)[1].n_bad == 0  # the default (100,000) keeps it


def test_a_header_split_by_another_delimiter_names_the_delimiter_key(tmp_path: Path):
    path = tmp_path / "semi.csv"
    path.write_text("text;label\nhello;ham\nbye, then;spam\n", encoding="utf-8")
    with pytest.raises(SourceError) as info:
        read(path, label_column="label")
    assert str(info.value) == ("source src: semi.csv has no column 'text' for text_column (columns: text;label); "
                               "its header looks separated by ';', not ',': set delimiter = \";\"")
    records, report = read(path, label_column="label", delimiter=";")
    assert [(r.text, r.gold_label) for r in records] == [("hello", "ham"), ("bye, then", "spam")]
    path.write_text("text\tlabel\nhello\tham\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r'set delimiter = "\\t"$'):
        read(path, label_column="label")
    assert [r.text for r in read(path, label_column="label", delimiter="\t")[0]] == ["hello"]


def test_a_header_that_does_not_decode_names_the_encoding_key(tmp_path: Path):
    """A UTF-16 export (Excel's "Unicode text") or a Latin-1 header read as UTF-8: the file
    is not read row by row into thousands of rejects, it stops naming `encoding`."""
    path = tmp_path / "wide.csv"
    path.write_bytes("text,label\nhello,ham\n".encode("utf-16"))
    with pytest.raises(SourceError) as info:
        read(path)
    assert str(info.value) == ("source src: the header of wide.csv is not utf-8 text; "
                               'set encoding on the source (e.g. "latin-1", "cp1252", "utf-16")')
    assert [r.text for r in read(path, encoding="utf-16")[0]] == ["hello"]
    path.write_bytes("r\u00e9sum\u00e9,text\nx,hello\n".encode("latin-1"))
    with pytest.raises(SourceError, match="is not utf-8 text"):
        read(path)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path):
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\nhello,ham\n".encode("utf-8-sig"))
    records, _ = read(path, label_column="label")
    assert [(r.text, r.gold_label) for r in records] == [("hello", "ham")]


def test_an_unknown_encoding_is_a_config_error_naming_the_key(tmp_path: Path):
    from alflow.config import ConfigError, load_config

    config = tmp_path / "alflow.toml"
    config.write_text('labels = ["a", "b"]\n[[sources]]\ntype = "files"\nname = "f"\npath = "x.csv"\n'
                      'encoding = "latin-9x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"sources\.0\.files\.encoding: 'latin-9x' is not a Python codec") as info:
        load_config(config)
    assert "\n" not in str(info.value)


# -- which files DuckDB's reader reads (the ingest's SQL path) ------------------------------------
def test_record_scan_leaves_to_python_what_duckdb_would_read_otherwise(tmp_path: Path):
    """record_scan gives the SQL for a clean file (a padded second attempt for short rows),
    and None, saying why, where only Python's reader gives the records fetch gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    clean = tmp_path / "clean.csv"
    clean.write_text('text,label\n"a, ""quoted""\nline",ham\n', encoding="utf-8")
    scan = build_connector(source(clean)).record_scan()
    assert scan is not None and len(scan.attempts) == 2 and scan.params == (str(clean),)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("x", encoding="utf-8")
    pq.write_table(pa.table({"text": ["x"], "on": pa.array([0], pa.date32())}), tmp_path / "dates.parquet")
    cases = {
        folder: ({}, "a folder of .txt files"),
        clean: ({"encoding": "cp1252"}, "DuckDB does not read cp1252 as Python does"),
        b'text\n "spaced"\n': ({}, "CSV quoting Python's reader reads otherwise (a quote not at a field's edge)"),
        b'text\n"x" \n': ({}, "CSV quoting Python's reader reads otherwise (a quote not at a field's edge)"),
        b'text\nab"c\n': ({}, "CSV quoting Python's reader reads otherwise (a quote not at a field's edge)"),
        b'text\n"never closed\n': ({}, "a quoted CSV field that is never closed"),
        b"text\ncaf\xc3\xa9\n": ({"encoding": "ascii"}, "bytes that are not ascii"),
        b'{"text": "a"}\r{"text": "b"}\n': ({"format": "jsonl"}, "line breaks of a lone \\r"),
        b'\xef\xbb\xbf{"text": "a"}\n': ({"format": "jsonl"}, "a byte order mark Python's json reads as data"),
        tmp_path / "dates.parquet": ({}, "column 'on' of type date32[day] (Python writes it as text)"),
    }
    for n, (data, (keys, why)) in enumerate(cases.items()):
        path = data if isinstance(data, Path) else tmp_path / f"case{n}.csv"
        if not isinstance(data, Path):
            path.write_bytes(data)
        connector = build_connector(source(path, **keys))
        assert connector.record_scan() is None and connector.why_python == why, (data, connector.why_python)
    utf8_sig = tmp_path / "sig.jsonl"
    utf8_sig.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n')
    assert build_connector(source(utf8_sig, encoding="utf-8-sig")).record_scan() is not None


def test_the_quoting_check_reads_the_same_in_any_block_size(tmp_path: Path, monkeypatch):
    """The check follows quotes across the blocks the file is hashed in: a quote at a block's
    last or first byte is judged as within one block."""
    import csv as csv_module
    import io

    from alflow.connectors import files

    rows = [["a", 'say "hi"', ""], ['"', "x,y", "line\nbreak"], ['""', " spaced ", "crlf\r\nend"]]
    regular = []
    for terminator in ("\n", "\r\n"):
        for quoting in (csv_module.QUOTE_MINIMAL, csv_module.QUOTE_ALL):
            buffer = io.StringIO()
            csv_module.writer(buffer, lineterminator=terminator, quoting=quoting).writerows([["text", "b", "c"], *rows])
            regular.append(buffer.getvalue().encode())
    irregular = [data.replace(b',"', b', "', 1) for data in regular]
    irregular += [data.replace(b'",', b'" ,', 1) for data in regular]
    irregular += [data + b'"' for data in regular] + [b'text,b\nx,"y"z\n', b'text\n"a""\n']
    verdicts = {}
    for size in (1 << 24, 1, 2, 3, 5, 8):
        monkeypatch.setattr(files, "_BLOCK", size)
        for n, data in enumerate(regular + irregular):
            path = tmp_path / f"{n}.csv"
            path.write_bytes(data)
            connector = build_connector(source(path))
            connector.fingerprint()
            verdicts.setdefault(n, set()).add(connector.bytes_refusal)
    assert [verdicts[n] for n in range(len(regular))] == [{""}] * len(regular)
    assert all(len(verdicts[n]) == 1 and "" not in verdicts[n] for n in range(len(regular), len(verdicts)))
