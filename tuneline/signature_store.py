"""The batch's MinHash signatures kept on the flow's disk instead of its heap.

Each record's signature (tuneline/near_duplicates.py: `num_perm` uint32 values, 256 bytes at the
default 64) is made by the block that screened it. Held in the flow, the batch's signatures were a
quarter of what it held after the screen (about 0.25 GB a million records, and twice that while the
blocks' were put together), yet the near-duplicate search reads them in three narrow ways only: a few
values of every record at a time: a band's rows, for its LSH keys, and 16 values (64 bytes a record)
for each stage of the agreement filter of the candidate pairs (`columns`), which compares them a
cache line a record at a time. So the engines'
screen appends each block's signatures to a `SignatureStore` as the block comes back
(tuneline/engines/blocks.py's BatchTexts), column by column within the block, and those reads are a
read of a block's part of one column each: a band's keys read 5 columns, not the whole file.

An unnamed temporary file in $TMPDIR (gone with the store, even if the process dies), read with
`preadv` into numpy arrays. Written by hand because nothing well-kept does this small job: a
memory-mapped array (numpy.memmap, Arrow) would keep every page read in the process's resident set
while it is mapped, which is what this module exists to avoid, and an HDF5 or Zarr store would be a
new dependency for a file of fixed-width columns that is written once and read in a few set ways.
"""

from __future__ import annotations

import tempfile
from typing import IO

import numpy as np

from tuneline.text_store import NoRoomForTexts, no_room, read_into

_DTYPE = np.dtype(np.uint32)


def _no_room(directory: str | None, error: OSError) -> NoRoomForTexts:
    return no_room(
        directory,
        error,
        "the batch's MinHash signatures",
        "they take 4 bytes a permutation a record (about 0.25 GB a million records at num_perm 64) "
        "on the flow's disk until the near-duplicate search",
    )


class SignatureStore:
    """The signatures of a batch's records, in record order: shape (records, num_perm), uint32, in a
    temporary file; each appended block's stored column-major (all of its records' first values, then
    all their second values, ...)."""

    def __init__(self, num_perm: int, directory: str | None = None) -> None:
        self.num_perm = num_perm
        self._directory = directory
        try:
            self._file: IO[bytes] | None = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close() or with the store)
                prefix="tuneline-signatures-", dir=directory
            )
        except OSError as exc:
            raise _no_room(directory, exc) from None
        self._firsts: list[int] = []  # the first record of each block
        self._offsets: list[int] = []  # where each block starts in the file
        self._records = 0
        self._size = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self._records, self.num_perm)

    def __len__(self) -> int:
        return self._records

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a SignatureStore stays in the process that made it")

    def append(self, signatures: np.ndarray) -> None:
        """A block's signatures, shape (records, num_perm), added after those of the blocks before."""
        if signatures.ndim != 2 or signatures.shape[1] != self.num_perm:
            raise ValueError(f"signatures of {self.num_perm} permutations expected, got {signatures.shape}")
        if not len(signatures):
            return
        data = np.ascontiguousarray(signatures.T, dtype=_DTYPE)
        start = self._size
        try:
            assert self._file is not None
            self._file.seek(start)
            self._file.write(data.data.cast("B"))
            self._file.flush()
        except OSError as exc:
            assert self._file is not None
            self._file.truncate(start)  # a part written before the disk filled is not kept
            raise _no_room(self._directory, exc) from None
        self._firsts.append(self._records)
        self._offsets.append(start)
        self._records += len(signatures)
        self._size += data.nbytes

    def _blocks(self, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """(block's offset in the file, its record count, first and last + 1 of its records in
        start..stop, relative to the block) for each block holding records of start..stop."""
        found = []
        index = max(0, int(np.searchsorted(self._firsts, start, side="right")) - 1)
        while index < len(self._firsts) and self._firsts[index] < stop:
            first = self._firsts[index]
            count = (self._firsts[index + 1] if index + 1 < len(self._firsts) else self._records) - first
            found.append(
                (self._offsets[index], count, max(start, first) - first, min(stop, first + count) - first)
            )
            index += 1
        return found

    def column(self, index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Value `index` of the signatures of records start..stop."""
        stop = self._records if stop is None else stop
        out = np.empty(max(stop - start, 0), dtype=_DTYPE)
        assert self._file is not None
        descriptor = self._file.fileno()
        at = 0
        for offset, count, low, high in self._blocks(start, stop):
            read_into(
                descriptor, out[at : at + high - low].data, offset + (index * count + low) * _DTYPE.itemsize
            )
            at += high - low
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The signatures of records start..stop, shape (stop - start, num_perm)."""
        out = np.empty((self.num_perm, max(stop - start, 0)), dtype=_DTYPE)
        for index in range(self.num_perm):
            out[index] = self.column(index, start, stop)
        return np.ascontiguousarray(out.T)

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Values start..stop of every record's signature, shape (records, stop - start), one row a
        record (a pair's two reads are two cache lines at 16 values)."""
        out = np.empty((self._records, stop - start), dtype=_DTYPE)
        for index in range(start, stop):
            out[:, index - start] = self.column(index)
        return out

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The signatures of the records `indices`, shape (len(indices), num_perm), read a column at a
        time (for a few records: each column is read whole)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.num_perm), dtype=_DTYPE)
        for index in range(self.num_perm):
            out[:, index] = self.column(index)[indices]
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
