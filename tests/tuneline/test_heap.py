"""tuneline/heap.py: the free pages glibc keeps after a phase go back to the operating system, and
the cyclic collector pauses for a phase."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter: the test's own process has a heap of unknown history. Freeing a 20 MB
# array raises glibc's mmap threshold above 1 MB (as the data plane's large arrays do), so the 300
# arrays of 1 MB that follow come from the heap; one more above them keeps the heap's top from
# shrinking by itself when they are freed.
SCRIPT = """
import numpy as np
from tuneline import heap

def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

large = np.ones(20 << 20, dtype=np.uint8)
del large
arrays = [np.ones(1 << 20, dtype=np.uint8) for _ in range(300)]
above = np.ones(1 << 20, dtype=np.uint8)
del arrays
kept = rss()
released = heap.release_free_memory()
print(released, (kept - rss()) >> 20)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident size from /proc")
def test_freed_arrays_the_heap_kept_are_given_back() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    released, megabytes = out.split()
    if released == "False":
        pytest.skip("this C library has no malloc_trim")
    assert int(megabytes) >= 250, out


def test_the_collector_is_paused_inside_and_as_it_was_after() -> None:
    import gc

    from tuneline import heap

    assert gc.isenabled()
    with heap.collector_paused():
        assert not gc.isenabled()
        with heap.collector_paused():  # nested (a read inside a block's screen): still off after
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), heap.collector_paused():
        raise ValueError("a phase that fails")
    assert gc.isenabled()
    gc.disable()
    try:
        with heap.collector_paused():
            pass
        assert not gc.isenabled()  # left off by its caller: not switched on behind its back
    finally:
        gc.enable()
