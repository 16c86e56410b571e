"""The fork server the data plane's worker processes start from: the local engine's pool of block
workers (tuneline/engines/local.py), and the processes that work beside the flow's own: the export's
quarantine (tuneline/tasks/export.py) and the data-quality check (tuneline/tasks/quality.py).

A clean single-threaded process that imports the block code once (`tuneline.engines.blocks`, which
brings every task module a worker runs) and forks each worker from itself. A worker forked from the
flow's own process could inherit a lock held by one of its threads (Prefect's and MLflow's, or another
backfill date's tokenizer) and hang; one spawned afresh would import tuneline again for every pool.
The server starts once per process and is reused: its first start imports the block code on one core
(1.9 s here), later pools get workers at once. Like any multiprocessing start method but fork, a
worker imports the program's main module first (as `__mp_main__`): a script that runs the data plane
keeps its top-level work under `if __name__ == "__main__":` (the CLI and Prefect's flow runs do).

What a worker sends back goes through a file (`called`, `Returned`): the pipe carries only its name.
concurrent.futures sends each result through one pipe that all the pool's workers write to; a worker
killed while writing a large result (by the kernel's OOM killer, or kill -9) leaves part of a message
in it, and the pool's manager thread waits for the rest forever, blind to the worker's death: the run
hung (CI: 600 s, then the test's timeout) instead of reading the worker's blocks again. A message of
a few hundred bytes is written to a pipe whole (POSIX PIPE_BUF) or not at all. The case is in
tests/tuneline/test_fork_server.py: a worker killed while blocked writing its 1 MB result to the pipe
leaves its future waiting for good; through a file, every future completes.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os
import pickle
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@cache
def context() -> multiprocessing.context.ForkServerContext:
    """The fork-server context, its server preloading the block code (set before it first starts)."""
    found = multiprocessing.get_context("forkserver")
    found.set_forkserver_preload(["tuneline.engines.blocks"])
    return found


# Set once the server has forked a process in this process's lifetime: it is running then.
_running = threading.Event()


def start() -> None:
    """Start the fork server if it is not running, and return once it forks workers: it answers only
    after importing the block code, so one short process is started from it and waited for. A server
    that cannot start is reported by the pool that uses it."""
    if _running.is_set():
        return
    try:
        check = context().Process(target=_nothing, name="tuneline-fork-server-check")
        check.start()
        check.join()
    except (OSError, ValueError) as exc:
        log.debug("the fork server did not start here (%s)", exc)
    else:
        _running.set()


def started_in_background() -> threading.Event:
    """An event set once the fork server forks workers, or could not start: `start` on a thread of its
    own, unless the server ran here before (the event is then set already)."""
    done = threading.Event()
    if _running.is_set():
        done.set()
        return done

    def starting() -> None:
        try:
            start()
        finally:
            done.set()

    threading.Thread(target=starting, name="tuneline-fork-server", daemon=True).start()
    return done


@dataclass(frozen=True)
class Returned(Generic[T]):
    """What a worker's call sends back through the pool's pipe: the id of the process it ran in and
    the file of `directory` its outcome was pickled to (see the module docstring)."""

    process: int
    path: str

    def value(self) -> T:
        """The call's result, or its exception raised here (its traceback in the worker as a note); the
        file is removed."""
        try:
            value, raised, where = pickle.loads(Path(self.path).read_bytes())
        finally:
            os.unlink(self.path)
        if raised:
            value.add_note(f"raised in process {self.process}:\n{where}")
            raise value
        return value  # type: ignore[no-any-return]


def called(directory: str, function: Callable[..., T], *arguments: Any) -> Returned[T]:
    """function(*arguments) in a worker, its result (or exception) pickled to a new file of `directory`:
    what a pool's task calls, `Returned.value` in the flow's process giving the result."""
    try:
        outcome: tuple[Any, bool, str] = (function(*arguments), False, "")
    except Exception as exc:
        outcome = (exc, True, "".join(traceback.format_exception(exc)))
    descriptor, path = tempfile.mkstemp(dir=directory, suffix=".pickle")
    with os.fdopen(descriptor, "wb") as file:
        try:
            pickle.dump(outcome, file, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            os.unlink(path)
            if outcome[1]:  # an exception pickle cannot carry: the pool sends what it can of it
                raise outcome[0] from None
            raise
    return Returned(os.getpid(), path)


def _nothing() -> None:
    """What start's process does."""
