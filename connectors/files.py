"""Local files: CSV, JSONL, Parquet, or a folder of ``.txt`` files.

Large files are streamed (CSV and JSONL by row, Parquet by record batch), so a file
larger than memory ingests. Bytes that do not decode in the configured encoding are kept as
surrogates while reading and the row is then rejected as ``undecodable`` - one bad row
never loses the rest of the file.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from alflow.config import FilesSource
from alflow.connectors.base import FetchReport, Progress, Record, SourceError, has_undecodable

_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_PARQUET_BATCH = 10_000


def _cell(value: Any) -> str | None:
    """A table cell as text, or None when empty/missing."""
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

    def fetch(self, progress: Progress | None = None) -> Iterator[Record]:
        reader = {
            "csv": self._csv_rows,
            "jsonl": self._jsonl_rows,
            "parquet": self._parquet_rows,
            "txt": self._txt_rows,
        }[self.format]
        for row in reader():
            if progress:
                progress(1)
            if row is None:
                continue
            record = self._record(row)
            if record is not None:
                self.report.read += 1
                yield record

    # -- rows to records ----------------------------------------------------------------
    def _record(self, row: dict[str, Any]) -> Record | None:
        s = self.settings
        if s.text_column not in row:
            self.report.reject(f"no '{s.text_column}' field")
            return None
        text = _cell(row.get(s.text_column))
        if self.format == "txt":
            # A text file: its stem is the title, its path the id, its folder the class.
            fields = {"title": row["_title"], "external_id": row["_path"], "url": None,
                      "gold_label": row["_label"]}
        else:
            fields = {
                "title": _cell(row.get(s.title_column)) if s.title_column else None,
                "external_id": _cell(row.get(s.id_column)) if s.id_column else None,
                "url": _cell(row.get(s.url_column)) if s.url_column else None,
                "gold_label": _cell(row.get(s.label_column)) if s.label_column else None,
            }
        if text is None:
            self.report.reject("empty text")
            return None
        used = {s.text_column, s.title_column, s.id_column, s.url_column, s.label_column}
        meta = {
            str(k): (v if isinstance(v, (int, float, bool, str)) else str(v))
            for k, v in row.items()
            if k not in used and not str(k).startswith("_") and _cell(v) is not None
        }
        # Extra columns go to meta, so their bytes must be storable too.
        if (has_undecodable(text) or any(v and has_undecodable(v) for v in fields.values())
                or any(has_undecodable(k) or (isinstance(v, str) and has_undecodable(v))
                       for k, v in meta.items())):
            self.report.reject("undecodable bytes")
            return None
        return Record(text=text, meta=meta, **fields)

    def _check_columns(self, columns: list[str]) -> None:
        s = self.settings
        for key in ("text_column", "title_column", "id_column", "url_column", "label_column"):
            column = getattr(s, key)
            if column and column not in columns:
                raise SourceError(
                    f"source {self.name}: {self.path.name} has no column '{column}' for {key} "
                    f"(columns: {', '.join(map(str, columns))})"
                )

    # -- readers ------------------------------------------------------------------------
    def _csv_rows(self) -> Iterator[dict | None]:
        csv.field_size_limit(sys.maxsize)
        with open(self.path, newline="", encoding=self.settings.encoding, errors="surrogateescape") as handle:
            reader = csv.DictReader(handle)
            try:
                if reader.fieldnames is None:
                    return  # an empty file
                self._check_columns(list(reader.fieldnames))
                for row in reader:
                    if None in row:  # more cells than the header has columns
                        self.report.reject("malformed CSV row")
                        yield None
                        continue
                    yield row
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
                self.report.reject("undecodable bytes")
                yield None
                continue
            label = file.parent.name if s.label_from_folder and file.parent != self.path else None
            yield {
                s.text_column: text,
                "_title": file.stem,
                "_path": relative,
                "_label": label,
            }
