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
def test_limited_to_one_thread_everything_runs_in_the_callers_thread_and_after_it_on_threads_again() -> None:
    caller = threading.current_thread().name
    with threads.limited(1):
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
def test_a_limit_caps_the_threads_at_the_cores_and_none_is_the_default() -> None:
    default = threads.flow_threads()
    assert default == min(threads.MAX_FLOW_THREADS, threads.available_cpus())
    with threads.limited(2):
        assert threads.flow_threads() == 2
        with threads.limited(None):
            assert threads.flow_threads() == default
        # More than MAX_FLOW_THREADS when asked for, never more than the cores.
        with threads.limited(1000):
            assert threads.flow_threads() == threads.available_cpus()
        assert threads.flow_threads() == 2


def test_the_flows_threads_follow_the_execution_config() -> None:
    from tuneline import engines
    from tuneline.config import load_config

    assert engines.flow_threads(load_config().execution) == threads.flow_threads()
    assert engines.flow_threads(load_config(overrides={"execution.engine": "ray"}).execution) == 1
    for engine in engines.ENGINES:
        execution = load_config(overrides={"execution.engine": engine, "execution.flow_threads": 3}).execution
        assert engines.flow_threads(execution) == 3
