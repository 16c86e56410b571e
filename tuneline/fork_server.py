"""The fork server the data plane's worker processes start from: the local engine's pool of block
workers (tuneline/engines/local.py) and the export's quarantine process (tuneline/tasks/export.py).

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
import threading
from functools import cache

log = logging.getLogger(__name__)


@cache
def context() -> multiprocessing.context.ForkServerContext:
    """The fork-server context, its server preloading the block code (set before it first starts)."""
    found = multiprocessing.get_context("forkserver")
    found.set_forkserver_preload(["tuneline.engines.blocks"])
    return found


def start() -> None:
    """Start the fork server if it is not running, and return once it forks workers: it answers only
    after importing the block code, so one short process is started from it and waited for. A server
    that cannot start is reported by the pool that uses it."""
    try:
        check = context().Process(target=_nothing, name="tuneline-fork-server-check")
        check.start()
        check.join()
    except (OSError, ValueError) as exc:
        log.debug("the fork server did not start here (%s)", exc)


def started_in_background() -> threading.Thread:
    """`start` in a thread of its own, started: alive while the server is starting."""
    starting = threading.Thread(target=start, name="tuneline-fork-server", daemon=True)
    starting.start()
    return starting


def _nothing() -> None:
    """What start's process does."""
