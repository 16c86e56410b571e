"""The record frame's two texts, `raw` and `example`, and the normalised texts the duplicate searches
compare, kept on the flow's disk instead of its heap.

From the engines' screen on (tuneline/engines/blocks.py), the batch-wide rules compare hashes and
normalised forms, never a record's raw text or its training line: those are read again only by the
export (the training lines of kept records, the raw text of quarantined ones), by rule 5 (the lines of
preference records, which it parses) and by the quality gate (whether a row has an example). Yet they
were half of what the flow held while the batch-wide rules ran (per synthetic chat: raw text 693 B,
training line 660 B, of about 2.6 KB after the screen).
So a block's task packs them (`pack`) into one byte string, a TextStore in memory (one object to
pickle back to the flow instead of two per record), and the flow appends each block's to one TextStore
on disk (`TextStore.on_disk`, an unnamed temporary file: gone when the store is, even if the process
dies) as the block comes back. A worker process of the local engine writes its block's bytes to a file
of its own instead (`TextStore.spilled`, which pickles as the file's name), and the flow moves them
into its store with an in-kernel copy (copy_file_range) and removes the file: the bytes (about 1.5 GB
a million records) never pass through a pipe, and the flow's process, which shares the cores with the
workers, neither receives nor writes them (tuneline/engines/local.py has the figures). The frame keeps
where they are (records.TEXT_AT, RAW_SIZE, EXAMPLE_SIZE; the `raw` and `example` cells of a stored row
are null), and `raw_texts` and `examples` read them back, a few MB at a time in file order. A text
that cannot be stored as bytes stays in its cell (an example JSON cannot represent, a null); readers
see no difference.

The normalised texts (the parts of tuneline/near_duplicates.py's Documents: a block's distinct turn
texts, normalised) were the largest thing left after that (about 0.3 kB a synthetic chat as Python
strings): they are kept the same way (`StoredTexts`), packed by the block's task and appended to
the batch's store as the block comes back, and the exact and near-duplicate checks read back the
texts of the records they compare, which are few.

Written by hand because nothing well-kept does this small job: Arrow's memory-mapped files would put
every page read back into the process's resident set (the export reads them all), and a key-value
store is far more than an append-only file read back in offset order.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import pandas as pd

from tuneline import records

# Bytes read from the file at once when texts are read back (sequential, in offset order), and the
# most bytes between two texts read with one call rather than two (a record's normalised texts lie
# apart: its block's system prompt, its own turns).
_READ_WINDOW = 8 * 2**20
_READ_GAP = 64 * 2**10
# Texts read one by one rather than sorted into windows (a record's parts: the sort costs more).
_FEW = 8
_NOT_STORED = -1
# copy_file_range's errors where the kernel cannot copy between two files (another file system on an
# older kernel, a file system without it, an output opened for appending): copy_bytes copies through
# this process instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


class NoRoomForTexts(RuntimeError):
    """The batch's texts could not be written to the temporary directory (full, missing, read-only)."""


def no_room(directory: str | None, error: OSError, what: str, room: str) -> NoRoomForTexts:
    """The one-line error for `what` not written to `directory` (None: the system's temporary one):
    the OS's reason, the `room` it takes, and the fix."""
    where = directory or tempfile.gettempdir()
    return NoRoomForTexts(
        f"could not write {what} to {where} ({error.strerror or type(error).__name__}): {room}; "
        "point TMPDIR at a disk with room"
    )


def _no_room(directory: str | None, error: OSError) -> NoRoomForTexts:
    return no_room(
        directory,
        error,
        "the batch's raw texts, training lines and normalised texts",
        "they take about 1.5 GB a million records on the flow's disk until export",
    )


def read_into(descriptor: int, buffer: memoryview, offset: int) -> None:
    """Fill `buffer` with the file's bytes from `offset`: a read can return fewer bytes than asked
    for, so it is read again for the rest; a file that ends early is an error, not an endless loop.
    The one rule for the flow's temporary files (this store's siblings: tuneline/sorted_lines.py,
    tuneline/signature_store.py)."""
    view = buffer.cast("B")
    while len(view):
        count = os.preadv(descriptor, [view], offset)
        if not count:
            raise OSError(f"the temporary file ended {len(view)} bytes early")
        view = view[count:]
        offset += count


def read_at(descriptor: int, size: int, offset: int) -> bytes:
    """`size` bytes of a file from `offset` (read_into)."""
    buffer = bytearray(size)
    read_into(descriptor, memoryview(buffer), offset)
    return bytes(buffer)


def copy_bytes(source: int, target: int, size: int, source_offset: int, target_offset: int) -> None:
    """`size` bytes of the file `source` from `source_offset` written to the file `target` from
    `target_offset`: by the kernel (copy_file_range: no pass through this process) where it can, else
    through this process a read window at a time, from where the kernel stopped. The one rule for
    copying between the flow's temporary files and its outputs (tuneline/sorted_lines.py)."""
    kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
    copied = 0
    while copied < size:
        if kernel_copy is None:
            chunk = read_at(source, min(size - copied, _READ_WINDOW), source_offset + copied)
            copied += os.pwrite(target, chunk, target_offset + copied)
            continue
        try:
            count = kernel_copy(source, target, size - copied, source_offset + copied, target_offset + copied)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            kernel_copy = None
            continue
        if not count:
            raise OSError(f"the file to copy ended {size - copied} bytes early")
        copied += count


class TextStore:
    """An append-only sequence of bytes: in memory (a block's, picklable), in a named file of its own
    (a block's written by a worker: `spilled`, picklable as the file's name) or in an unnamed temporary
    file (the batch's, which stays in its process)."""

    def __init__(self, blob: bytes = b"") -> None:
        self._blob: bytes | None = blob
        self._path: str | None = None
        self._file: io.BufferedRandom | None = None
        self._directory: str | None = None
        self._size = len(blob)

    @classmethod
    def on_disk(cls, directory: str | None = None) -> TextStore:
        """An empty store in a temporary file of `directory` (default: the system's, $TMPDIR)."""
        store = cls()
        store._blob = None
        store._directory = directory
        try:
            store._file = tempfile.TemporaryFile(prefix="tuneline-texts-", dir=directory)  # noqa: SIM115
        except OSError as exc:
            raise _no_room(directory, exc) from None
        return store

    @classmethod
    def _in_file(cls, path: str, size: int) -> TextStore:
        store = cls()
        store._blob = None
        store._path = path
        store._size = size
        return store

    def spilled(self, directory: str) -> TextStore:
        """This store's bytes (in memory) written to a new file of `directory`, as a store that pickles
        as the file's name; `append` moves them into a store on disk and removes the file."""
        if self._blob is None:
            raise TypeError("a store in memory is spilled")
        path: str | None = None
        try:
            handle, path = tempfile.mkstemp(prefix="tuneline-block-", dir=directory)
            with os.fdopen(handle, "wb") as file:
                file.write(self._blob)
        except OSError as exc:
            if path is not None:
                os.unlink(path)
            raise _no_room(directory, exc) from None
        return TextStore._in_file(path, self._size)

    def __len__(self) -> int:
        return self._size

    def __reduce__(self) -> tuple[Any, ...]:
        if self._path is not None:
            return (TextStore._in_file, (self._path, self._size))
        if self._blob is None:
            raise TypeError("a TextStore on disk stays in the process that made it")
        return (TextStore, (self._blob,))

    def append(self, other: TextStore) -> int:
        """`other`'s bytes (a store in memory, or spilled: its file is removed) added at the end of this
        one (on disk); returns the offset they start at."""
        if self._file is None or (other._blob is None and other._path is None):
            raise TypeError("a store in memory or spilled is appended to a store on disk")
        start = self._size
        try:
            if other._path is not None:
                with open(other._path, "rb") as source:
                    copy_bytes(source.fileno(), self._file.fileno(), len(other), 0, start)
                os.unlink(other._path)
                other._path = None
            else:
                assert other._blob is not None
                self._file.seek(start)
                self._file.write(other._blob)
                self._file.flush()
        except OSError as exc:
            self._file.truncate(start)  # a part written before the disk filled is not kept
            raise _no_room(self._directory, exc) from None
        self._size += len(other)
        return start

    def read(self, starts: np.ndarray, sizes: np.ndarray) -> list[bytes]:
        """The bytes at starts[i] .. starts[i] + sizes[i], in the order asked for."""
        starts = np.asarray(starts, dtype=np.int64)
        sizes = np.asarray(sizes, dtype=np.int64)
        out: list[bytes] = [b""] * len(starts)
        if self._blob is not None:
            view = memoryview(self._blob)
            for index, (start, size) in enumerate(zip(starts.tolist(), sizes.tolist(), strict=True)):
                out[index] = bytes(view[start : start + size])
            return out
        if self._file is None:
            raise TypeError("a spilled store is read once it is appended to a store on disk")
        descriptor = self._file.fileno()
        if len(starts) <= _FEW:  # a record's parts: each read alone costs less than sorting them
            pairs = zip(starts.tolist(), sizes.tolist(), strict=True)
            return [read_at(descriptor, size, start) for start, size in pairs]
        order = np.argsort(starts, kind="stable")
        ordered_starts = starts[order].tolist()
        ordered_ends = (starts + sizes)[order].tolist()
        ordered = order.tolist()
        index = 0
        while index < len(ordered):
            window_start = ordered_starts[index]
            last = index
            window_end = ordered_ends[index]
            # As many texts as fit one window (at least one, however long), none far from the last,
            # read with one call.
            while (
                last + 1 < len(ordered)
                and ordered_ends[last + 1] - window_start <= _READ_WINDOW
                and ordered_starts[last + 1] - window_end <= _READ_GAP
            ):
                last += 1
                window_end = max(window_end, ordered_ends[last])
            chunk = os.pread(descriptor, window_end - window_start, window_start)
            view = memoryview(chunk)
            for at in range(index, last + 1):
                out[ordered[at]] = bytes(
                    view[ordered_starts[at] - window_start : ordered_ends[at] - window_start]
                )
            index = last + 1
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def pack(frame: pd.DataFrame) -> tuple[pd.DataFrame, TextStore]:
    """A shallow copy of `frame` with every raw text and every example that is a training line
    (bytes) moved into a new TextStore in memory, and where each is (TEXT_AT, RAW_SIZE, EXAMPLE_SIZE)."""
    raws = frame[records.RAW].tolist()
    examples = frame[records.EXAMPLE].tolist()
    n = len(frame)
    text_at = np.full(n, _NOT_STORED, dtype=np.int64)
    raw_size = np.full(n, _NOT_STORED, dtype=np.int32)
    example_size = np.full(n, _NOT_STORED, dtype=np.int32)
    raw_left = np.full(n, None, dtype=object)
    example_left = np.full(n, None, dtype=object)
    pieces: list[bytes] = []
    offset = 0
    for position, (raw, example) in enumerate(zip(raws, examples, strict=True)):
        start = offset
        stored = False
        if isinstance(raw, str):
            data = raw.encode("utf-8", "surrogatepass")
            pieces.append(data)
            raw_size[position] = len(data)
            offset += len(data)
            stored = True
        else:
            raw_left[position] = raw
        if isinstance(example, bytes):
            pieces.append(example)
            example_size[position] = len(example)
            offset += len(example)
            stored = True
        else:
            example_left[position] = example
        if stored:
            text_at[position] = start
    out = frame.copy(deep=False)
    out[records.RAW] = pd.Series(raw_left, index=out.index, dtype=object)
    out[records.EXAMPLE] = pd.Series(example_left, index=out.index, dtype=object)
    out[records.TEXT_AT] = pd.Series(text_at, index=out.index)
    out[records.RAW_SIZE] = pd.Series(raw_size, index=out.index)
    out[records.EXAMPLE_SIZE] = pd.Series(example_size, index=out.index)
    return out, TextStore(b"".join(pieces))


def moved(frame: pd.DataFrame, texts: TextStore, into: TextStore) -> pd.DataFrame:
    """`texts` (a block's, in memory or spilled) appended to `into`, and `frame` (the block's)
    pointing there."""
    base = into.append(texts)
    at = frame[records.TEXT_AT].to_numpy(dtype=np.int64)
    out = frame.copy(deep=False)
    out[records.TEXT_AT] = pd.Series(np.where(at >= 0, at + base, at), index=out.index)
    return out


def is_packed(frame: pd.DataFrame) -> bool:
    """Whether the frame's texts were moved to a TextStore (`pack`)."""
    return records.TEXT_AT in frame


def _stored_in(frame: pd.DataFrame, texts: TextStore | None) -> bool:
    if not is_packed(frame):
        return False
    if texts is None:
        raise ValueError("the frame's raw texts and examples are in a TextStore: pass it (texts=...)")
    return True


def raw_texts(
    frame: pd.DataFrame, positions: Sequence[int] | np.ndarray, texts: TextStore | None
) -> list[Any]:
    """The raw text of the rows at `positions`, in that order, wherever it is kept."""
    values, stored, data = _cells(frame, positions, texts, records.RAW, records.RAW_SIZE)
    for index, raw in zip(stored, data, strict=True):
        values[index] = raw.decode("utf-8", "surrogatepass")
    return values


def examples(
    frame: pd.DataFrame, positions: Sequence[int] | np.ndarray, texts: TextStore | None
) -> list[Any]:
    """The example of the rows at `positions`, in that order, wherever it is kept (a stored one is its
    training line, bytes: records.example_value reads it)."""
    values, stored, data = _cells(frame, positions, texts, records.EXAMPLE, records.EXAMPLE_SIZE)
    for index, line in zip(stored, data, strict=True):
        values[index] = line
    return values


def _cells(
    frame: pd.DataFrame,
    positions: Sequence[int] | np.ndarray,
    texts: TextStore | None,
    column: str,
    size_column: str,
) -> tuple[list[Any], list[int], list[bytes]]:
    """The `column` cells of the rows at `positions`, which of those (indices into `positions`) are
    stored instead, and their stored bytes. A row's example is stored right after its raw text."""
    positions = np.asarray(positions, dtype=np.int64)
    values = frame[column].to_numpy(dtype=object)[positions].tolist()
    if not _stored_in(frame, texts):
        return values, [], []
    assert texts is not None
    sizes = frame[size_column].to_numpy()[positions]
    stored = np.flatnonzero(sizes >= 0)
    rows = positions[stored]
    starts = frame[records.TEXT_AT].to_numpy()[rows]
    if column == records.EXAMPLE:
        starts = starts + np.maximum(frame[records.RAW_SIZE].to_numpy()[rows], 0)
    return values, stored.tolist(), texts.read(starts, sizes[stored])


def has_example(frame: pd.DataFrame) -> np.ndarray:
    """Whether each row has an example, in its cell or stored."""
    present = np.fromiter(
        (e is not None for e in frame[records.EXAMPLE].tolist()), dtype=bool, count=len(frame)
    )
    if is_packed(frame):
        present = present | (frame[records.EXAMPLE_SIZE].to_numpy() >= 0)
    return present


def unpacked(frame: pd.DataFrame, texts: TextStore | None) -> pd.DataFrame:
    """`frame` with its texts back in their cells and the store's columns gone: the frame one pass
    without a store makes."""
    if not _stored_in(frame, texts):
        return frame
    everything = np.arange(len(frame))
    out = frame.drop(columns=[records.TEXT_AT, records.RAW_SIZE, records.EXAMPLE_SIZE])
    out[records.RAW] = pd.Series(raw_texts(frame, everything, texts), index=out.index, dtype=object)
    out[records.EXAMPLE] = pd.Series(examples(frame, everything, texts), index=out.index, dtype=object)
    return out


class StoredTexts(Sequence[str]):
    """A sequence of texts kept as UTF-8 in a TextStore: where each starts in it, and its size in bytes
    (12 bytes a text held, against about 50 bytes and the text itself for a Python string). The
    normalised texts of a batch's records (the parts of tuneline/near_duplicates.py's Documents) are
    kept so: a block's task packs its texts (`packed`, one byte string to pickle back instead of a
    string per text), the flow appends them to the batch's store as the block comes back (`moved`), and
    the duplicate searches read back only the texts of the records they compare (`take`)."""

    def __init__(self, store: TextStore, starts: np.ndarray, sizes: np.ndarray) -> None:
        self.store = store
        self.starts = np.asarray(starts, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int32)

    @classmethod
    def packed(cls, texts: Sequence[str]) -> StoredTexts:
        """`texts` in a new TextStore in memory."""
        encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
        sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        starts = np.zeros(len(encoded), dtype=np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        return cls(TextStore(b"".join(encoded)), starts, sizes)

    def moved(self, into: TextStore) -> StoredTexts:
        """These texts (in a store in memory, or spilled) appended to `into` (on disk), and read from
        there."""
        return StoredTexts(into, self.starts + into.append(self.store), self.sizes)

    def spilled(self, directory: str) -> StoredTexts:
        """These texts (in a store in memory) in a file of `directory` (TextStore.spilled)."""
        return StoredTexts(self.store.spilled(directory), self.starts, self.sizes)

    @classmethod
    def concat(cls, parts: Sequence[StoredTexts]) -> StoredTexts:
        """The texts of several sequences kept in one store, in order."""
        assert len({id(part.store) for part in parts}) == 1, "texts of different stores"
        return cls(
            parts[0].store,
            np.concatenate([part.starts for part in parts]),
            np.concatenate([part.sizes for part in parts]),
        )

    def subset(self, ids: np.ndarray) -> StoredTexts:
        return StoredTexts(self.store, self.starts[ids], self.sizes[ids])

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        return self.take(np.asarray([index]))[0]

    def take(self, ids: np.ndarray | Sequence[int]) -> list[str]:
        """The texts `ids`, in that order, read at once (TextStore.read)."""
        ids = np.asarray(ids, dtype=np.int64)
        data = self.store.read(self.starts[ids], self.sizes[ids])
        return [text.decode("utf-8", "surrogatepass") for text in data]

    def __reduce__(self) -> tuple[Any, ...]:
        return (StoredTexts, (self.store, self.starts, self.sizes))  # a store in memory pickles


def take(texts: Sequence[str], ids: np.ndarray | Sequence[int]) -> list[str]:
    """texts[i] for each of `ids`: read at once when they are stored."""
    if isinstance(texts, StoredTexts):
        return texts.take(ids)
    return [texts[i] for i in np.asarray(ids, dtype=np.int64).tolist()]
