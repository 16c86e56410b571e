"""What the server writes to its log of text a client chose (a path, a file name): control characters
escaped, so a request can neither forge log lines (a newline), hide text (a carriage return, a NUL)
nor make the log unreadable to tools that stop at a NUL byte."""

from __future__ import annotations

import re

# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text: str, limit: int = 300) -> str:
    """`text` with every control character written as an escape (`\\n`, `\\x00`...), cut at `limit`."""
    escaped = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None
