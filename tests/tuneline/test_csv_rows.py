from __future__ import annotations

from tuneline import csv_rows
from tuneline.csv_rows import BrokenLine, CsvRow


def broken_lines(table: csv_rows.CsvTable) -> list[int]:
    return [item.line for item in table.items if isinstance(item, BrokenLine)]


def test_rows_carry_their_physical_lines_and_numbers() -> None:
    table = csv_rows.parse('user,assistant\r\nq1,"a1\r\nsecond line"\r\n\r\nq2,a2\rq3,"a, 3"\n')
    assert table.header == ["user", "assistant"] and table.header_lines == (1, 1)
    assert table.items == [
        CsvRow(1, 2, 3, ["q1", "a1\r\nsecond line"]),
        CsvRow(2, 5, 5, ["q2", "a2"]),  # line 4 is blank; a lone \r ends a line, as csv reads it
        CsvRow(3, 6, 6, ["q3", "a, 3"]),
    ]


def test_an_unclosed_quote_quarantines_each_line_it_swallowed() -> None:
    rows = "\n".join(f"q{i},a{i}" for i in range(3, 8))
    table = csv_rows.parse(f'user,assistant\nq1,a1\n"q2,a2\n{rows}\n')
    assert [item.number for item in table.items] == [1, 2, 3, 4, 5, 6, 7]
    assert isinstance(table.items[0], CsvRow)
    assert broken_lines(table) == [3, 4, 5, 6, 7, 8]
    first = table.items[1]
    assert isinstance(first, BrokenLine) and first.text == '"q2,a2'
    assert first.detail.startswith("line 3: a quote opened in the CSV row starting on line 3 is never closed")


def test_a_quote_closed_on_a_later_line_never_merges_rows() -> None:
    table = csv_rows.parse('user,assistant\nq1,a1\n"q2,a2\nq3",a3\nq4,a4\n')
    assert broken_lines(table) == [3, 4]
    assert [i.fields for i in table.items if isinstance(i, CsvRow)] == [["q1", "a1"], ["q4", "a4"]]
    assert "a stray quote merged rows" in table.items[1].detail  # type: ignore[union-attr]
    # A message with line breaks is one row: its lines do not each read as a row.
    kept = csv_rows.parse('id,user,assistant\n7,"Hello,\nmy parcel is late",Category: shipping\n')
    assert kept.items == [CsvRow(1, 2, 3, ["7", "Hello,\nmy parcel is late", "Category: shipping"])]


def test_a_quote_followed_by_text_breaks_only_its_row() -> None:
    table = csv_rows.parse('user,assistant\nq1,a1\n"q2"x,a2\nq3,a3\n')
    assert broken_lines(table) == [3]
    assert "breaks the quoting rules" in table.items[1].detail  # type: ignore[union-attr]
    assert table.items[2] == CsvRow(3, 4, 4, ["q3", "a3"])


def test_a_header_that_cannot_be_parsed_quarantines_every_line() -> None:
    table = csv_rows.parse('user,"assistant\nq1,a1\n\nq2,a2\n')
    assert table.header is None
    assert broken_lines(table) == [1, 2, 4]
    assert "the CSV header (lines 1-4) cannot be parsed" in table.items[0].detail  # type: ignore[union-attr]
    assert csv_rows.parse("").items == [] and csv_rows.parse("a,b\n").header == ["a", "b"]


def test_a_quote_inside_an_unquoted_field_breaks_its_row() -> None:
    # The tail of a row cut short by a broken quote reads as a row of its own: its bare quote gives it away.
    table = csv_rows.parse('id,user,assistant\n"T0,"q0 first line\nq0 second line","a0"\nT1,q1,a1\n')
    assert broken_lines(table) == [2, 3]
    assert "a quote inside a field that is not quoted" in table.items[1].detail  # type: ignore[union-attr]
    assert table.items[2] == CsvRow(3, 4, 4, ["T1", "q1", "a1"])
    # A quote written twice inside a quoted field is a quote character, on any line.
    kept = csv_rows.parse('user,assistant\nq,"He said ""hi"" to me\nand left."\n')
    assert kept.items == [CsvRow(1, 2, 3, ["q", 'He said "hi" to me\nand left.'])]
