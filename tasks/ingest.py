"""Ingest: raw partitions (paths, globs, fsspec URLs; JSONL, CSV, Parquet) -> the record frame.

Guarantees:
- one row per input record, with the columns of tuneline/records.py and a stable `record_id`;
- a record that cannot be read is quarantined (`invalid_json`, `invalid_encoding`, `csv_mapping`) with
  its original text in `raw`: nothing stops the run and nothing is lost;
- `dt=YYYY-MM-DD` folders found by a glob or a folder walk are read when as_of - lookback_days < dt <=
  as_of; files outside any dt= folder, and files named exactly, are always read;
- rows come sorted by (partition, source, line), the order "first occurrence" means downstream.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import orjson
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneline import records
from tuneline.config import CsvMapping, Source
from tuneline.paths import PROJECT_ROOT, is_url, resolve

FileFormat = Literal["jsonl", "csv", "parquet"]

# Reasons this stage quarantines with (their precedence: data/README.md).
INVALID_JSON = "invalid_json"
INVALID_ENCODING = "invalid_encoding"
CSV_MAPPING = "csv_mapping"
REASONS = (INVALID_JSON, INVALID_ENCODING, CSV_MAPPING)

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
                "uri": s.uri,
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
        return full, full, explicit
    local = PurePosixPath(path)
    try:
        display = local.relative_to(PROJECT_ROOT.as_posix()).as_posix()
    except ValueError:
        display = local.as_posix()
    return path, display, explicit


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
        self.raw: list[str] = []
        self.example: list[Any] = []
        self.reason: list[str | None] = []
        self.detail: list[str | None] = []

    def add(
        self, file: InputFile, line: int, raw: str, example: Any, reason: str | None, detail: str | None
    ) -> None:
        self.record_id.append(records.make_record_id(file.display, file.partition, line, raw))
        self.source.append(file.display)
        self.partition.append(file.partition)
        self.line.append(line)
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
                records.SOURCE: self.source,
                records.PARTITION: self.partition,
                records.LINE: pd.array(self.line, dtype="int64"),
                # Object dtype shares the str objects already made; a string array would copy them all.
                records.RAW: pd.Series(self.raw, dtype=object),
                records.EXAMPLE: pd.Series(self.example, dtype=object),
                records.REASON: pd.Series(self.reason, dtype=object),
                records.DETAIL: pd.Series(self.detail, dtype=object),
                records.DUPLICATE_OF: pd.Series([None] * n, dtype=object),
            }
        )


def read_files(
    files: Iterable[InputFile], system_prompt: str | None, csv_fallbacks: Sequence[CsvMapping] = ()
) -> pd.DataFrame:
    """The record frame of these files, in the order given (select_files sorts them).

    `system_prompt` opens chat examples built from CSV/Parquet columns when no `system` column is
    mapped. `csv_fallbacks` are mappings tried, in order, on a tabular file that has none of its own.
    """
    columns = _Columns()
    # Every parsed example is a handful of containers that all stay alive: while millions are made,
    # the cyclic collector would walk the growing heap again and again (half the time of a large
    # read). Reference counting still frees what is dropped; collection resumes when the read ends.
    collecting = gc.isenabled()
    gc.disable()
    try:
        _read_all(files, columns, system_prompt, csv_fallbacks)
    finally:
        if collecting:
            gc.enable()
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
                file, 0, "", None, INVALID_ENCODING, f"the file could not be read: {exc} (fix or remove it)"
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


def _read_jsonl(handle: Iterable[bytes], file: InputFile, columns: _Columns) -> None:
    loads = orjson.loads
    lines = iter(handle)
    number = 0
    while True:
        try:
            line = next(lines)
        except StopIteration:
            break
        except (OSError, ValueError, EOFError) as exc:  # e.g. a truncated .gz: keep what was read
            columns.add(
                file,
                number + 1,
                "",
                None,
                INVALID_ENCODING,
                f"the file cannot be read after line {number}: {exc} (fix or re-export it)",
            )
            break
        number += 1
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        if number == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")
        if not line.strip():
            continue  # a blank line holds no record
        try:
            example = loads(line)
        except orjson.JSONDecodeError as exc:
            try:
                raw = line.decode("utf-8")
            except UnicodeDecodeError as bad:
                raw = line.decode("utf-8", "backslashreplace")
                columns.add(
                    file,
                    number,
                    raw,
                    None,
                    INVALID_ENCODING,
                    f"byte {bad.start} is not UTF-8 (re-encode the file as UTF-8)",
                )
            else:
                columns.add(
                    file,
                    number,
                    raw,
                    None,
                    INVALID_JSON,
                    f"not valid JSON: {exc.msg} at character {exc.pos} (fix the line's syntax)",
                )
            continue
        columns.add(file, number, line.decode("utf-8"), example, None, None)


def _read_csv(
    data: bytes,
    file: InputFile,
    columns: _Columns,
    system_prompt: str | None,
    fallbacks: Sequence[CsvMapping],
) -> None:
    # surrogateescape keeps bad bytes visible per row instead of failing the whole file.
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(io.StringIO(text, newline=""))
    number = 0
    try:
        header = next(reader, None)
        if header is None:
            return
        mapping, problem = _choose_mapping(header, file.csv_mapping, fallbacks, file.source_name)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            number += 1
            _add_row(file, columns, number, header, row, mapping, problem, system_prompt)
    except csv.Error as exc:
        number += 1
        columns.add(
            file,
            number,
            "",
            None,
            INVALID_ENCODING,
            f"CSV cannot be parsed after data row {number - 1}: {exc} (fix the quoting)",
        )


def _add_row(
    file: InputFile,
    columns: _Columns,
    number: int,
    header: list[str],
    row: list[str],
    mapping: CsvMapping | None,
    problem: str | None,
    system_prompt: str | None,
) -> None:
    values: dict[str, Any] = dict(zip(header, row, strict=False))
    if len(row) > len(header):
        values["__extra_fields__"] = row[len(header) :]
    raw = json.dumps(values, ensure_ascii=False)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as bad:
        # Back to the file's bytes, then decoded as the contract says: \xff for a bad byte.
        raw = raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        columns.add(
            file,
            number,
            raw,
            None,
            INVALID_ENCODING,
            f"a byte near character {bad.start} of the row is not UTF-8 (re-encode the file as UTF-8)",
        )
        return
    if mapping is None:
        columns.add(file, number, raw, None, CSV_MAPPING, problem)
        return
    missing = [c for c in _mapped_columns(mapping) if c not in values]
    if missing:
        columns.add(
            file,
            number,
            raw,
            None,
            CSV_MAPPING,
            f"row has {len(row)} fields, the header has {len(header)}: no value for {missing[0]!r} (fix the row)",
        )
        return
    columns.add(file, number, raw, _mapped_example(values, mapping, system_prompt), None, None)


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
            file, 0, "", None, INVALID_ENCODING, f"not a readable Parquet file: {exc} (fix or remove it)"
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
            columns.add(file, number, raw, _without_nulls(row), None, None)
        elif mapping is None:
            columns.add(file, number, raw, None, CSV_MAPPING, problem)
        else:
            columns.add(file, number, raw, _mapped_example(row, mapping, system_prompt), None, None)


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


@task(name="ingest", cache_policy=NO_CACHE, persist_result=False)
def ingest_task(
    files: list[InputFile], system_prompt: str | None, csv_fallbacks: list[CsvMapping]
) -> pd.DataFrame:
    """Prefect wrapper of read_files."""
    return read_files(files, system_prompt, csv_fallbacks)
