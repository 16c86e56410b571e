"""Threads in the flow's own process, for the numpy work of the batch-wide rules.

The engines spread the per-record work over every core (tuneline/engines/), but the batch-wide rules
(tasks/dedupe.py's `batch_rules`) run in the flow's process once the blocks are back, and the other
cores would wait. Most of what the near-duplicate search does there is numpy (sorting band keys and
shingle hashes, gathering signature rows, comparing them) and pyarrow (splitting texts into words),
which release the interpreter's lock while they run, so a second thread working on an independent
piece of it uses a second core:

- `prefetched`: the next item of a generator made in a background thread while the caller uses the
  current one (the candidate pairs of the next LSH band while this band's are filtered);
- `mapped`: a function over independent chunks, in order, on `flow_threads()` threads;
- `limited(threads)`: at most that many threads for the code inside; with one, both of the above work
  in the caller's thread. The flow sets it from `execution.flow_threads` (tuneline/engines/'s
  `flow_threads`: one by default with the ray engine, whose flow's memory matters more than its time).

Measured on the 2-core dev machine: the batch-wide rules of a million synthetic chats took 18 to 20 s
on one thread and take 12.9 to 14.8 s with these (benchmarks/data_plane.py 1000000, the README's
data-plane figures). `available_cpus` is also what the local engine sizes its pool by. A process
pool would also parallelise the Python parts, but the chunks read the batch's stores (texts and
signatures in unnamed temporary files of this process) and would pickle their results back; threads
share them for nothing. The standard library's ThreadPoolExecutor does the mapping; `prefetched` is
the one thing it lacks (a bounded queue between a generator and its caller).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Threads for the flow's numpy work: beyond a few, the parts that hold the interpreter's lock (Python
# between the numpy calls) leave the others waiting.
MAX_FLOW_THREADS = 4


def available_cpus() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Set by `limited(threads)` for the code it runs (None: no limit set).
_limit: ContextVar[int | None] = ContextVar("tuneline_flow_threads", default=None)


def flow_threads() -> int:
    """Threads `mapped` uses: one per core this process may run on, at most MAX_FLOW_THREADS or, inside
    `limited(threads)`, at most `threads`."""
    limit = _limit.get()
    return max(1, min(MAX_FLOW_THREADS if limit is None else limit, available_cpus()))


@contextlib.contextmanager
def limited(threads: int | None) -> Iterator[None]:
    """At most `threads` threads for `mapped` and `prefetched` in the code inside (None: the default,
    one per core up to MAX_FLOW_THREADS; 1: both in the caller's thread). One is for a flow whose
    memory matters more than its time: each thread's allocations stay in a glibc arena of its own,
    which a trim does not shrink, so threads raise what the flow holds afterwards (the ray engine's ten
    million chats: 0.8 GiB more after the batch-wide rules, their peak 5.92 -> 6.61 and 6.78 GiB)."""
    token = _limit.set(threads)
    try:
        yield
    finally:
        _limit.reset(token)


def mapped(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """[function(item) for item in items], on flow_threads() threads (in this thread when there is one
    core or one item). The items must be independent: each call may run beside any other."""
    threads = min(flow_threads(), len(items))
    if threads <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads, thread_name_prefix="tuneline-flow") as pool:
        return list(pool.map(function, items))


_END = object()


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """The items, in order, each made in a background thread while the caller works on the one before
    (one item waits at most: what is held is one item more than without). An exception raised making
    an item is raised here, where that item would have come; when the caller stops early, the thread
    stops after the item it is making. With one thread (one core, or `limited(1)`), the items are made
    in this thread."""
    if flow_threads() < 2:
        yield from items
        return
    slot: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=1)
    stopped = threading.Event()

    def offer(entry: tuple[object, BaseException | None]) -> bool:
        while not stopped.is_set():
            try:
                slot.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((item, None)):
                    return
                del item
        except BaseException as exc:  # handed to the caller, raised there
            offer((_END, exc))
            return
        offer((_END, None))

    thread = threading.Thread(target=produce, name="tuneline-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slot.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item  # type: ignore[misc]
            del item
    finally:
        stopped.set()
        thread.join()
