"""CSV text read into rows with every physical line accounted for (pure: no I/O, no pandas).

Python's csv module parses the quoting (RFC 4180, strictly); this module adds what it lacks: the
physical lines of each row, and what happens to the lines of a region whose quoting is broken. An
unclosed quote must not swallow the rest of a file into one record, and a quote closed on a later line
must not merge rows into one example.

Guarantees of `parse(text)`:
- physical lines are numbered from 1 as the csv module and editors count them (a line ends at \\r\\n,
  \\n or \\r); a blank line holds nothing;
- the first row is the header; every later row is a `CsvRow` with its fields, its physical lines
  (`first` < `last` when a quoted field holds a line break) and its data row number;
- a row whose quoting breaks the rules of RFC 4180 (a quote never closed, closed and followed by
  anything but a delimiter or the line's end, or inside a field that is not quoted, which the csv
  module would take as a character) makes a malformed region: each non-blank physical line from the row's
  first line to where the parser stopped is one `BrokenLine`, with its line number, and parsing resumes
  on the next line;
- a row whose quoted field spans lines is taken for rows merged by stray quotes, and each of its lines
  is a `BrokenLine`, when it shows what stray quotes leave (`_merged`): a row of another width than
  the header's; a quote inside the multi-line field at its edge or next to a line break or a delimiter;
  or, for a field other than the row's last, every non-blank line reading on its own as a row of the
  header's width (a quote counts only where it opens and closes a field on one line). A message with
  line breaks (the usual multi-line field) is one row, as CSV means it;
- what CSV cannot tell apart: a stray quote opening a row's last field and another closing a later
  row's last field, with no quote between them, read exactly as a last field holding line breaks
  (the demo data's agent replies), so such rows are read as one; every other stray or unclosed quote
  is caught. And a message that quotes a word at a line break or a comma, or (in another field than
  the last) whose every line holds a row's number of delimiters, is quarantined too, by line, with the
  same detail: a false alarm is counted and explained, where a merged example would be trained on;
- so a malformed region never yields a row;
- when the header itself cannot be parsed, every non-blank line of the file is a `BrokenLine`;
- rows and broken lines are numbered together, in file order, from 1 (the header not counted): a clean
  file's numbers are its data rows', and a broken region's lines each count as the row they were.
"""

from __future__ import annotations

import csv
import io
import re
import sys
from dataclasses import dataclass, field

DELIMITER = ","
QUOTE = '"'
# A quote at a field's edge or next to a delimiter or line break inside it: where a quote of the
# writer's stood before a stray quote turned it into a quote character.
_BOUNDARY_QUOTE = re.compile(r'^"|"$|"[,\r\n]|[,\r\n]"')


@dataclass(frozen=True, slots=True)
class CsvRow:
    number: int  # data row, 1-based, header not counted
    first: int  # first physical line
    last: int  # last physical line
    fields: list[str]


@dataclass(frozen=True, slots=True)
class BrokenLine:
    number: int  # counted with the rows
    line: int  # the physical line
    text: str  # the line, without its line ending
    detail: str  # why the region it belongs to cannot be read, and the fix


@dataclass
class CsvTable:
    header: list[str] | None  # None when the file holds no row (or its header cannot be parsed)
    header_lines: tuple[int, int] = (0, 0)  # first and last physical line of the header
    items: list[CsvRow | BrokenLine] = field(default_factory=list)


class _Lines:
    """An iterator over the physical lines that knows how many it has handed out."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.taken = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.taken >= len(self.lines):
            raise StopIteration
        self.taken += 1
        return self.lines[self.taken - 1]


def physical_lines(text: str) -> list[str]:
    """The text's lines with their endings, split where the csv module splits them."""
    return list(io.StringIO(text, newline=""))


def _stripped(line: str) -> str:
    return line.removesuffix("\n").removesuffix("\r")


def parse(text: str) -> CsvTable:
    """The header, rows and broken lines of CSV text (see the module's guarantees)."""
    csv.field_size_limit(sys.maxsize)  # a long message is a field like any other
    lines = physical_lines(text)
    feed = _Lines(lines)
    reader = csv.reader(feed, strict=True)
    table = CsvTable(header=None)
    number = 0

    def broken(start: int, end: int, detail: str) -> None:
        nonlocal number
        for index in range(start, end):
            content = _stripped(lines[index])
            if content.strip():
                number += 1
                table.items.append(BrokenLine(number, index + 1, content, f"line {index + 1}: {detail}"))

    while True:
        start = feed.taken
        try:
            row = next(reader)
        except StopIteration:
            return table
        except csv.Error as exc:
            end = feed.taken
            if table.header is None:
                broken(0, len(lines), _header_detail(start + 1, end, exc))
                return table
            broken(start, end, _quoting_detail(start + 1, end, exc))
            continue
        end = feed.taken
        if all(not line.strip() for line in lines[start:end]):
            continue  # a blank line holds no row (a quoted blank field is not a blank line)
        first = start + 1
        if table.header is None:
            table.header, table.header_lines = row, (first, end)
            continue
        if QUOTE in (text := "".join(lines[start:end])) and _bare_quote(text):
            broken(start, end, _bare_quote_detail(first, end))
            continue
        if end > first:
            why = _merged(row, lines[first - 1 : end], len(table.header))
            if why:
                broken(first - 1, end, _merged_detail(first, end, why))
                continue
        number += 1
        table.items.append(CsvRow(number, first, end, row))


def _merged(row: list[str], span: list[str], width: int) -> str | None:
    """Why a row whose quoted field spans lines is taken for rows merged by stray quotes, or None.

    A stray quote that opens a field is closed by the next quote that can close one, however many
    lines later. What that leaves: a row of another width than the header's (the merged lines' fields
    are its fields too); inside the field, a quote of the writer's turned into a quote character (a
    quote at the field's edge or next to a delimiter or a line break, where the writer's quotes open and
    close fields); or, when the field is not the row's last, lines that each read as a row of their own.
    """
    if len(row) != width:
        return f"the row they make has {len(row)} fields, the header {width}"
    multiline = [i for i, field in enumerate(row) if "\n" in field or "\r" in field]
    if any(_BOUNDARY_QUOTE.search(row[i]) for i in multiline):
        return "a quote inside the field stands where a field would open or close"
    # A last field that spans lines is what a message with line breaks looks like, whatever its lines
    # hold; any other field must be followed, on its last line, by the rest of its own row.
    if multiline[0] < width - 1 and all(
        _line_width(_stripped(line)) == width for line in span if line.strip()
    ):
        return "each of these lines reads as a row of its own"
    return None


def _bare_quote(text: str) -> bool:
    """True when a field of the row's text that is not quoted holds a quote (RFC 4180 forbids it: a
    writer quotes such a field and writes the quote twice). The csv module reads it as a character."""
    index = 0
    at_field_start = True
    while index < len(text):
        char = text[index]
        if at_field_start and char == QUOTE:
            closing = _closing_quote(text, index + 1, across_lines=True)
            index, at_field_start = (closing + 1 if closing is not None else len(text)), False
            continue
        if char == QUOTE:
            return True
        at_field_start = char in (DELIMITER, "\r", "\n")
        index += 1
    return False


def _line_width(line: str) -> int:
    """The fields of one physical line read on its own: a quote opening a field quotes it only when it
    closes on this line (before a delimiter or the line's end); any other quote is a character."""
    width = 1
    index = 0
    at_field_start = True
    while index < len(line):
        if at_field_start and line[index] == QUOTE:
            closing = _closing_quote(line, index + 1)
            if closing is not None:
                index, at_field_start = closing + 1, False
                continue
        at_field_start = line[index] == DELIMITER
        width += at_field_start
        index += 1
    return width


def _closing_quote(text: str, start: int, *, across_lines: bool = False) -> int | None:
    """Where the quoted field opened before `start` closes (before a delimiter or the line's end), or
    None; on one line unless `across_lines`."""
    while (found := text.find(QUOTE, start)) >= 0:
        after = text[found + 1 : found + 2]
        if after == QUOTE:  # a quote written twice is a quote character
            start = found + 2
            continue
        if after in ("", DELIMITER) or (across_lines and after in ("\r", "\n")):
            return found
        if not across_lines:
            return None
        start = found + 1
    return None


def _span(first: int, last: int) -> str:
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _header_detail(first: int, last: int, exc: csv.Error) -> str:
    return (
        f"the CSV header ({_span(first, last)}) cannot be parsed ({exc}), so no row of the "
        "file can be read (fix the header's quoting)"
    )


def _quoting_detail(first: int, last: int, exc: csv.Error) -> str:
    if "unexpected end of data" in str(exc):
        return (
            f"a quote opened in the CSV row starting on line {first} is never closed and "
            f'swallows lines {first}-{last} (close the quote, or write a quote inside a field twice: "")'
        )
    return (
        f"the CSV row on {_span(first, last)} breaks the quoting rules ({exc}); write a "
        'quote inside a field twice ("") or quote the whole field'
    )


def _bare_quote_detail(first: int, last: int) -> str:
    return (
        f"the CSV row on {_span(first, last)} has a quote inside a field that is not quoted, the mark of a "
        'stray quote or of a row cut from the one before (quote the field and write the quote twice: "")'
    )


def _merged_detail(first: int, last: int, why: str) -> str:
    return (
        f"a quoted field runs over lines {first}-{last} and {why}: a stray quote merged rows (remove "
        'the quote, or write it twice: "")'
    )
