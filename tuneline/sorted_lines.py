"""Lines in the order of their keys, sorted on disk a key range at a time (an external bucket sort).

Export writes each side's lines ordered by their split key (a sha256 digest), ties broken by the
line's bytes. Sorting them in memory held every line of the batch at once (about 0.7 GB a million
examples, the largest single thing the flow held by the end of a run). The keys are uniform hashes, so
their leading bits cut the key space into ranges of about equal share: `add` appends lines as they
come to one temporary file, each batch grouped by range, and `write_sorted` reads back one range at a
time (one read per batch that had lines in it), sorts it by (key, line) in memory (numpy sorts the
keys as 64-bit words; only lines that share a key are compared as bytes) and writes it, into
another temporary file (`SortedFile`) that the export copies into place once it has decided to
publish. The memory held is one range (about `_RANGE_BYTES` of lines) and 36 bytes a line (its key and
size); the disk, the lines twice. Lines already in their order (the quarantine's, in frame order) go
straight into a `SortedFile` with `lines_in_order`.

Written by hand because nothing well-kept does it from Python: pandas and pyarrow sort in memory, GNU
sort needs text keys and a subprocess, and the whole job is a hundred lines.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from collections.abc import Iterable, Sequence
from typing import IO, Any

import numpy as np

from tuneline.text_store import NoRoomForTexts, copy_bytes, no_room, read_at

KEY_BYTES = 32
# Lines of one key range, about: what `write_sorted` holds in memory at once.
_RANGE_BYTES = 32 * 2**20
_MAX_RANGES = 1 << 12
# Lines joined per write (and per digest update).
_WRITE_LINES = 4096


def _no_room(directory: str | None, error: OSError) -> NoRoomForTexts:
    return no_room(
        directory,
        error,
        "the sorted training lines",
        "export sorts them on the flow's disk, about 1.2 GB a million examples while it runs",
    )


class SortedFile:
    """Lines in a temporary file, in their final order, and what a manifest says of them."""

    def __init__(self, handle: IO[bytes] | None, lines: int, size: int, sha256: str) -> None:
        self._handle = handle
        self.lines = lines
        self.size = size
        self.sha256 = sha256

    def read_lines(self) -> list[bytes]:
        """Every line (for small files: tests, reviews), each with its newline."""
        if self._handle is None:
            return []
        return read_at(self._handle.fileno(), self.size, 0).splitlines(keepends=True)

    def copy_to(self, out: IO[bytes]) -> None:
        """The file's bytes written to `out`: into a file by the kernel where it can
        (text_store.copy_bytes: profiled at a million examples, 1.9 s -> 0.16 s for the export's three
        files), else a few MB at a time."""
        if self._handle is None:
            return
        descriptor = self._handle.fileno()
        out.flush()
        try:
            target = out.fileno()
        except (AttributeError, io.UnsupportedOperation):  # `out` is no file
            for offset in range(0, self.size, _RANGE_BYTES):
                out.write(read_at(descriptor, min(_RANGE_BYTES, self.size - offset), offset))
            return
        start = out.tell()
        copy_bytes(descriptor, target, self.size, 0, start)
        out.seek(start + self.size)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def lines_in_order(
    chunks: Iterable[Sequence[bytes]], directory: str | None = None, what: str = "lines"
) -> SortedFile:
    """Lines already in their final order, a chunk at a time, written into a `SortedFile` as they come
    (never all in memory); `what` names them in the error when the disk is full."""
    handle: IO[bytes] | None = None
    lines = size = 0
    digest = hashlib.sha256()
    try:
        for chunk in chunks:
            if not chunk:
                continue
            data = b"".join(chunk)
            if handle is None:
                handle = tempfile.TemporaryFile(prefix="tuneline-lines-", dir=directory)  # noqa: SIM115
            handle.write(data)
            digest.update(data)
            lines += len(chunk)
            size += len(data)
        if handle is not None:
            handle.flush()
    except OSError as exc:
        if handle is not None:
            handle.close()
        raise no_room(directory, exc, what, "as many bytes as the lines take") from None
    return SortedFile(handle, lines, size, digest.hexdigest())


class SortedLines:
    """Lines with their KEY_BYTES-byte keys, added in any order, to be written in (key, line) order.
    `expected_bytes`: about how many bytes of lines will be added (it sets the number of key ranges)."""

    def __init__(self, expected_bytes: int, directory: str | None = None) -> None:
        ranges = 1
        while ranges * _RANGE_BYTES < expected_bytes and ranges < _MAX_RANGES:
            ranges *= 2
        self._bits = ranges.bit_length() - 1  # the leading key bits that name a range
        # Per range: (offset in the file, the sizes of its lines, their keys joined), one per `add`.
        self._segments: list[list[tuple[int, np.ndarray, bytes]]] = [[] for _ in range(ranges)]
        self._directory = directory
        self._file: IO[bytes] | None = None
        self._end = 0
        self.count = 0

    def add(self, keys: Sequence[bytes], lines: Sequence[bytes]) -> None:
        """Lines, each with its key."""
        if not lines:
            return
        assert len(keys) == len(lines)
        if self._bits:
            prefixes = np.frombuffer(b"".join(key[:8] for key in keys), dtype=">u8")
            ranges = (prefixes >> np.uint64(64 - self._bits)).astype(np.int64)
        else:
            ranges = np.zeros(len(lines), dtype=np.int64)
        order = np.argsort(ranges, kind="stable")
        bounds = np.searchsorted(ranges[order], np.arange(len(self._segments) + 1))
        for at in np.flatnonzero(np.diff(bounds)).tolist():
            members = order[bounds[at] : bounds[at + 1]].tolist()
            chosen = [lines[i] for i in members]
            sizes = np.fromiter((len(line) for line in chosen), dtype=np.int64, count=len(chosen))
            offset = self._append(b"".join(chosen))
            self._segments[at].append((offset, sizes, b"".join(keys[i] for i in members)))
        self.count += len(lines)

    def _append(self, data: bytes) -> int:
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="tuneline-lines-", dir=self._directory)  # noqa: SIM115
            self._file.seek(self._end)
            self._file.write(data)
        except OSError as exc:
            raise _no_room(self._directory, exc) from None
        start = self._end
        self._end += len(data)
        return start

    def write_sorted(self, *digests: Any) -> SortedFile:
        """Every line, in (key, line) order, into a new temporary file; each hashlib object in
        `digests` is fed the same bytes. The lines added are let go."""
        if not self.count:
            self.close()
            return SortedFile(None, 0, 0, hashlib.sha256().hexdigest())
        assert self._file is not None
        self._file.flush()
        source = self._file.fileno()
        own = hashlib.sha256()
        size = 0
        try:
            out = tempfile.TemporaryFile(prefix="tuneline-sorted-", dir=self._directory)  # noqa: SIM115
            for segments in self._segments:
                if not segments:
                    continue
                body = memoryview(
                    b"".join(read_at(source, int(sizes.sum()), offset) for offset, sizes, _ in segments)
                )
                sizes = np.concatenate([segment[1] for segment in segments])
                ends = np.cumsum(sizes)
                order = _key_line_order(
                    b"".join(segment[2] for segment in segments), body, ends - sizes, ends
                )
                spans = list(zip((ends - sizes)[order].tolist(), ends[order].tolist(), strict=True))
                for start in range(0, len(spans), _WRITE_LINES):
                    data = b"".join([body[a:b] for a, b in spans[start : start + _WRITE_LINES]])
                    out.write(data)
                    size += len(data)
                    own.update(data)
                    for digest in digests:
                        digest.update(data)
            out.flush()
        except OSError as exc:
            raise _no_room(self._directory, exc) from None
        finally:
            self.close()
        return SortedFile(out, self.count, size, own.hexdigest())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._segments = [[] for _ in self._segments]


def _key_line_order(keys: bytes, body: memoryview, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The order of lines body[starts[i]:ends[i]] by (key, line), their KEY_BYTES-byte keys joined in
    `keys`: the keys sorted by numpy as big-endian 64-bit words (byte order), and the lines of a run
    of equal keys (rare: the same normalised prompt and answer twice) sorted by their bytes."""
    words = np.frombuffer(keys, dtype=">u8").reshape(-1, KEY_BYTES // 8)
    order = np.lexsort(words.T[::-1])
    in_order = words[order]
    tied = np.concatenate([[False], (in_order[1:] == in_order[:-1]).all(axis=1), [False]])
    edges = np.flatnonzero(tied[1:] != tied[:-1]).tolist()  # the lines first..last of a run share a key
    for first, last in zip(edges[0::2], edges[1::2], strict=True):
        order[first : last + 1] = sorted(
            order[first : last + 1].tolist(), key=lambda k: bytes(body[starts[k] : ends[k]])
        )
    return order
