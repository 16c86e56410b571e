"""JSONL files, read one way everywhere: raw partitions, the eval and canary sets, the general corpus and
prepared training files.

Guarantees of `read_lines` (and `iter_lines`, on a handle already open):
- a file is named by a path (a relative path is taken from the project root) or any fsspec URL (s3://,
  gs://, memory://, ...); compression is inferred from the name (.gz, .bz2, .xz, .zst, ...);
- it is read one line at a time: its bytes are never all in memory at once;
- lines are numbered as in the file: 1-based, a line ends at \\n (a trailing \\r is dropped), blank
  lines count and are skipped; a UTF-8 byte-order mark opening the file is ignored;
- every other line gives one `JsonLine`: its parsed JSON value, or the rule it breaks
  (`invalid_encoding`, `invalid_json`) with a detail that names the fix; its text either way (bytes that
  are not UTF-8 as \\xNN), so nothing read is ever lost;
- a file cut short (a truncated .gz) gives an `invalid_encoding` line after the last line read.

Lines are parsed with orjson, as the data plane writes them: NaN, Infinity and nesting deeper than
formats.MAX_JSON_DEPTH levels (the server's bound too) are not JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec
import orjson

from tuneline import records
from tuneline.formats import MAX_JSON_DEPTH, json_depth_exceeds, jsonl_line
from tuneline.paths import is_url, resolve


class JsonLine(NamedTuple):
    """One non-blank line of a JSONL file."""

    number: int  # 1-based, as in the file
    text: str  # the line (without its line ending); bytes that are not UTF-8 as \xNN
    value: Any  # the parsed JSON value; None when `reason` is set
    reason: str | None  # records.INVALID_JSON or records.INVALID_ENCODING; None for a JSON line
    detail: str | None  # what is wrong and the fix, when `reason` is set


@dataclass(frozen=True)
class JsonlSet:
    """A whole JSONL file: its JSON lines and the lines that are not JSON."""

    uri: str
    lines: list[JsonLine] = field(default_factory=list)
    problems: list[JsonLine] = field(default_factory=list)

    @property
    def values(self) -> list[Any]:
        return [line.value for line in self.lines]


def location(uri: str) -> str:
    """What fsspec opens for a configured path or URL: URLs as they are, paths from the project root."""
    return uri if is_url(uri) else str(resolve(uri))


def name_of(uri: str) -> str:
    """The file's name, for messages ("line 3 of eval.jsonl")."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def exists(uri: str) -> bool:
    """True when the path or URL names a file."""
    fs, path = fsspec.core.url_to_fs(location(uri))
    try:
        return bool(fs.isfile(path))
    except OSError:
        return False


def read_lines(uri: str) -> Iterator[JsonLine]:
    """The non-blank lines of a JSONL file, one at a time (see the module's guarantees). Raises
    FileNotFoundError when there is no such file, OSError when it cannot be opened."""
    with fsspec.open(location(uri), "rb", compression="infer") as handle:
        yield from iter_lines(handle)


def read_set(uri: str) -> JsonlSet:
    """A whole JSONL file, its JSON lines apart from the lines that are not JSON."""
    found = JsonlSet(uri)
    for line in read_lines(uri):
        (found.problems if line.reason else found.lines).append(line)
    return found


def iter_lines(handle: Iterable[bytes], first: int = 1) -> Iterator[JsonLine]:
    """`read_lines` on an open binary handle (or any iterable of \\n-terminated byte lines), whose first
    line is line `first` of its file (a part of a file read on its own)."""
    loads = orjson.loads
    # tuple.__new__ makes the same JsonLine three times faster than its constructor: this loop runs
    # once per line of every raw partition.
    new = tuple.__new__
    lines = iter(handle)
    number = first - 1
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except (OSError, ValueError, EOFError) as exc:  # e.g. a truncated .gz: keep what was read
            yield JsonLine(
                number + 1,
                "",
                None,
                records.INVALID_ENCODING,
                f"the file cannot be read after line {number}: {exc} (fix or re-export it)",
            )
            return
        number += 1
        line = jsonl_line(line, number)  # the server's check of an uploaded file reads lines the same way
        if not line.strip():
            continue  # a blank line holds no record
        try:
            value = loads(line)
        except orjson.JSONDecodeError as exc:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as bad:
                yield JsonLine(
                    number,
                    line.decode("utf-8", "backslashreplace"),
                    None,
                    records.INVALID_ENCODING,
                    f"byte {bad.start} is not UTF-8 (re-encode the file as UTF-8)",
                )
            else:
                yield JsonLine(
                    number,
                    text,
                    None,
                    records.INVALID_JSON,
                    f"not valid JSON: {exc.msg} at character {exc.pos} (fix the line's syntax)",
                )
            continue
        # The cheap count first: a chat line holds a handful of brackets; only a line with more than the
        # depth bound is walked. Deeper JSON is refused here, where the server refuses it too: orjson
        # parses up to 1024 levels but writes only 255, so it would break export.
        if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH and json_depth_exceeds(value, MAX_JSON_DEPTH):
            yield JsonLine(
                number,
                line.decode("utf-8"),
                None,
                records.INVALID_JSON,
                f"the line's JSON nests deeper than {MAX_JSON_DEPTH} levels (flatten it)",
            )
            continue
        yield new(JsonLine, (number, line.decode("utf-8"), value, None, None))
