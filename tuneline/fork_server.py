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
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os
import threading
from collections.abc import Callable
from functools import cache
from typing import Any, TypeVar

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


def called_with_pid(function: Callable[..., T], *arguments: Any) -> tuple[int, T]:
    """function(*arguments) and the id of the process it ran in: what a worker sends back when the
    flow logs where the work was done."""
    return os.getpid(), function(*arguments)


def _nothing() -> None:
    """What start's process does."""
