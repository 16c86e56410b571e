"""The heap around the data plane's phases: the C heap's free pages given back to the operating system
between them (`release_free_memory`), the cyclic garbage collector paused during them (`collector_paused`).

The data plane allocates and frees millions of Python objects and numpy arrays of every size. glibc's
malloc keeps what is freed in its arenas for reuse rather than returning it, and raises its mmap
threshold (up to 32 MB) each time a large array is freed, so later arrays below that size come from
the arenas too: after a phase lets its temporaries go, the process keeps hundreds of MB it no longer
uses (measured at 1M examples: 0.3 GB after the screen, 0.5 GB after the batch-wide rules), and the
next phase's peak is counted on top of them. `malloc_trim(0)` returns every free page of the arenas
(about 0.07 s for 1 GB of free pages here). Dask documents the same remedy for its workers (distributed's
worker-memory docs, "Manually trim memory"); no library wraps it, hence this module. Setting a fixed mmap threshold
instead (MALLOC_MMAP_THRESHOLD_) lowered the peak a little more but made dedupe a third slower (every
large temporary became an mmap and its page faults).

Measured with benchmarks/data_plane.py 1000000 on the 2-core dev machine: peak 2.61 -> 2.33 GiB in the
flow's process, 2.65 -> 2.44 GiB with its workers, the time within the noise.

Where the C library has no malloc_trim (musl, macOS), this does nothing.

`collector_paused()` is the other rule for the data plane's phases that make millions of containers
that all stay alive (parsed examples, a block's frame and texts, the blocks' results as they are
unpickled): Python's cyclic collector would walk them again at each collection of the growing heap
(half the time of a large read; 2 to 5% of a block's whole screen). Reference counting still frees
what is dropped, and collection resumes when the phase ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Callable, Iterator
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_free_memory() -> bool:
    """Return the heap's free pages to the operating system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block of code, as it was after (see the docstring)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
