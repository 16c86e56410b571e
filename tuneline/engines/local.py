"""The `local` execution engine: the blocks of tuneline/engines/blocks.py on this machine's cores.

`screen(files, config, eval_examples)` does everything in the flow's own process when there is one
block's worth of input (`execution.block_bytes`) or one worker (`execution.workers: 1`). Otherwise the
blocks run in a pool of `execution.workers` processes (default: one per core this process may use),
and their results come back in block order: what a single pass makes, row for row (blocks.py says
why). Reading, format checks, token counts, the credential screen, leakage and normalisation are
Python work that one process does on one core at a time; the pool is what puts every core to work.

How the workers start: from multiprocessing's fork server, a clean single-threaded process that
imports the block code once and forks each worker from itself. A worker forked from the flow's own
process could inherit a lock held by one of its threads (Prefect's and MLflow's, or another backfill
date's tokenizer) and hang; one spawned afresh would import tuneline again for every pool. The fork
server starts once per process (a few seconds, the first time) and is reused. Like any multiprocessing
start method but fork, a worker imports the program's main module first (as `__mp_main__`): a script
that runs the data plane keeps its top-level work under `if __name__ == "__main__":` (the CLI and
Prefect's flow runs do); where a worker cannot start, the blocks are read in the flow's process.

The results come back pickled, except each block's raw texts, training lines and normalised texts:
the worker writes them to files of a temporary directory of the screen's (blocks.Screened.spilled),
and the flow copies them into the batch's store on disk as the block's result arrives
(tuneline/text_store.py). Sent through the pipe, they cost the flow's process CPU to receive and
write while both cores were busy screening: at 1M synthetic chats on 2 cores (three runs each, taken
in turn), the flow's CPU during the screen went from 5.5-6.0 s to 3.8-4.0 s, the workers' from
53.2-54.9 s to 51.4-53.6 s, and the screen from 32.8-34.1 s to 31.0-32.3 s. While the rest is unpickled
and joined the cyclic garbage collector is paused, as during a read (tasks/ingest.py): the millions
of containers they hold are all alive, and each collection would walk them all again.

Faults: a worker that dies (killed, out of memory), or a pool that cannot start, breaks the pool; the
blocks whose results had not come back are then read again in this process, so the run completes with
the same outputs and no record read or counted twice. An exception raised by tuneline's own code in a
worker fails the run, as it would in this process (the same bytes fail the same way), and the blocks
not yet started are dropped.

Why the standard library's ProcessPoolExecutor and not Ray here: the local engine must work with
nothing beyond tuneline's own dependencies; the ray engine (ray_engine.py) is the same blocks on a
cluster.
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cache
from typing import Any

from tuneline import heap
from tuneline.config import Config
from tuneline.engines import blocks
from tuneline.tasks import ingest
from tuneline.threads import available_cpus

log = logging.getLogger(__name__)


@cache
def _fork_server() -> Any:
    """The fork-server context, its server preloading the block code (set before it first starts)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tuneline.engines.blocks"])
    return context


def screen_block_spilled(
    directory: str, files: Sequence[ingest.InputFile], *arguments: Any
) -> blocks.Screened:
    """A worker's task: blocks.screen_block, its texts in files of `directory` (Screened.spilled)."""
    return blocks.screen_block(files, *arguments).spilled(directory)


def screen(
    files: Sequence[ingest.InputFile], config: Config, eval_examples: Sequence[Any]
) -> blocks.Screened:
    """`files` read, validated and put through the per-record rules, on this machine's cores."""
    execution = config.execution
    arguments = (eval_examples, *blocks.block_arguments(config))
    planned = blocks.plan(files, execution)
    workers = min(len(planned), execution.workers or available_cpus())
    stores = blocks.BatchOnDisk()
    if workers <= 1 or sum(block.size for block in planned) <= execution.block_bytes:
        return blocks.concat([stores.stored(blocks.screen_block(list(files), *arguments))], stores)
    results: list[blocks.Screened | None] = [None] * len(planned)
    with heap.collector_paused():  # the results' containers are all alive (tuneline/heap.py)
        try:
            with (
                tempfile.TemporaryDirectory(prefix="tuneline-blocks-") as spill,
                ProcessPoolExecutor(workers, mp_context=_fork_server()) as pool,
            ):
                futures: list[Future[blocks.Screened] | None] = [
                    pool.submit(screen_block_spilled, spill, block.files, *arguments) for block in planned
                ]
                try:
                    for index, future in enumerate(futures):
                        # Let go of the future: it would keep the block's result in memory to the end.
                        futures[index] = None
                        assert future is not None
                        results[index] = stores.stored(future.result())
                        del future
                except BaseException:
                    # Nothing more is read once a block failed (or the run was interrupted).
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        except (BrokenProcessPool, OSError) as exc:
            missing = sum(result is None for result in results)
            log.warning(
                "local engine: a worker process died or could not start (%s); reading its %d block(s) "
                "again in this process",
                exc,
                missing,
            )
        for index, result in enumerate(results):
            if result is None:
                results[index] = stores.stored(blocks.screen_block(planned[index].files, *arguments))
        log.info(
            "local engine: %d file(s) in %d block(s) on %d process(es)", len(files), len(planned), workers
        )
        return blocks.concat([result for result in results if result is not None], stores)
