"""Local files: CSV, JSONL, Parquet, or a folder of ``.txt`` files.

Large files are streamed (CSV and JSONL by row, Parquet by record batch), so a file
larger than memory ingests. Bytes that do not decode in the configured encoding are kept as
surrogates while reading and the row is then rejected as undecodable, naming the
``encoding`` key - one bad row never loses the rest of the file. A text longer than
``max_text_chars`` is rejected and counted too. What is wrong with the whole file (a
header that does not decode, a header split by another delimiter) stops the source with
one line naming the key to set.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

from alflow.config import FilesSource
from alflow.connectors.base import FetchReport, Progress, Record, SourceError, has_undecodable

_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_PARQUET_BATCH = 10_000
_TICK = 1000  # rows per progress call
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

    def fingerprint(self) -> str:
        """sha256 hex of what a fetch reads: the file's bytes, or each ``.txt`` file's path
        and bytes in order. Equal fingerprints (under equal settings) mean equal records."""
        digest = hashlib.sha256()
        files = [(self.path, "")] if self.format != "txt" else \
            [(file, file.relative_to(self.path).as_posix()) for file in self._txt_files()]
        for file, name in files:
            digest.update(f"{len(name)}:{name}:{file.stat().st_size}:".encode(errors="surrogateescape"))
            with open(file, "rb") as handle:
                hashlib.file_digest(handle, lambda: digest)
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
    def _csv_rows(self) -> Iterator[dict | Record | None]:
        """Rows as dicts (``_record`` makes them records), or already records (ASCII rows,
        :meth:`_ascii_rule`); None for a rejected row."""
        csv.field_size_limit(sys.maxsize)
        with open(self.path, newline="", encoding=self.settings.encoding, errors="surrogateescape") as handle:
            reader = csv.reader(handle, delimiter=self.settings.delimiter)
            try:
                header = next(reader, None)  # csv.DictReader's rules, without its per-row cost
                if header is None:
                    return  # an empty file
                if header and header[0].startswith("\ufeff"):  # a UTF-8 byte order mark (Excel's "CSV UTF-8")
                    header[0] = header[0][1:]
                self._check_header_decodes(header)
                self._check_columns(header)
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
