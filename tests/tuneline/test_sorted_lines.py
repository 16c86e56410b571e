"""The export's external sort: lines added in any order come back in (key, line) order, a key range
at a time, whatever the number of ranges and batches."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
from pathlib import Path

import pytest

from tuneline import sorted_lines
from tuneline.sorted_lines import SortedLines
from tuneline.text_store import NoRoomForTexts


def entries(count: int, seed: int) -> list[tuple[bytes, bytes]]:
    """(key, line) pairs with shared keys (ties broken by the line) and repeated lines."""
    rng = random.Random(seed)
    keys = [hashlib.sha256(str(rng.randrange(count // 3)).encode()).digest() for _ in range(count)]
    return [
        (key, f'{{"n": {rng.randrange(count // 2)}, "x": "{"y" * rng.randrange(40)}"}}\n'.encode())
        for key in keys
    ]


@pytest.mark.parametrize("range_bytes", [1 << 30, 2000, 1])
def test_lines_come_back_in_key_then_line_order(monkeypatch: pytest.MonkeyPatch, range_bytes: int) -> None:
    monkeypatch.setattr(sorted_lines, "_RANGE_BYTES", range_bytes)
    pairs = entries(3000, seed=range_bytes)
    lines = SortedLines(sum(len(line) for _, line in pairs))
    assert len(lines._segments) == (1 if range_bytes > 10**6 else (64 if range_bytes == 2000 else 4096))
    for start in range(0, len(pairs), 701):  # batches, each spread over the ranges
        batch = pairs[start : start + 701]
        lines.add([key for key, _ in batch], [line for _, line in batch])
    fed = hashlib.sha256()
    written = lines.write_sorted(fed)
    expected = [line for _, line in sorted(pairs)]
    body = b"".join(expected)
    assert written.read_lines() == expected
    assert (written.lines, written.size) == (len(expected), len(body))
    assert written.sha256 == fed.hexdigest() == hashlib.sha256(body).hexdigest()
    copied = io.BytesIO()
    monkeypatch.setattr(sorted_lines, "_RANGE_BYTES", 4096)  # the copy, a few kB at a time
    written.copy_to(copied)
    assert copied.getvalue() == body
    written.close()


def test_nothing_added_is_an_empty_file() -> None:
    written = SortedLines(0).write_sorted()
    assert written.read_lines() == [] and (written.lines, written.size) == (0, 0)
    assert written.sha256 == hashlib.sha256(b"").hexdigest()


def test_no_room_for_the_lines_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    lines = SortedLines(100, directory=str(missing))
    with pytest.raises(
        NoRoomForTexts, match=f"could not write the sorted training lines to {missing}.*TMPDIR"
    ):
        lines.add([hashlib.sha256(b"a").digest()], [b"{}\n"])


def test_lines_in_order_are_written_as_they_come_and_hashed_as_one_body() -> None:
    chunks = [
        [f'{{"n":{i},"text":"{"é" * (i % 7)}"}}\n'.encode() for i in range(start, start + 5)]
        for start in (0, 5)
    ]
    chunks.insert(1, [])  # an empty chunk adds nothing
    body = b"".join(b"".join(chunk) for chunk in chunks)
    written = sorted_lines.lines_in_order(iter(chunks))
    assert (written.lines, written.size, written.sha256) == (10, len(body), hashlib.sha256(body).hexdigest())
    assert b"".join(written.read_lines()) == body
    out = io.BytesIO()
    written.copy_to(out)
    assert out.getvalue() == body
    written.close()
    empty = sorted_lines.lines_in_order([])
    assert (empty.lines, empty.size, empty.read_lines()) == (0, 0, [])
    assert empty.sha256 == hashlib.sha256(b"").hexdigest()


def test_no_room_for_lines_in_order_is_one_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(NoRoomForTexts, match=f"could not write the quarantine's lines to {missing}.*TMPDIR"):
        sorted_lines.lines_in_order([[b"{}\n"]], directory=str(missing), what="the quarantine's lines")


@pytest.mark.parametrize("kernel", ["copies", "cannot copy"])
def test_a_sorted_file_is_copied_into_a_file_whole(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kernel: str
) -> None:
    """Into a real file the kernel copies the bytes (copy_file_range); where it cannot (another file
    system on an older kernel), they are copied through the process, after what the kernel did copy."""
    pairs = entries(2000, seed=7)
    lines = SortedLines(sum(len(line) for _, line in pairs))
    lines.add([key for key, _ in pairs], [line for _, line in pairs])
    written = lines.write_sorted()
    body = b"".join(line for _, line in sorted(pairs))
    if kernel == "cannot copy":
        real = os.copy_file_range
        calls = []

        def refuses_after_one_part(
            source: int, target: int, count: int, offset_src: int, offset_dst: int
        ) -> int:
            calls.append(offset_src)
            if len(calls) > 1:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(source, target, min(count, 1000), offset_src, offset_dst)

        monkeypatch.setattr(os, "copy_file_range", refuses_after_one_part)
    target = tmp_path / "train.jsonl"
    with target.open("wb") as handle:
        written.copy_to(handle)
    assert target.read_bytes() == body
    written.close()
