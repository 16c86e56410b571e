"""tuneline/threads.py: the flow's numpy work on a second thread, in order, errors where they belong."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from tuneline import threads

several_cores = pytest.mark.skipif(threads.available_cpus() < 2, reason="needs two cores")


def made_by(count: int, log: list[str], fail_at: int | None = None) -> Iterator[int]:
    for item in range(count):
        if item == fail_at:
            raise RuntimeError(f"item {item} cannot be made")
        log.append(threading.current_thread().name)
        yield item


@several_cores
def test_prefetched_items_come_in_order_made_ahead_in_another_thread() -> None:
    log: list[str] = []
    items = threads.prefetched(made_by(50, log))
    assert next(items) == 0
    # While the caller holds item 0, the next is made: the thread does not wait to be asked.
    for _ in range(200):
        if len(log) >= 2:
            break
        threading.Event().wait(0.01)
    assert len(log) >= 2
    assert [0, *items] == list(range(50))
    assert set(log) == {"tuneline-prefetch"}


@several_cores
def test_an_error_making_an_item_is_raised_where_that_item_would_come() -> None:
    items = threads.prefetched(made_by(10, [], fail_at=3))
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="item 3 cannot be made"):
        next(items)


@several_cores
def test_a_caller_that_stops_early_stops_the_thread() -> None:
    log: list[str] = []
    items = threads.prefetched(made_by(1_000, log))
    assert next(items) == 0
    items.close()
    assert not any(thread.name == "tuneline-prefetch" for thread in threading.enumerate())
    assert len(log) <= 3  # the item held, the one waiting, the one being made: no more


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins the process to one core")
def test_with_one_core_the_items_are_made_in_the_callers_thread() -> None:
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cores)})
    try:
        log: list[str] = []
        assert list(threads.prefetched(made_by(5, log))) == list(range(5))
        assert set(log) == {threading.current_thread().name}
        names: list[str] = []

        def doubled(item: int) -> int:
            names.append(threading.current_thread().name)
            return item * 2

        assert threads.mapped(doubled, range(5)) == [0, 2, 4, 6, 8]
        assert set(names) == {threading.current_thread().name}
    finally:
        os.sched_setaffinity(0, cores)


@several_cores
def test_mapped_keeps_the_order_uses_the_flows_threads_and_raises_an_items_error() -> None:
    barrier = threading.Barrier(2, timeout=10)
    names: list[str] = []

    def work(item: int) -> int:
        if item < 2:
            barrier.wait()  # the first two items run at once, or this times out
        names.append(threading.current_thread().name)
        return item * item

    assert threads.mapped(work, range(40)) == [item * item for item in range(40)]
    assert all(name.startswith("tuneline-flow") for name in names)

    def fails(item: int) -> int:
        if item == 7:
            raise ValueError("chunk 7 is bad")
        return item

    with pytest.raises(ValueError, match="chunk 7 is bad"):
        threads.mapped(fails, range(20))


@several_cores
def test_inside_one_thread_everything_runs_in_the_callers_thread_and_after_it_on_threads_again() -> None:
    caller = threading.current_thread().name
    with threads.one_thread():
        log: list[str] = []
        assert list(threads.prefetched(made_by(5, log))) == list(range(5))
        names: list[str] = []
        threads.mapped(lambda item: names.append(threading.current_thread().name), range(8))
        assert set(log) == set(names) == {caller}
        assert threads.flow_threads() == 1
    assert threads.flow_threads() > 1
    names = []
    threads.mapped(lambda item: names.append(threading.current_thread().name), range(8))
    assert caller not in names


@several_cores
def test_the_near_duplicate_search_keeps_to_one_thread_when_another_engine_finds_its_candidates() -> None:
    """The ray engine hands its candidate search in (`candidates`): its flow holds a batch too large for
    one machine, and threads would hold more. The search in this process uses the flow's threads."""
    import numpy as np

    from tuneline.near_duplicates import Documents, find_near_duplicates, local_candidates

    texts = [
        f"the order {i % 40} arrived late and the box was {'open' if i % 3 else 'torn'} today"
        for i in range(300)
    ]
    seen: list[int] = []

    def engine_search(*arguments: object) -> Iterator[np.ndarray]:
        seen.append(threads.flow_threads())
        return local_candidates(*arguments)  # type: ignore[arg-type]

    found = {}
    for name, candidates in (("engine", engine_search), ("here", None)):
        result = find_near_duplicates(
            Documents.of_texts(texts),
            np.arange(len(texts)),
            threshold=0.8,
            num_perm=64,
            shingle_size=3,
            candidates=candidates,
        )
        found[name] = result.duplicate_of.tolist()
    assert seen == [1]
    assert found["engine"] == found["here"] and max(found["here"]) >= 0
