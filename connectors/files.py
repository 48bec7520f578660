"""Local files: CSV, JSONL, Parquet, or a folder of ``.txt`` files.

Two readers give the same records. :meth:`FilesConnector.record_scan` hands a CSV, JSONL or
Parquet file to DuckDB's own reader (``read_csv``, ``read_json_objects``, ``read_parquet``)
with every per-row rule below written in SQL, so the ingest never holds the file's rows in
Python. :meth:`FilesConnector.fetch` streams the rows through Python (CSV and JSONL by row,
Parquet by record batch): for a folder of ``.txt`` files, an encoding DuckDB cannot read, and
a file whose rows DuckDB would read differently (irregular CSV quoting, values only Python
turns into text, bytes that do not decode); the ingest falls back to it then.

Bytes that do not decode in the configured encoding are kept as surrogates while reading
and the row is then rejected as undecodable, naming the ``encoding`` key - one bad row never
loses the rest of the file. A text longer than ``max_text_chars`` is rejected and counted
too. What is wrong with the whole file (a header that does not decode, a header split by
another delimiter) stops the source with one line naming the key to set.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from alflow.config import FilesSource
from alflow.connectors.base import FetchReport, Progress, Record, SourceError, has_undecodable

_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_PARQUET_BATCH = 10_000
_TICK = 1000  # rows per progress call
_BLOCK = 1 << 24  # bytes per read when hashing a file
# Field separators a CSV header may turn out to be split by, when it is not the configured one.
_DELIMITERS = (",", ";", "\t", "|")
# A byte the encoding could not decode, as errors="surrogateescape" keeps it; any other lone
# surrogate came escaped in the data (JSON's "\ud800"), whatever the encoding.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _cell(value: Any) -> str | None:
    """A table cell as text, or None when empty/missing."""
    if type(value) is str:  # the common case first: this runs for every cell read
        return value.strip() or None
    if value is None:
        return None
    if isinstance(value, float) and value != value:  # NaN
        return None
    text = str(value).strip()
    return text or None


# -- the per-row rules in SQL, for DuckDB's reader ------------------------------------------
# str.split()'s whitespace: every character c for which c.isspace() (a test checks the list).
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
              "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SPACE = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in WHITESPACE) + "]"  # an RE2 class
_NOT_SPACE = "[^" + _SPACE[1:]
_OTHER_SPACE = _SPACE.replace("\\x{20}", "")  # whitespace but the space
# Characters json.dumps escapes as \u00xx with a hex letter, which DuckDB's to_json writes in
# capitals ("\u000B"): a meta value holding one is left to Python's reader.
_CAPITAL_ESCAPES = r"[\x{0b}\x{0e}\x{0f}\x{1a}-\x{1f}]"
# DuckDB's readers decode these Python codecs (by codecs.lookup name) as Python does. Its
# Latin-1 refuses bytes 0x80-0x9f, which then fall back; ASCII is read as UTF-8 once the
# bytes are seen to be ASCII. JSON is UTF-8 to DuckDB.
_CSV_ENCODINGS = {"utf-8": "utf-8", "utf-8-sig": "utf-8", "ascii": "utf-8", "iso8859-1": "latin-1"}
_JSON_ENCODINGS = {"utf-8", "utf-8-sig", "ascii"}
REJECTS_TABLE = "scan_rejects"  # where DuckDB's CSV reader puts the rows it rejects
# DuckDB's CSV reader rejecting a row for this counts it as Python's reader does; a row it
# rejects for anything else (a row too short, bytes that do not decode) is not a row Python
# would reject the same way.
_CSV_REJECTS = {"TOO MANY COLUMNS": "malformed CSV row"}


def normalise_sql(expr: str) -> str:
    """:func:`~alflow.connectors.base.normalise_text` in SQL: NFC, each run of whitespace one
    space, stripped. A run that already is one space is left alone: replacing only the others
    costs a fifth of replacing every run (most runs are one space)."""
    return f"trim(regexp_replace(nfc_normalize({expr}), '{_SPACE}{{2,}}|{_OTHER_SPACE}', ' ', 'g'))"


def content_hash_sql(text: str, title: str) -> str:
    """:func:`~alflow.connectors.base.content_hash` in SQL, of a normalised text and title."""
    return f"sha256(coalesce({title}, '') || chr(31) || {text})"


def _strip_sql(expr: str) -> str:
    return f"regexp_replace({expr}, '^{_SPACE}+|{_SPACE}+$', '', 'g')"


def _filled_sql(expr: str) -> str:
    """TRUE when ``expr`` holds a character that is not whitespace (FALSE for NULL)."""
    return f"coalesce(regexp_matches({expr}, '{_NOT_SPACE}'), false)"


def _cell_sql(expr: str) -> str:
    """:func:`_cell` of a text value in SQL: stripped, NULL when empty or missing."""
    return (f"CASE WHEN NOT {_filled_sql(expr)} THEN NULL "
            f"WHEN regexp_matches({expr}, '^{_SPACE}|{_SPACE}$') THEN {_strip_sql(expr)} ELSE {expr} END")


def _has_nul_sql(*exprs: str) -> str:
    """TRUE when any of ``exprs`` holds a NUL (DuckDB's NFC drops one followed by a combining mark)."""
    return " OR ".join(f"coalesce(strpos({expr}, chr(0)) > 0, false)" for expr in exprs)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _records_sql(rows: str, max_chars: int, too_long: str) -> str:
    """:meth:`FilesConnector._record` and :func:`~alflow.connectors.base.to_columns` in SQL.

    ``rows`` yields a row per row of the file, in file order, with the columns ``problem``
    (why the row is no record whatever its text, else NULL), ``raw_text`` and ``raw_title``
    (the cells as read, NULL when missing), ``external_id``, ``url`` and ``gold_label``
    (cells: stripped, NULL when empty), ``meta`` (JSON text), ``odd_row`` (TRUE where only
    Python's reader tells what the row is) and ``odd`` (TRUE where only it gives the rest
    of a record). The result: the items columns (item_id, title, text, external_id, url,
    gold_label, meta as JSON), ``reason`` (NULL for a record) and ``python_only``.
    """
    return f"""SELECT {content_hash_sql('text', 'title')} AS item_id, title, text, external_id, url,
        gold_label, meta::JSON AS meta, reason, odd_row OR (reason IS NULL AND odd) AS python_only
    FROM (SELECT {normalise_sql('raw_text')} AS text, nullif({normalise_sql('raw_title')}, '') AS title,
                 external_id, url, gold_label, meta, problem, odd_row, odd,
                 CASE WHEN problem IS NOT NULL THEN problem
                      WHEN NOT {_filled_sql('raw_text')} THEN 'empty text'
                      WHEN length(raw_text) > {int(max_chars)}
                           AND length({_strip_sql('raw_text')}) > {int(max_chars)} THEN {_literal(too_long)}
                 END AS reason
          FROM ({rows}))"""


def _meta_sql(fields: list[tuple[str, str]]) -> str:
    """The meta JSON text (``json.dumps(meta, ensure_ascii=False)``) of fixed keys: each
    (key, SQL of its JSON value, NULL when the key is left out)."""
    if not fields:
        return "'{}'"
    parts = ", ".join(f"{_literal(json.dumps(key, ensure_ascii=False) + ': ')} || {value}" for key, value in fields)
    return f"'{{' || concat_ws(', ', {parts}) || '}}'"


# Whether a float is NaN or infinite is read from its text: DuckDB folds isnan() of a Parquet
# column to FALSE when the column's statistics (which leave NaN out) say so.
def _float_cell_sql(number: str) -> str:
    """Python's ``str()`` of a float, NULL for NaN (as :func:`_cell`)."""
    return f"CASE WHEN {number}::DOUBLE::VARCHAR NOT IN ('nan', '-nan') THEN {number}::DOUBLE::VARCHAR END"


def _float_value_sql(number: str) -> str:
    """``json.dumps`` of a float (NULL for NaN, which meta leaves out)."""
    return f"""CASE {number}::DOUBLE::VARCHAR WHEN 'nan' THEN NULL WHEN '-nan' THEN NULL WHEN 'inf' THEN 'Infinity'
        WHEN '-inf' THEN '-Infinity' ELSE {number}::DOUBLE::VARCHAR END"""


def _json_cell_sql(j: str, at: str) -> str:
    """Python's ``str()`` of the JSON value at pointer ``at`` (before :func:`_cell` strips
    it): NULL for null, NaN, a missing key, an object or an array (see :func:`_json_odd_sql`)."""
    value = f"json_extract({j}, {at})"
    return f"""CASE json_type({j}, {at})
        WHEN 'VARCHAR' THEN json_extract_string({j}, {at})
        WHEN 'BIGINT' THEN {value}::BIGINT::VARCHAR
        WHEN 'UBIGINT' THEN {value}::UBIGINT::VARCHAR
        WHEN 'DOUBLE' THEN {_float_cell_sql(value)}
        WHEN 'BOOLEAN' THEN CASE WHEN {value}::BOOLEAN THEN 'True' ELSE 'False' END END"""


def _json_value_sql(j: str, at: str) -> str:
    """``json.dumps`` of the Python value json.loads makes of the JSON value at ``at``."""
    value = f"json_extract({j}, {at})"
    return f"""CASE json_type({j}, {at})
        WHEN 'VARCHAR' THEN to_json(json_extract_string({j}, {at}))
        WHEN 'BIGINT' THEN {value}::BIGINT::VARCHAR
        WHEN 'UBIGINT' THEN {value}::UBIGINT::VARCHAR
        WHEN 'DOUBLE' THEN {_float_value_sql(value)}
        WHEN 'BOOLEAN' THEN CASE WHEN {value}::BOOLEAN THEN 'true' ELSE 'false' END END"""


def _json_odd_sql(j: str, at: str) -> str:
    """TRUE where only Python gives the value at ``at``: an object or an array (its repr),
    an integer too large for 64 bits (Python keeps it exact, DuckDB makes it a double)."""
    return f"""(json_type({j}, {at}) IN ('OBJECT', 'ARRAY')
        OR (json_type({j}, {at}) = 'DOUBLE' AND regexp_full_match(json_extract({j}, {at})::VARCHAR, '-?[0-9]+')))"""


def _pointer(key: str) -> str:
    """The JSON pointer of a top-level key, as a SQL literal."""
    return _literal("/" + key.replace("~", "~0").replace("/", "~1"))


@dataclass(frozen=True)
class RecordScan:
    """How DuckDB's own reader gives a file's records, for the ingest's SQL path.

    Each of ``attempts`` is a query yielding a row per row of the file, in file order, with
    the columns of :func:`_records_sql`; ``params`` are its parameters. DuckDB's CSV reader
    rejects some rows into ``rejects_table``: a reject whose error type is in ``rejects``
    counts as that reason; any other refuses the attempt, and the next one is tried (the
    last attempt refused, the file is read by Python).
    """

    attempts: tuple[str, ...]
    params: tuple = ()
    rejects_table: str | None = None
    rejects: dict[str, str] | None = None


class FilesConnector:
    """Reads one :class:`config.FilesSource`. See the module docstring for formats."""

    def __init__(self, settings: FilesSource):
        self.settings = settings
        self.name = settings.name
        self.report = FetchReport()
        self.path = Path(settings.path)
        self.format = self._detect_format()
        self._used = {settings.text_column, settings.title_column, settings.id_column, settings.url_column,
                      settings.label_column}
        # Parquet stores text as UTF-8 whatever ``encoding`` says: only a lone surrogate
        # escaped in the data can be undecodable there.
        self._undecodable = ("undecodable bytes" if self.format == "parquet"
                             else f"undecodable as {settings.encoding}: set encoding")
        self._too_long = f"text longer than max_text_chars ({settings.max_text_chars})"
        # What the last read of the file's bytes (fingerprint) found in them for record_scan:
        # None before any read, "" when DuckDB's reader gives the same rows, else why not.
        self._bytes_refusal: str | None = None
        self.why_python = ""  # why record_scan() gave None: for a log line

    def _detect_format(self) -> str:
        if not self.path.exists():
            raise SourceError(f"source {self.name}: {self.path} does not exist")
        if self.settings.format != "auto":
            return self.settings.format
        if self.path.is_dir():
            return "txt"
        fmt = _FORMATS.get(self.path.suffix.lower())
        if fmt is None:
            raise SourceError(
                f"source {self.name}: cannot tell the format of {self.path.name}; "
                "set format = csv, jsonl, parquet or txt"
            )
        return fmt

    # -- the Connector interface --------------------------------------------------------
    def expected_total(self) -> int | None:
        if self.format == "txt":
            return sum(1 for _ in self._txt_files())
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        return None

    def fingerprint(self, look: bool = True) -> str:
        """sha256 hex of what a fetch reads: the file's bytes, or each ``.txt`` file's path
        and bytes in order. Equal fingerprints (under equal settings) mean equal records.

        With ``look``, the same read looks at a CSV or JSONL file's bytes for
        :meth:`record_scan` (whether DuckDB's reader gives the rows Python's gives), so a
        first ingest reads them once; a re-run that may find the file unchanged skips it."""
        digest = hashlib.sha256()
        files = [(self.path, "")] if self.format != "txt" else \
            [(file, file.relative_to(self.path).as_posix()) for file in self._txt_files()]
        shape = self._byte_shape() if look else None
        for file, name in files:
            digest.update(f"{len(name)}:{name}:{file.stat().st_size}:".encode(errors="surrogateescape"))
            with open(file, "rb") as handle:
                if shape is None:
                    hashlib.file_digest(handle, lambda: digest)
                    continue
                while block := handle.read(_BLOCK):
                    digest.update(block)
                    shape.feed(block)
        if shape is not None:
            self._bytes_refusal = shape.refusal() or ""
        return digest.hexdigest()

    def fetch(self, progress: Progress | None = None) -> Iterator[Record]:
        reader = {
            "csv": self._csv_rows,
            "jsonl": self._jsonl_rows,
            "parquet": self._parquet_rows,
            "txt": self._txt_rows,
        }[self.format]
        unticked = 0  # rows read but not yet reported to ``progress`` (a call per row costs)
        try:
            for row in reader():
                unticked += 1
                if unticked == _TICK and progress:
                    progress(unticked)
                    unticked = 0
                if row is None:
                    continue
                record = row if type(row) is Record else self._record(row)
                if record is not None:
                    self.report.read += 1
                    yield record
        finally:
            if unticked and progress:
                progress(unticked)

    # -- DuckDB's reader ----------------------------------------------------------------
    def record_scan(self, looked: bool = True) -> RecordScan | None:
        """The SQL with which DuckDB's own reader gives the records :meth:`fetch` gives, or
        None (``why_python`` says why) where only Python's reader does: a folder of ``.txt``
        files, an encoding DuckDB does not read as Python does, a file whose bytes it would
        read differently. The file's rows stay in DuckDB. Raises the :class:`SourceError`
        :meth:`fetch` raises for the whole file (a header without the configured columns).

        ``looked=False`` leaves the look at the bytes to the caller: it runs
        :meth:`fingerprint` (meanwhile, in another thread) and uses the scan only if
        :attr:`bytes_refusal` is then empty."""
        s = self.settings
        encoding = codecs.lookup(s.encoding).name
        if self.format == "txt":
            return self._python("a folder of .txt files")
        if any(ch in str(self.path) for ch in "*?[{"):
            return self._python("its path reads as a pattern to DuckDB")
        if any("\x00" in name for name in self._used if name):
            return self._python("a column name holds a NUL")
        if self.format == "parquet":
            return self._parquet_scan()
        if encoding not in (_CSV_ENCODINGS if self.format == "csv" else _JSON_ENCODINGS):
            return self._python(f"DuckDB does not read {s.encoding} as Python does")
        if self.format == "csv" and (not s.delimiter.isascii() or s.delimiter in '"\r\n\x00'):
            return self._python(f"the delimiter {s.delimiter!r}")
        if looked and self._bytes_refusal is None:
            self.fingerprint()  # reads the bytes, looking at them
        if looked and self._bytes_refusal:
            return self._python(self._bytes_refusal)
        return self._csv_scan(_CSV_ENCODINGS[encoding]) if self.format == "csv" else self._jsonl_scan()

    @property
    def bytes_refusal(self) -> str | None:
        """Why the last look at the bytes (:meth:`fingerprint`) found DuckDB's reader would
        read them otherwise: "" when it would not, None before any look."""
        return self._bytes_refusal

    def _python(self, why: str) -> None:
        self.why_python = why
        return None

    def _byte_shape(self) -> _CsvQuoting | _JsonlLines | None:
        """What looks at the file's bytes for :meth:`record_scan` (None: nothing to look at)."""
        s = self.settings
        encoding = codecs.lookup(s.encoding).name
        if self.format == "csv" and encoding in _CSV_ENCODINGS and s.delimiter.isascii():
            return _CsvQuoting(s.delimiter, ascii_only=encoding == "ascii")
        if self.format == "jsonl" and encoding in _JSON_ENCODINGS:
            return _JsonlLines(bom_is_data=encoding == "utf-8", ascii_only=encoding == "ascii")
        return None

    def _csv_scan(self, encoding: str) -> RecordScan | None:
        """read_csv with the header Python's reader reads (its cells by position: c0, c1, ...)."""
        with self._csv_reader() as reader:
            try:
                header = self._csv_header(reader)
            except csv.Error as exc:
                raise SourceError(
                    f"source {self.name}: cannot parse {self.path.name} at line {reader.line_num}: {exc}") from None
        if header is None:
            return self._python("an empty file")
        if any("\x00" in name for name in header):
            return self._python("a column name holds a NUL")
        s = self.settings
        last = {name: f"c{i}" for i, name in enumerate(header)}  # a repeated name: its last cell, as in a dict
        cell = {key: last[name] if name else "NULL" for key, name in
                (("text", s.text_column), ("title", s.title_column), ("id", s.id_column), ("url", s.url_column),
                 ("label", s.label_column))}
        extras = [(name, column) for name, column in last.items()
                  if name not in self._used and not name.startswith("_")]
        meta = _meta_sql([(name, f"CASE WHEN {_filled_sql(column)} THEN to_json({column}) END")
                          for name, column in extras])
        odd = _has_nul_sql(cell["text"], cell["title"])
        if extras:
            joined = " || ".join(f"coalesce({column}, '')" for _, column in extras)
            odd += f" OR regexp_matches({joined}, '{_CAPITAL_ESCAPES}')"
        rows = [f"""SELECT NULL AS problem, {cell['text']} AS raw_text, {cell['title']} AS raw_title,
                {_cell_sql(cell['id'])} AS external_id, {_cell_sql(cell['url'])} AS url,
                {_cell_sql(cell['label'])} AS gold_label, {meta} AS meta, false AS odd_row, {odd} AS odd
            FROM {self._read_csv_sql(len(header), encoding, padded)}""" for padded in (False, True)]
        return RecordScan(tuple(_records_sql(r, s.max_text_chars, self._too_long) for r in rows), (str(self.path),),
                          REJECTS_TABLE, _CSV_REJECTS)

    def _read_csv_sql(self, width: int, encoding: str, padded: bool) -> str:
        """DuckDB's read_csv of the file as Python's csv module reads it, every cell text.

        A row with fewer cells than the header is rejected unless ``padded`` (its missing
        cells NULL, as Python's reader gives None): DuckDB pads only in one thread when a
        quoted field may hold a line break, so the padded read is the second attempt, for a
        file that has such rows. A row with more cells is rejected (a malformed row)."""
        columns = ", ".join(f"'c{i}': 'VARCHAR'" for i in range(width))
        options = [
            "header = true", f"columns = {{{columns}}}", "auto_detect = false", "skip = 0",
            "compression = 'none'",  # the bytes as they are, as Python's reader reads them (a .gz too)
            f"delim = {_literal(self.settings.delimiter)}", "quote = '\"'", "escape = '\"'",
            f"encoding = '{encoding}'", "strict_mode = true", "store_rejects = true",
            # NULL only for a missing cell (a short row, padded): a line break is never a whole
            # unquoted cell, and quoted ones are never NULL. An empty NULL string would also
            # make DuckDB drop a row's empty last cell beyond the header's, and read blank lines
            # of a one-column file as rows (Python's reader counts the one, skips the other).
            "nullstr = '\n'", "allow_quoted_nulls = false",
            f"rejects_table = '{REJECTS_TABLE}'", f"rejects_scan = '{REJECTS_TABLE}_scans'",
        ]
        if padded:
            options += ["null_padding = true", "parallel = false"]
        return f"read_csv(?, {', '.join(options)})"

    def _jsonl_scan(self) -> RecordScan:
        """read_json_objects: a JSON value per line, its fields found by JSON pointer."""
        s = self.settings
        j = "json"
        used = ", ".join(_literal(name) for name in self._used if name)

        def field(name: str | None) -> tuple[str, str]:
            """(the cell, before strip; TRUE where only Python gives it) of a configured field."""
            if not name:
                return "NULL", "false"
            return _json_cell_sql(j, _pointer(name)), _json_odd_sql(j, _pointer(name))

        text, odd_text = field(s.text_column)
        title, id_, url, label = (field(name) for name in (s.title_column, s.id_column, s.url_column,
                                                            s.label_column))
        at = "'/' || replace(replace(k, '~', '~0'), '/', '~1')"
        keys = f"list_filter(json_keys({j}), lambda k: k NOT IN ({used}) AND NOT starts_with(k, '_'))"
        entry = (f"CASE WHEN {_filled_sql(_json_cell_sql(j, at))} "
                 f"THEN to_json(k) || ': ' || {_json_value_sql(j, at)} END")
        meta = (f"'{{' || array_to_string(list_filter(list_transform({keys}, lambda k: {entry}),"
                f" lambda e: e IS NOT NULL), ', ') || '}}'")
        capital = (f"regexp_matches(k, '{_CAPITAL_ESCAPES}') OR (json_type({j}, {at}) = 'VARCHAR' "
                   f"AND regexp_matches(json_extract_string({j}, {at}), '{_CAPITAL_ESCAPES}'))")
        odd_meta = f"len(list_filter({keys}, lambda k: {_json_odd_sql(j, at)} OR {capital})) > 0"
        nul = _has_nul_sql(text, title[0])
        # Python's json.loads refuses what DuckDB's parser lets through: a trailing comma, a
        # NaN or infinity spelled otherwise than NaN/Infinity (any of them sends the file to
        # Python; within a string too, which costs only speed). A repeated key keeps its
        # last value in Python, its first here.
        lenient = f"regexp_matches({j}::VARCHAR, ',\\s*[\\]}}]|[:,\\[]\\s*[-+]?(?i:nan|inf|infinity)\\s*[,\\]}}]')"
        repeated = f"len(json_keys({j})) <> len(list_distinct(json_keys({j})))"
        rows = f"""SELECT CASE WHEN json_type({j}) <> 'OBJECT' THEN 'JSON line is not an object'
                           WHEN NOT json_exists({j}, {_pointer(s.text_column)})
                           THEN {_literal(f"no '{s.text_column}' field")} END AS problem,
                {text} AS raw_text, {title[0]} AS raw_title, {_cell_sql(id_[0])} AS external_id,
                {_cell_sql(url[0])} AS url, {_cell_sql(label[0])} AS gold_label,
                CASE WHEN json_type({j}) = 'OBJECT' THEN {meta} END AS meta,
                {lenient} OR (json_type({j}) = 'OBJECT' AND ({odd_text} OR {repeated})) AS odd_row,
                json_type({j}) = 'OBJECT'
                    AND ({title[1]} OR {id_[1]} OR {url[1]} OR {label[1]} OR {odd_meta} OR {nul}) AS odd
            FROM read_json_objects(?, format = 'newline_delimited', compression = 'none')"""
        return RecordScan((_records_sql(rows, s.max_text_chars, self._too_long),), (str(self.path),))

    def _parquet_scan(self) -> RecordScan | None:
        """read_parquet, each column's cells made text as Python makes them (by column type)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            schema = pq.ParquetFile(self.path).schema_arrow
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise SourceError(f"source {self.name}: cannot read {self.path.name}: {exc}") from None
        self._check_columns(schema.names)
        if len(set(schema.names)) < len(schema.names):
            return self._python("repeated column names")
        kinds = {}
        for column in schema:
            kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                kinds[column.name] = "text"
            elif pa.types.is_integer(kind):
                kinds[column.name] = "integer"
            elif pa.types.is_boolean(kind):
                kinds[column.name] = "boolean"
            elif pa.types.is_float32(kind) or pa.types.is_float64(kind):
                kinds[column.name] = "float"
            elif column.name in self._used or not column.name.startswith("_"):
                return self._python(f"column {column.name!r} of type {column.type} (Python writes it as text)")
        if any("\x00" in name for name in kinds):
            return self._python("a column name holds a NUL")
        s = self.settings

        def quoted(name: str) -> str:
            return '"' + name.replace('"', '""') + '"'

        def cell(name: str | None) -> str:
            """Python's str() of the cell (before _cell strips it), NULL for None and NaN."""
            if not name:
                return "NULL"
            column, kind = quoted(name), kinds[name]
            return {"text": column, "integer": f"{column}::VARCHAR",
                    "boolean": f"CASE WHEN {column} THEN 'True' WHEN NOT {column} THEN 'False' END",
                    "float": _float_cell_sql(column)}[kind]

        def value(name: str) -> str:
            """json.dumps of the cell's Python value, NULL where the key is left out of meta."""
            column, kind = quoted(name), kinds[name]
            return {"text": f"CASE WHEN {_filled_sql(column)} THEN to_json({column}) END",
                    "integer": f"{column}::VARCHAR",
                    "boolean": f"CASE WHEN {column} THEN 'true' WHEN NOT {column} THEN 'false' END",
                    "float": _float_value_sql(column)}[kind]

        extras = [name for name in schema.names if name not in self._used and not name.startswith("_")]
        odd = [_has_nul_sql(cell(s.text_column), cell(s.title_column))]
        odd += [f"coalesce(regexp_matches({quoted(name)}, '{_CAPITAL_ESCAPES}'), false)"
                for name in extras if kinds[name] == "text"]
        rows = f"""SELECT NULL AS problem, {cell(s.text_column)} AS raw_text, {cell(s.title_column)} AS raw_title,
                {_cell_sql(cell(s.id_column))} AS external_id, {_cell_sql(cell(s.url_column))} AS url,
                {_cell_sql(cell(s.label_column))} AS gold_label, {_meta_sql([(n, value(n)) for n in extras])} AS meta,
                false AS odd_row, {' OR '.join(odd)} AS odd
            FROM read_parquet(?)"""
        return RecordScan((_records_sql(rows, s.max_text_chars, self._too_long),), (str(self.path),))

    # -- rows to records ----------------------------------------------------------------
    def _record(self, row: dict[str, Any]) -> Record | None:
        s = self.settings
        if s.text_column not in row:
            self.report.reject(f"no '{s.text_column}' field")
            return None
        text = _cell(row.get(s.text_column))
        if self.format == "txt":
            # A text file: its stem is the title, its path the id, its folder the class.
            title, external_id, url, gold_label = row["_title"], row["_path"], None, row["_label"]
        else:
            title = _cell(row.get(s.title_column)) if s.title_column else None
            external_id = _cell(row.get(s.id_column)) if s.id_column else None
            url = _cell(row.get(s.url_column)) if s.url_column else None
            gold_label = _cell(row.get(s.label_column)) if s.label_column else None
        if text is None:
            self.report.reject("empty text")
            return None
        if len(text) > s.max_text_chars:
            self.report.reject(self._too_long)
            return None
        used = self._used
        meta = {
            str(k): (v if isinstance(v, (int, float, bool, str)) else str(v))
            for k, v in row.items()
            if k not in used and not str(k).startswith("_") and _cell(v) is not None
        }
        # Extra columns go to meta, so their bytes must be storable too. A surrogate is one
        # code point, so it is in the joined string exactly when it is in one of the parts.
        stored = [text, title or "", external_id or "", url or "", gold_label or "", *meta]
        stored.extend(v for v in meta.values() if isinstance(v, str))
        joined = "".join(stored)
        if has_undecodable(joined):
            self.report.reject(self._undecodable if _ESCAPED_BYTE.search(joined) else "lone surrogate in the text")
            return None
        return Record(text=text, title=title, url=url, external_id=external_id, gold_label=gold_label, meta=meta)

    def _ascii_rule(self, header: list[str]) -> Callable[[list[str]], Record | None] | None:
        """:meth:`_record` for a CSV row of ASCII cells, by column position: no byte of it can
        be undecodable and ``strip`` means the same, so the record is the same without a dict
        per row. None when a column name is not ASCII (every row then goes by ``_record``)."""
        if not all(name.isascii() for name in header):
            return None
        s = self.settings
        last = {name: i for i, name in enumerate(header)}  # a repeated name: its last cell, as in a dict
        text_i = last[s.text_column]
        title_i, id_i, url_i, label_i = (last[c] if c else None
                                         for c in (s.title_column, s.id_column, s.url_column, s.label_column))
        extras = [(name, i) for name, i in last.items() if name not in self._used and not name.startswith("_")]
        reject = self.report.reject
        max_chars, too_long = s.max_text_chars, self._too_long

        def record(cells: list[str]) -> Record | None:
            text = cells[text_i].strip()
            if not text:
                reject("empty text")
                return None
            if len(text) > max_chars:
                reject(too_long)
                return None
            return Record(
                text=text,
                title=None if title_i is None else cells[title_i].strip() or None,
                url=None if url_i is None else cells[url_i].strip() or None,
                external_id=None if id_i is None else cells[id_i].strip() or None,
                gold_label=None if label_i is None else cells[label_i].strip() or None,
                meta={name: cells[i] for name, i in extras if cells[i].strip()},
            )

        return record

    def _check_columns(self, columns: list[str]) -> None:
        s = self.settings
        for key in ("text_column", "title_column", "id_column", "url_column", "label_column"):
            column = getattr(s, key)
            if column and column not in columns:
                raise SourceError(
                    f"source {self.name}: {self.path.name} has no column '{column}' for {key} "
                    f"(columns: {', '.join(map(str, columns))}){self._delimiter_hint(columns)}"
                )

    def _delimiter_hint(self, columns: list[str]) -> str:
        """'; its header looks separated by ';', not ',': set delimiter = ";"' when a CSV
        header came out as one column holding another separator; else ''."""
        if self.format != "csv" or len(columns) != 1:
            return ""
        configured = self.settings.delimiter
        other = next((d for d in _DELIMITERS if d != configured and d in columns[0]), None)
        if other is None:
            return ""
        return f"; its header looks separated by {other!r}, not {configured!r}: set delimiter = {json.dumps(other)}"

    def _check_header_decodes(self, header: list[str]) -> None:
        if has_undecodable("".join(header)):
            raise SourceError(
                f"source {self.name}: the header of {self.path.name} is not {self.settings.encoding} text; "
                'set encoding on the source (e.g. "latin-1", "cp1252", "utf-16")'
            )

    # -- readers ------------------------------------------------------------------------
    @contextmanager
    def _csv_reader(self) -> Iterator[Any]:
        """Python's CSV reader over the file (csv.DictReader's rules, without its per-row cost)."""
        csv.field_size_limit(sys.maxsize)
        with open(self.path, newline="", encoding=self.settings.encoding, errors="surrogateescape") as handle:
            yield csv.reader(handle, delimiter=self.settings.delimiter)

    def _csv_header(self, reader) -> list[str] | None:
        """The first row's cells (a UTF-8 byte order mark dropped), checked: it decodes and has
        every configured column. None for an empty file."""
        header = next(reader, None)
        if header is None:
            return None
        if header and header[0].startswith("\ufeff"):  # a UTF-8 byte order mark (Excel's "CSV UTF-8")
            header[0] = header[0][1:]
        self._check_header_decodes(header)
        self._check_columns(header)
        return header

    def _csv_rows(self) -> Iterator[dict | Record | None]:
        """Rows as dicts (``_record`` makes them records), or already records (ASCII rows,
        :meth:`_ascii_rule`); None for a rejected row."""
        with self._csv_reader() as reader:
            try:
                header = self._csv_header(reader)
                if header is None:
                    return  # an empty file
                width = len(header)
                ascii_record = self._ascii_rule(header)
                for cells in reader:
                    if len(cells) == width:
                        if ascii_record is not None and "".join(cells).isascii():
                            yield ascii_record(cells)
                        else:
                            yield dict(zip(header, cells))
                    elif len(cells) > width:  # more cells than the header has columns
                        self.report.reject("malformed CSV row")
                        yield None
                    elif cells:  # fewer: the missing ones are None
                        yield dict(zip(header, cells + [None] * (width - len(cells))))
            except csv.Error as exc:
                raise SourceError(
                    f"source {self.name}: cannot parse {self.path.name} at line {reader.line_num}: {exc}"
                ) from None

    def _jsonl_rows(self) -> Iterator[dict | None]:
        with open(self.path, encoding=self.settings.encoding, errors="surrogateescape") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    self.report.reject("malformed JSON line")
                    yield None
                    continue
                if not isinstance(row, dict):
                    self.report.reject("JSON line is not an object")
                    yield None
                    continue
                yield row

    def _parquet_rows(self) -> Iterator[dict | None]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise SourceError(f"source {self.name}: cannot read {self.path.name}: {exc}") from None
        self._check_columns(parquet.schema_arrow.names)
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH):
            yield from batch.to_pylist()

    def _txt_files(self) -> Iterator[Path]:
        if not self.path.is_dir():
            raise SourceError(f"source {self.name}: format txt needs a folder, {self.path} is a file")
        return (p for p in sorted(self.path.rglob("*.txt")) if p.is_file())

    def _txt_rows(self) -> Iterator[dict | None]:
        s = self.settings
        for file in self._txt_files():
            relative = file.relative_to(self.path).as_posix()
            raw = file.read_bytes()
            try:
                text = raw.decode(s.encoding)
            except UnicodeDecodeError:
                self.report.reject(self._undecodable)
                yield None
                continue
            label = file.parent.name if s.label_from_folder and file.parent != self.path else None
            yield {
                s.text_column: text,
                "_title": file.stem,
                "_path": relative,
                "_label": label,
            }


# -- what a file's bytes say about reading them with DuckDB ---------------------------------
_IRREGULAR = "CSV quoting Python's reader reads otherwise (a quote not at a field's edge)"


class _CsvQuoting:
    """Looks at a CSV file's bytes, fed in order, for quoting both readers read alike.

    Regular quoting: every quote either opens a field (at the file's start, or right after
    a delimiter, a line break or another quote) or closes one (right before a delimiter, a
    line break, another quote or the file's end), and the last quoted field is closed. Which
    quote opens and which closes follows from their count so far. Python's csv module and
    DuckDB's reader then give the same cells; they differ on spaces around a quoted field, a
    quote inside an unquoted one, text after a closing quote and a quote never closed (DuckDB
    drops the rest of the file without a word). Bytes that do not decode, line breaks that
    change style mid-file and rows too long for DuckDB make its reader fail instead, and
    the ingest falls back then.
    """

    def __init__(self, delimiter: str, ascii_only: bool = False):
        import numpy as np

        self._np = np
        self._edge = np.zeros(256, dtype=bool)  # bytes next to a quote at a field's edge
        self._edge[[ord(delimiter), ord("\n"), ord("\r"), ord('"')]] = True
        self._ascii_only = ascii_only
        self._quotes = 0  # quotes seen: the next one opens a field when even
        self._last = ord("\n")  # the byte before the next block (the file's start is a field's)
        self._closed_last = False  # the last block ended with a closing quote, its next byte unseen
        self._why: str | None = None

    def feed(self, block: bytes) -> None:
        if self._why is not None or not block:
            return
        if self._ascii_only and not block.isascii():
            self._why = "bytes that are not ascii"
            return
        np = self._np
        data = np.frombuffer(block, dtype=np.uint8)
        if self._closed_last and not self._edge[data[0]]:
            self._why = _IRREGULAR
            return
        at = np.flatnonzero(data == ord('"'))
        if at.size:
            opens = (np.arange(self._quotes, self._quotes + at.size) & 1) == 0
            before = data[at - 1]
            if at[0] == 0:
                before[0] = self._last
            inside = at < data.size - 1
            after = data[at[inside] + 1]
            if (opens & ~self._edge[before]).any() or (~opens[inside] & ~self._edge[after]).any():
                self._why = _IRREGULAR
                return
            self._quotes += at.size
        self._closed_last = bool(at.size) and at[-1] == data.size - 1 and self._quotes % 2 == 0
        self._last = int(data[-1])

    def refusal(self) -> str | None:
        """Why DuckDB's reader would not read the file as Python's does, or None."""
        if self._why is None and self._quotes % 2:
            self._why = "a quoted CSV field that is never closed"
        return self._why


class _JsonlLines:
    """Looks at a JSONL file's bytes, fed in order, for lines both readers split alike.

    Python's text files also break lines at a lone ``\\r``, and json.loads refuses a line
    starting with a UTF-8 byte order mark that the ``utf-8`` codec keeps (``utf-8-sig``
    drops it); DuckDB's reader does neither.
    """

    def __init__(self, bom_is_data: bool, ascii_only: bool = False):
        self._bom_is_data = bom_is_data
        self._ascii_only = ascii_only
        self._start = True
        self._cr_last = False  # the last block ended with \r
        self._why: str | None = None

    def feed(self, block: bytes) -> None:
        if self._why is not None or not block:
            return
        if self._start and self._bom_is_data and block.startswith(codecs.BOM_UTF8):
            self._why = "a byte order mark Python's json reads as data"
        elif self._ascii_only and not block.isascii():
            self._why = "bytes that are not ascii"
        elif (self._cr_last and not block.startswith(b"\n")) or \
                block.count(b"\r") - block.count(b"\r\n") - block.endswith(b"\r") > 0:
            self._why = "line breaks of a lone \\r"
        self._start = False
        self._cr_last = block.endswith(b"\r")

    def refusal(self) -> str | None:
        return self._why
