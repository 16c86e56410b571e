"""Execution engines of the data plane: where the per-partition work (ingest, validate, the credential
and PII screen, exact tokens) runs, a block of input at a time (tuneline/engines/blocks.py).

- `local` (the default, tuneline/engines/local.py): on this machine's cores, a pool of worker
  processes when there is more than one block's worth of input, else in the flow's own process;
  needs nothing beyond tuneline's own dependencies.
- `ray` (tuneline/engines/ray_engine.py, `pip install 'tuneline[ray]'`): each block as a Ray task
  (retried by Ray when its worker dies), on a local Ray or a cluster.

Either way a block is read, validated and put through the per-record rules of dedupe (credentials,
PII, eval leakage), the blocks' results are put back together in block order, and the batch-wide
rules (exact and near duplicates, contradictions) then run on the whole frame. Either engine gives
the same record frame, so the same training, validation and quarantine files and the same dataset
hash (blocks.py says why).

This module imports no Ray: the local engine works without it installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneline import heap, threads

if TYPE_CHECKING:
    from tuneline.config import Config, ExecutionConfig
    from tuneline.engines.blocks import Screened
    from tuneline.tasks.ingest import InputFile

Engine = Literal["local", "ray"]
ENGINES: tuple[Engine, ...] = ("local", "ray")


def ray_available() -> bool:
    """Whether the `ray` extra is installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def screen(files: Sequence[InputFile], config: Config, eval_examples: Sequence[Any]) -> Screened:
    """`files` read, validated and put through the per-record rules of dedupe (credentials and PII,
    leakage into `eval_examples`) by the configured engine, a block at a time."""
    if config.execution.engine == "ray":
        from tuneline.engines import ray_engine

        screened = ray_engine.screen(files, config, eval_examples)
    else:
        from tuneline.engines import local

        screened = local.screen(files, config, eval_examples)
    heap.release_free_memory()  # what the blocks' results took before they were put together
    return screened


def flow_threads(execution: ExecutionConfig) -> int:
    """Threads of the flow's process for the batch-wide rules (dedupe.batch_rules' `threads`):
    `execution.flow_threads`, else 1 with the ray engine (its flow's memory matters more than its
    time: the config says why) and the threads module's default otherwise."""
    if execution.flow_threads is not None:
        return execution.flow_threads
    return 1 if execution.engine == "ray" else threads.flow_threads()


def work_beside_the_flow(execution: ExecutionConfig) -> bool:
    """Whether a large batch's quarantine lines and quality check run in processes beside the flow's
    (tasks/export.py, tasks/quality.py): where the flow may use more than one core (flow_threads), as
    the local engine's flow does by default; the ray engine's keeps to its one process."""
    return flow_threads(execution) > 1


@task(name="screen", cache_policy=NO_CACHE, persist_result=False)
def screen_task(files: list[InputFile], config: Config, eval_examples: list[dict[str, Any]]) -> Screened:
    """Prefect wrapper of screen: ingest, validate and the per-record rules, block by block."""
    return screen(files, config, eval_examples)
