"""The `local` execution engine: the blocks of tuneline/engines/blocks.py on this machine's cores.

`screen(files, config, eval_examples)` does everything in the flow's own process when there is one
block's worth of input (`execution.block_bytes`) or one worker (`execution.workers: 1`). Otherwise the
blocks run in a pool of `execution.workers` processes (default: one per core this process may use),
and their results come back in block order: what a single pass makes, row for row (blocks.py says
why). Reading, format checks, token counts, the credential screen, leakage and normalisation are
Python work that one process does on one core at a time; the pool is what puts every core to work.

How the workers start: from the fork server (tuneline/fork_server.py), which a worker is forked
from with the block code imported already. Its first start in a process imports that code on one core
(1.9 s here): meanwhile this process plans the blocks and then screens blocks itself, from the last one
back, until the server is up, and the pool gets the blocks before those (`_screened_while_starting`).
At 1M synthetic chats on 2 cores (three runs each, old and new code in turn) that start had left a
core idle for about 3 s, and the screen went from 30.5-31.9 s to 30.1-30.4 s. Where a worker cannot
start, the blocks are read in the flow's process.

A block's result comes back pickled in a file of a temporary directory of the screen's, never
through the pool's pipe (fork_server.called says why: a worker killed while writing to the pipe had
hung the run). Its raw texts, training lines and normalised texts have files of their own there
(blocks.Screened.spilled), which the flow copies into the batch's store on disk as the block's result
arrives (tuneline/text_store.py). Sent in the result, the texts cost the flow's process CPU to take in
and write while both cores were busy screening: at 1M synthetic chats on 2 cores (three runs each, taken
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
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from threading import Event
from typing import Any

from tuneline import fork_server, heap
from tuneline.config import Config
from tuneline.engines import blocks
from tuneline.tasks import ingest
from tuneline.threads import available_cpus

log = logging.getLogger(__name__)


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
    planned = blocks.plan(files, execution)
    workers = min(len(planned), execution.workers or available_cpus())
    stores = blocks.BatchOnDisk()
    if workers <= 1 or sum(block.size for block in planned) <= execution.block_bytes:
        arguments = (eval_examples, *blocks.block_arguments(config))
        return blocks.concat([stores.stored(blocks.screen_block(list(files), *arguments))], stores)
    started = fork_server.started_in_background()
    arguments = (eval_examples, *blocks.block_arguments(config))
    results: list[blocks.Screened | None] = [None] * len(planned)
    with heap.collector_paused():  # the results' containers are all alive (tuneline/heap.py)
        here = _screened_while_starting(planned, arguments, started)
        pooled = len(planned) - len(here)
        try:
            with (
                tempfile.TemporaryDirectory(prefix="tuneline-blocks-") as spill,
                ProcessPoolExecutor(workers, mp_context=fork_server.context()) as pool,
            ):
                futures: list[Future[fork_server.Returned[blocks.Screened]] | None] = [
                    pool.submit(
                        fork_server.called, spill, screen_block_spilled, spill, block.files, *arguments
                    )
                    for block in planned[:pooled]
                ]
                try:
                    for index, future in enumerate(futures):
                        # Let go of the future: it would keep the block's result in memory to the end.
                        futures[index] = None
                        assert future is not None
                        results[index] = stores.stored(future.result().value())
                        del future
                except BaseException:
                    # Nothing more is read once a block failed (or the run was interrupted).
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        except (BrokenProcessPool, OSError) as exc:
            missing = sum(result is None for result in results[:pooled])
            log.warning(
                "local engine: a worker process died or could not start (%s); reading its %d block(s) "
                "again in this process",
                exc,
                missing,
            )
        # In block order, as the batch's signature store needs them: those screened here while the
        # server started, and any the pool did not bring back.
        for index, result in enumerate(results):
            if result is None:
                own = (
                    here.pop(index)
                    if index in here
                    else blocks.screen_block(planned[index].files, *arguments)
                )
                results[index] = stores.stored(own)
        log.info(
            "local engine: %d file(s) in %d block(s) on %d process(es), %d of them here while the "
            "fork server started",
            len(files),
            len(planned),
            workers,
            len(planned) - pooled,
        )
        return blocks.concat([result for result in results if result is not None], stores)


def _screened_while_starting(
    planned: Sequence[blocks.Block], arguments: tuple[Any, ...], started: Event
) -> dict[int, blocks.Screened]:
    """Blocks screened in this process, from the last one back, until `started` (the fork server
    forks workers) is set: by block index, their texts still in memory (they join the batch's stores
    after the pool's blocks, in block order). None where the server ran before in this process."""
    here: dict[int, blocks.Screened] = {}
    index = len(planned)
    while index > 0 and not started.is_set():
        index -= 1
        here[index] = blocks.screen_block(planned[index].files, *arguments)
    return here
