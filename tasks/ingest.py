"""Ingest: raw partitions (paths, globs, fsspec URLs; JSONL, CSV, Parquet) -> the record frame.

Guarantees:
- one row per input record, with the columns of tuneline/records.py and a stable `record_id`;
- every non-blank physical line of a JSONL or CSV file is in exactly one record (`first_line`..
  `last_line`), or is a CSV header: nothing read is lost, and nothing read is counted twice;
- a record that cannot be read is quarantined (`invalid_json`, `invalid_encoding`, `invalid_csv`,
  `csv_mapping`) with its original text in `raw`: nothing stops the run. A CSV region whose quoting is
  broken is quarantined line by line, never read as one record or a merged example
  (tuneline/csv_rows.py);
- `dt=YYYY-MM-DD` folders found by a glob or a folder walk are read when as_of - lookback_days < dt <=
  as_of; files outside any dt= folder, and files named exactly, are always read;
- a URL's credentials (user:password@) never reach the `source` column;
- rows come sorted by (partition, source, line), the order "first occurrence" means downstream.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import orjson
import pandas as pd

from tuneline import csv_rows, heap, jsonl, records
from tuneline.config import CsvMapping, Source
from tuneline.paths import is_url, project_root, resolve

FileFormat = Literal["jsonl", "csv", "parquet"]

_EXTENSIONS: dict[str, FileFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_PARTITION = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})(?=/)")
_GLOB_MAGIC = re.compile(r"[*?\[]")
# Columns a CSV or Parquet file may carry without a configured mapping.
_DEFAULT_MAPPINGS = (
    CsvMapping(prompt="prompt", completion="completion"),
    CsvMapping(user="user", assistant="assistant"),
)


@dataclass(frozen=True, slots=True)
class InputFile:
    """One file to read, and how."""

    source_name: str  # the configured source (or "input" for --input)
    uri: str  # what fsspec opens: an absolute local path or a URL
    display: str  # the `source` column: project-relative path, absolute path, or URL
    partition: str  # "YYYY-MM-DD", or "" outside any dt= folder
    format: FileFormat
    csv_mapping: CsvMapping | None
    # A part of a JSONL file (`line_ranges`): its bytes start..stop, whose first line is line `first_line`
    # of the file. The whole file by default.
    start: int = 0
    stop: int | None = None
    first_line: int = 1

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


@dataclass(frozen=True)
class FileSelection:
    """The files a set of sources names inside the date window, and what was left out and why."""

    files: list[InputFile]
    outside_window: int = 0
    unknown_format: list[str] = field(default_factory=list)
    # Sources that name no file at all (a typo in a path, or an empty folder).
    empty_sources: list[str] = field(default_factory=list)

    @property
    def partitions(self) -> list[str]:
        return sorted({f.partition for f in self.files if f.partition})

    def describe_sources(self, sources: Sequence[Source]) -> list[dict[str, Any]]:
        """Per configured source: its uri and the files read from it (for the manifest)."""
        return [
            {
                "name": s.name,
                "uri": without_credentials(s.uri),
                "files": [f.display for f in self.files if f.source_name == s.name],
            }
            for s in sources
        ]


def window(as_of: date, lookback_days: int) -> tuple[date, date]:
    """The partitions read: dt in (start, end]."""
    return as_of - timedelta(days=lookback_days), as_of


def select_files(sources: Sequence[Source], as_of: date, lookback_days: int) -> FileSelection:
    """Expand every source into files, keep the ones in the date window, sorted by (partition, source).

    A file named by two sources is read once, for the first source that names it.
    """
    start, end = window(as_of, lookback_days)
    chosen: dict[str, InputFile] = {}
    outside = 0
    unknown: list[str] = []
    empty: list[str] = []
    for source in sources:
        found = _expand(source.uri)
        if not found:
            empty.append(source.name)
        for uri, display, explicit in found:
            partition = _partition_of(display)
            if partition and not explicit and not (start < date.fromisoformat(partition) <= end):
                outside += 1
                continue
            file_format = _format_of(display, source.format, explicit)
            if file_format is None:
                unknown.append(display)
                continue
            chosen.setdefault(
                display, InputFile(source.name, uri, display, partition, file_format, source.csv_mapping)
            )
    files = sorted(chosen.values(), key=lambda f: (f.partition, f.display))
    return FileSelection(files, outside, sorted(set(unknown)), empty)


def _expand(uri: str) -> list[tuple[str, str, bool]]:
    """(uri to open, display name, named exactly) for every file a path, glob, folder or URL names."""
    if is_url(uri):
        fs, path = fsspec.core.url_to_fs(uri)
    else:
        fs, path = fsspec.core.url_to_fs(str(resolve(uri)))
    if _GLOB_MAGIC.search(path):
        matches = fs.glob(path)
        explicit = False
    elif fs.isdir(path):
        matches = [path]
        explicit = False
    elif fs.isfile(path):
        return [_named(fs, path, uri, explicit=True)]
    else:
        return []
    found: list[tuple[str, str, bool]] = []
    for match in matches:
        paths = fs.find(match) if fs.isdir(match) else [match]
        for p in paths:
            # Hidden files and markers such as _SUCCESS are not data.
            if not PurePosixPath(p).name.startswith((".", "_")):
                found.append(_named(fs, p, uri, explicit=explicit))
    return found


def _named(fs: Any, path: str, uri: str, *, explicit: bool) -> tuple[str, str, bool]:
    if is_url(uri):
        full = fs.unstrip_protocol(path)
        return full, without_credentials(full), explicit
    local = PurePosixPath(path)
    try:
        display = local.relative_to(project_root().as_posix()).as_posix()
    except ValueError:
        display = local.as_posix()
    return path, display, explicit


_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", re.IGNORECASE)


def without_credentials(url: str) -> str:
    """The URL with any user:password@ removed: what a person, a log or an artifact may see."""
    return _USERINFO.sub(r"\1", url)


def jsonl_file(uri: str, source_name: str) -> InputFile:
    """One JSONL file named exactly (the general corpus), to read with `read_files`."""
    return InputFile(source_name, jsonl.location(uri), without_credentials(uri), "", "jsonl", None)


def _partition_of(display: str) -> str:
    matches = _PARTITION.findall(display)
    if not matches:
        return ""
    try:
        date.fromisoformat(matches[-1])
    except ValueError:
        return ""  # dt=2025-02-30 is not a day: the file is read as unpartitioned
    return str(matches[-1])


def _format_of(display: str, configured: str, explicit: bool) -> FileFormat | None:
    if configured != "auto":
        return configured  # type: ignore[return-value]
    name = display.lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    found = _EXTENSIONS.get(PurePosixPath(name).suffix)
    # A file named exactly with an unknown extension is taken to be JSONL; in a folder it is skipped.
    return found or ("jsonl" if explicit else None)


class _Columns:
    """The record frame's columns as Python lists: one DataFrame is built at the end (fast)."""

    def __init__(self) -> None:
        self.record_id: list[str] = []
        self.source: list[str] = []
        self.partition: list[str] = []
        self.line: list[int] = []
        self.first_line: list[int] = []
        self.last_line: list[int] = []
        self.raw: list[str] = []
        self.example: list[Any] = []
        self.reason: list[str | None] = []
        self.detail: list[str | None] = []

    def add(
        self,
        file: InputFile,
        line: int,
        lines: tuple[int, int],
        raw: str,
        example: Any,
        reason: str | None,
        detail: str | None,
    ) -> None:
        """One record: `line` is its number in the file, `lines` the physical lines that hold it."""
        self.record_id.append(records.make_record_id(file.display, file.partition, line, raw))
        self.source.append(file.display)
        self.partition.append(file.partition)
        self.line.append(line)
        self.first_line.append(lines[0])
        self.last_line.append(lines[1])
        self.raw.append(raw)
        self.example.append(example)
        self.reason.append(reason)
        self.detail.append(detail)

    def frame(self) -> pd.DataFrame:
        n = len(self.record_id)
        if not n:
            return records.empty_frame()
        return pd.DataFrame(
            {
                records.RECORD_ID: self.record_id,
                records.SOURCE: records.labels(self.source),
                records.PARTITION: records.labels(self.partition),
                records.LINE: pd.array(self.line, dtype="int64"),
                records.FIRST_LINE: pd.array(self.first_line, dtype="int64"),
                records.LAST_LINE: pd.array(self.last_line, dtype="int64"),
                # Object dtype shares the str objects already made; a string array would copy them all.
                records.RAW: pd.Series(self.raw, dtype=object),
                records.EXAMPLE: pd.Series(self.example, dtype=object),
                records.REASON: pd.Series(self.reason, dtype=object),
                records.DETAIL: pd.Series(self.detail, dtype=object),
                records.DUPLICATE_OF: pd.Series([None] * n, dtype=object),
            }
        )


NO_LINES = (0, 0)  # a Parquet row, or a file that cannot be read: no physical line holds it


def read_files(
    files: Iterable[InputFile], system_prompt: str | None, csv_fallbacks: Sequence[CsvMapping] = ()
) -> pd.DataFrame:
    """The record frame of these files, in the order given (select_files sorts them).

    `system_prompt` opens chat examples built from CSV/Parquet columns when no `system` column is
    mapped. `csv_fallbacks` are mappings tried, in order, on a tabular file that has none of its own.
    """
    columns = _Columns()
    # Every parsed example is a handful of containers that all stay alive (tuneline/heap.py).
    with heap.collector_paused():
        _read_all(files, columns, system_prompt, csv_fallbacks)
    return columns.frame()


def _read_all(
    files: Iterable[InputFile],
    columns: _Columns,
    system_prompt: str | None,
    csv_fallbacks: Sequence[CsvMapping],
) -> None:
    for file in files:
        try:
            with fsspec.open(file.uri, "rb", compression="infer") as handle:
                if file.format == "jsonl":
                    # Line by line: the file's bytes and its split lines are never all in memory at once.
                    _read_jsonl(handle, file, columns)
                    continue
                data = handle.read()
        except (OSError, ValueError, EOFError) as exc:
            columns.add(
                file,
                0,
                NO_LINES,
                "",
                None,
                records.INVALID_ENCODING,
                f"the file could not be read: {exc} (fix or remove it)",
            )
            continue
        if file.format == "csv":
            _read_csv(data, file, columns, system_prompt, csv_fallbacks)
        else:
            _read_parquet(data, file, columns, system_prompt, csv_fallbacks)


def ingest(
    sources: Sequence[Source],
    *,
    as_of: date,
    lookback_days: int,
    system_prompt: str | None,
    csv_fallbacks: Sequence[CsvMapping] = (),
) -> pd.DataFrame:
    """select_files + read_files: every record of the sources in the date window."""
    return read_files(select_files(sources, as_of, lookback_days).files, system_prompt, csv_fallbacks)


def _read_jsonl(handle: Any, file: InputFile, columns: _Columns) -> None:
    add = columns.add
    lines: Iterable[bytes] = handle
    if not file.whole:
        handle.seek(file.start)
        size = None if file.stop is None else file.stop - file.start
        lines = io.BytesIO(handle.read(size))
    for number, text, value, reason, detail in jsonl.iter_lines(lines, file.first_line):
        add(file, number, (number, number), text, value, reason, detail)


# Bytes read at a time while a file's lines are counted for line_ranges.
_SCAN_BYTES = 1 << 24


def line_ranges(file: InputFile, block_bytes: int) -> list[InputFile]:
    """An uncompressed JSONL file larger than `block_bytes` as consecutive parts of about that size, each
    ending at a line end and knowing the number of its first line: read one after the other, the parts
    give the records of the whole file, with the same line numbers (and so the same record ids). Any
    other file, or one that cannot be read, is returned whole (reading it then reports the problem)."""
    if file.format != "jsonl" or not file.whole or file.display.lower().endswith(_COMPRESSIONS):
        return [file]
    try:
        fs, path = fsspec.core.url_to_fs(file.uri)
        if int(fs.size(path) or 0) <= block_bytes:
            return [file]
        parts: list[InputFile] = []
        with fs.open(path, "rb") as handle:
            start, first_line, position, lines = 0, 1, 0, 0
            while chunk := handle.read(_SCAN_BYTES):
                offset = 0
                while True:
                    # The next cut: the first line end at or after start + block_bytes.
                    cut = start + block_bytes - position
                    if cut >= len(chunk):
                        break
                    end = chunk.find(b"\n", max(cut, offset))
                    if end < 0:
                        break
                    lines += chunk.count(b"\n", offset, end + 1)
                    offset = end + 1
                    stop = position + offset
                    parts.append(replace(file, start=start, stop=stop, first_line=first_line))
                    start, first_line = stop, lines + 1
                lines += chunk.count(b"\n", offset)
                position += len(chunk)
        if start < position:
            parts.append(replace(file, start=start, stop=None, first_line=first_line))
        return parts or [file]
    except (OSError, ValueError):
        return [file]


def _read_csv(
    data: bytes,
    file: InputFile,
    columns: _Columns,
    system_prompt: str | None,
    fallbacks: Sequence[CsvMapping],
) -> None:
    # surrogateescape keeps bad bytes visible per row instead of failing the whole file.
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    table = csv_rows.parse(text)
    mapping, problem = (None, None)
    if table.header is not None:
        mapping, problem = _choose_mapping(table.header, file.csv_mapping, fallbacks, file.source_name)
    for item in table.items:
        if isinstance(item, csv_rows.BrokenLine):
            raw = _escaped(item.text)
            columns.add(
                file, item.number, (item.line, item.line), raw, None, records.INVALID_CSV, item.detail
            )
            continue
        assert table.header is not None  # rows come after the header
        _add_row(file, columns, item, table.header, mapping, problem, system_prompt)


def _escaped(text: str) -> str:
    """Text decoded with surrogateescape, back to the file's bytes and decoded as the contract says:
    \\xff for a byte that is not UTF-8."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _add_row(
    file: InputFile,
    columns: _Columns,
    row: csv_rows.CsvRow,
    header: list[str],
    mapping: CsvMapping | None,
    problem: str | None,
    system_prompt: str | None,
) -> None:
    values: dict[str, Any] = dict(zip(header, row.fields, strict=False))
    if len(row.fields) > len(header):
        values["__extra_fields__"] = row.fields[len(header) :]
    raw = json.dumps(values, ensure_ascii=False)
    lines = (row.first, row.last)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as bad:
        columns.add(
            file,
            row.number,
            lines,
            _escaped(raw),
            None,
            records.INVALID_ENCODING,
            f"a byte near character {bad.start} of the row is not UTF-8 (re-encode the file as UTF-8)",
        )
        return
    if mapping is None:
        columns.add(file, row.number, lines, raw, None, records.CSV_MAPPING, problem)
        return
    if len(row.fields) > len(header):
        columns.add(
            file,
            row.number,
            lines,
            raw,
            None,
            records.CSV_MAPPING,
            f"row has {len(row.fields)} fields, the header has {len(header)}: a delimiter or a quote out of "
            "place shifts its values (fix the row)",
        )
        return
    missing = [c for c in _mapped_columns(mapping) if c not in values]
    if missing:
        columns.add(
            file,
            row.number,
            lines,
            raw,
            None,
            records.CSV_MAPPING,
            f"row has {len(row.fields)} fields, the header has {len(header)}: no value for {missing[0]!r} "
            "(fix the row)",
        )
        return
    columns.add(file, row.number, lines, raw, _mapped_example(values, mapping, system_prompt), None, None)


def _read_parquet(
    data: bytes,
    file: InputFile,
    columns: _Columns,
    system_prompt: str | None,
    fallbacks: Sequence[CsvMapping],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        columns.add(
            file,
            0,
            NO_LINES,
            "",
            None,
            records.INVALID_ENCODING,
            f"not a readable Parquet file: {exc} (fix or remove it)",
        )
        return
    names = table.column_names
    # Parquet holding training lines as nested columns: each row is the example itself.
    if file.csv_mapping is None and {"messages", "prompt", "input"} & set(names):
        mapping, problem = None, None
        as_examples = True
    else:
        mapping, problem = _choose_mapping(names, file.csv_mapping, fallbacks, file.source_name)
        as_examples = False
    for number, row in enumerate(table.to_pylist(), start=1):
        raw = orjson.dumps(row, default=str).decode("utf-8")
        if as_examples:
            columns.add(file, number, NO_LINES, raw, _without_nulls(row), None, None)
        elif mapping is None:
            columns.add(file, number, NO_LINES, raw, None, records.CSV_MAPPING, problem)
        else:
            example = _mapped_example(row, mapping, system_prompt)
            columns.add(file, number, NO_LINES, raw, example, None, None)


def _without_nulls(value: Any) -> Any:
    # Parquet structs give every row every field; a null field is an absent key in a training line.
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _mapped_columns(mapping: CsvMapping) -> list[str]:
    names = [mapping.prompt, mapping.completion, mapping.user, mapping.assistant, mapping.system]
    return [n for n in names if n is not None]


def _choose_mapping(
    header: Sequence[str], configured: CsvMapping | None, fallbacks: Sequence[CsvMapping], source_name: str
) -> tuple[CsvMapping | None, str | None]:
    """The mapping for a tabular file, or None and why every row of it is quarantined."""
    present = set(header)
    if configured is not None:
        missing = [c for c in _mapped_columns(configured) if c not in present]
        if missing:
            return None, (
                f"the file lacks the mapped column {missing[0]!r} (columns: {', '.join(header)}); "
                f"fix data.sources[{source_name}].csv_mapping"
            )
        return configured, None
    for candidate in (*fallbacks, *_DEFAULT_MAPPINGS):
        if all(c in present for c in _mapped_columns(candidate)):
            return candidate, None
    return None, (
        f"no column mapping fits the columns {', '.join(header)}; set data.sources[].csv_mapping "
        "(prompt+completion or user+assistant)"
    )


def _mapped_example(values: dict[str, Any], mapping: CsvMapping, system_prompt: str | None) -> dict[str, Any]:
    if mapping.prompt is not None and mapping.completion is not None:
        return {"prompt": values[mapping.prompt], "completion": values[mapping.completion]}
    assert mapping.user is not None and mapping.assistant is not None  # CsvMapping guarantees one shape
    messages: list[dict[str, Any]] = []
    system = values.get(mapping.system) if mapping.system is not None else None
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    elif system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": values[mapping.user]})
    messages.append({"role": "assistant", "content": values[mapping.assistant]})
    return {"messages": messages}
