"""check_training_file, the check of an uploaded training file (server) and of export's output:
never raises whatever the bytes, names the line of what it refuses, and reads a byte order mark as
ingest does (one rule, tuneline.formats.jsonl_line)."""

from __future__ import annotations

import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tuneline.formats import MAX_JSON_DEPTH, bounded_lines, check_training_file, jsonl_line

GOOD = json.dumps(
    {
        "messages": [
            {"role": "user", "content": "Where is my parcel?"},
            {"role": "assistant", "content": "On its way."},
        ]
    }
).encode()


def test_a_byte_order_mark_is_read_on_the_first_line_only() -> None:
    assert check_training_file([b"\xef\xbb\xbf" + GOOD, *[GOOD] * 9]) == (10, None)
    _, issue = check_training_file([GOOD, b"\xef\xbb\xbf" + GOOD])
    assert issue is not None and (issue.line, issue.key) == (2, "invalid_json")
    assert (
        jsonl_line(b"\xef\xbb\xbf{}\r\n", 1) == b"{}"
        and jsonl_line(b"\xef\xbb\xbf{}\n", 2) == b"\xef\xbb\xbf{}"
    )


def test_deep_and_long_lines_are_refused_with_their_line() -> None:
    for depth in (MAX_JSON_DEPTH + 1, 10_000):
        _, issue = check_training_file([GOOD, b"[" * depth + b"]" * depth])
        assert issue is not None and (issue.line, issue.key) == (2, "too_deep")
    handle = io.BytesIO(GOOD + b"\n" + b'{"x": "' + b"y" * 5000 + b'"}\n' + GOOD + b"\n")
    lines = list(bounded_lines(handle, 1000))
    assert [len(line) for line in lines] == [
        len(GOOD) + 1,
        1001,
        len(GOOD) + 1,
    ]  # the long line cut, not held
    _, issue = check_training_file(lines, min_examples=1, max_line_bytes=1000)
    assert issue is not None and (issue.line, issue.key) == (2, "too_large")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.binary(max_size=80)
        | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode())
        | st.integers(min_value=0, max_value=3000).map(
            lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}"
        ),
        max_size=6,
    )
)
def test_no_content_makes_the_check_raise(lines: list[bytes]) -> None:
    count, issue = check_training_file(lines, min_examples=1)
    assert count >= 0 and (issue is None or issue.key)
