"""The fork server's workers send their outcomes back through files (fork_server.called): a worker
killed while another's result is taken in leaves nothing half sent, so every future completes; an
exception comes back with its type and where it was raised."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import psutil
import pytest

from tuneline import fork_server

# The second worker's result: sixteen times what a pipe holds, so that through the pipe its worker
# would be blocked part way through writing it while the first result is unpickled.
LARGE = 1 << 20


def large_result() -> bytes:
    time.sleep(0.2)  # sent after the first result, while that one is unpickled
    return b"x" * LARGE


def killed_on_arrival(server: int, own: int) -> str:
    """Unpickled in the test's process (`Slow`): the fork server's other child is killed there, once
    it has had a second to send its result back."""
    time.sleep(1.0)
    for child in psutil.Process(server).children():
        if child.pid != own:
            os.kill(child.pid, signal.SIGKILL)
    return "first"


class Slow:
    """A result that, unpickled, kills the pool's other worker (killed_on_arrival)."""

    def __init__(self, server: int, own: int) -> None:
        self.server, self.own = server, own

    def __reduce__(self) -> tuple[Any, tuple[int, int]]:
        return killed_on_arrival, (self.server, self.own)


def slow_result() -> Slow:
    return Slow(os.getppid(), os.getpid())


def failing(text: str) -> None:
    raise ValueError(f"bad block: {text}")


def test_a_worker_killed_while_another_result_is_taken_in_never_hangs_the_pool() -> None:
    """Through the pool's pipe (pool.submit(large_result)) this hangs for good: the second worker is
    killed part way through writing its result, and the pool's manager thread waits for the rest."""
    with (
        tempfile.TemporaryDirectory() as directory,
        ProcessPoolExecutor(2, mp_context=fork_server.context()) as pool,
    ):
        # Both workers up before the work: the first result's unpickling finds the second at work.
        for started in [pool.submit(time.sleep, 0.5) for _ in range(2)]:
            started.result()
        first = pool.submit(fork_server.called, directory, slow_result)
        second = pool.submit(fork_server.called, directory, large_result)
        assert first.result(timeout=60).value() == "first"
        try:
            outcome: Any = second.result(timeout=60).value()
        except BrokenProcessPool as exc:  # killed before its result was sent: never half of it
            outcome = exc
        if not isinstance(outcome, BrokenProcessPool):
            assert outcome == b"x" * LARGE
            assert os.listdir(directory) == []  # every file taken in, and removed


def test_an_exception_comes_back_with_its_type_and_where_it_was_raised() -> None:
    with (
        tempfile.TemporaryDirectory() as directory,
        ProcessPoolExecutor(1, mp_context=fork_server.context()) as pool,
    ):
        returned = pool.submit(fork_server.called, directory, failing, "3").result(timeout=60)
        assert returned.process != os.getpid()
        with pytest.raises(ValueError, match="bad block: 3") as raised:
            returned.value()
        notes = "".join(getattr(raised.value, "__notes__", []))
        assert f"raised in process {returned.process}" in notes and "in failing" in notes
        assert os.listdir(directory) == []
