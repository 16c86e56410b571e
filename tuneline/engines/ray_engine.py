"""The `ray` execution engine: the per-partition work of the data plane as Ray tasks.

`screen(files, config)` splits the selected input files into blocks (`execution.files_per_task` files
each, in the order `ingest.select_files` sorted them), and runs one Ray task per block that reads the
files (tasks/ingest.py's `read_files`), applies the format rules and counts exact tokens
(tasks/validate.py's `validate`) and screens for credentials and PII (tasks/dedupe.py's
`credentials_and_pii`, rule 1). The blocks' frames come back in block order and are concatenated: the
frame the local engine builds, row for row (see tuneline/engines/__init__.py for why). The batch-wide
rules (rules 2 to 5 of tasks/dedupe.py) then run on it in the flow, `screened=True`.

Faults: a task whose worker process dies (killed, out of memory, its node lost) is run again by Ray,
up to `execution.max_retries` times, on the same block; only the finished attempt's frame is ever
returned, so no record is read or counted twice. An exception raised by tuneline's own code is not
retried (the same bytes fail the same way): it fails the run, as it would with the local engine.

Why plain `ray.remote` tasks called from a Prefect task, rather than prefect-ray's `RayTaskRunner`
(prefect-ray 0.6.0 installs and runs a flow's tasks on Ray with Prefect 3.9 here): the runner turns each Prefect task into a Ray task, but the prepare flow's tasks write MLflow runs
and Prefect's cached results to the driver's disk (the backfill's per-date tasks above all), and
their inputs and outputs are whole record frames, which the runner would move through Prefect's
result machinery for every task. Here the Prefect task stays on the flow's machine (its state,
logs, MLflow run and caching unchanged) and only the CPU-bound work, which reads input URLs and
returns a frame, runs on the cluster; Ray workers never need to reach the Prefect API. Backfill dates are still prepared in parallel as tasks of one
flow (tuneline/flows/backfill.py), each fanning its blocks out to the same cluster.

Ray is imported inside the functions: this module imports without the `ray` extra installed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneline import records
from tuneline.config import (
    Config,
    ConfigError,
    CsvMapping,
    DedupeConfig,
    ExecutionConfig,
    ModelConfig,
    ValidationConfig,
)
from tuneline.tasks import dedupe, ingest, validate

log = logging.getLogger(__name__)

# Ray tasks of at most this many files at once per CPU of the cluster: the driver holds only the
# frames that came back, not every block's input at once.
_IN_FLIGHT_PER_CPU = 2

_init_lock = threading.Lock()


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "execution.engine: ray needs the Ray extra (pip install 'tuneline[ray]'), "
            "or set execution.engine: local"
        ) from None
    return ray


def connect(execution: ExecutionConfig) -> Any:
    """The `ray` module, connected: to the Ray this process already joined (ray.init called before),
    else to `execution.address`, else to a local Ray started now. One line naming the key on failure."""
    ray = _ray()
    with _init_lock:
        if ray.is_initialized():
            return ray
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if execution.address:
            options["address"] = execution.address
        elif execution.num_cpus:
            options["num_cpus"] = execution.num_cpus
        try:
            ray.init(**options)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            where = execution.address or "a local Ray"
            raise ConfigError(
                f"execution.address: could not connect to {where} ({_first_line(exc)}); "
                "start the cluster (`ray start --head`), fix the address, or set execution.address: null"
            ) from None
    return ray


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def screen_block(
    files: Sequence[ingest.InputFile],
    system_prompt: str | None,
    csv_fallbacks: Sequence[CsvMapping],
    model: ModelConfig,
    validation: ValidationConfig,
    dedupe_config: DedupeConfig,
) -> pd.DataFrame:
    """What one Ray task does: a block of files read, validated and screened (rule 1)."""
    frame = ingest.read_files(files, system_prompt, csv_fallbacks)
    frame = validate.validate(frame, model, validation)
    return dedupe.credentials_and_pii(frame, dedupe_config)


def blocks(files: Sequence[ingest.InputFile], files_per_task: int) -> list[list[ingest.InputFile]]:
    """The files in consecutive blocks of `files_per_task`, in order."""
    return [list(files[i : i + files_per_task]) for i in range(0, len(files), files_per_task)]


def screen(files: Sequence[ingest.InputFile], config: Config) -> pd.DataFrame:
    """The record frame of `files`, validated and screened, built by Ray tasks (one per block)."""
    execution = config.execution
    parts = blocks(files, execution.files_per_task)
    if not parts:  # nothing to read: the same empty frame the local engine makes
        return screen_block([], *_arguments(config))
    ray = connect(execution)
    remote = ray.remote(screen_block).options(
        name="tuneline.screen_block", max_retries=execution.max_retries, retry_exceptions=False
    )
    shared = [ray.put(value) for value in _arguments(config)]
    limit = max(2, _IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    frames: list[pd.DataFrame] = []
    for block in parts:
        pending.append(remote.remote(block, *shared))
        if len(pending) >= limit:
            frames.append(ray.get(pending.pop(0)))
    while pending:
        frames.append(ray.get(pending.pop(0)))
    log.info("ray engine: %d file(s) in %d task(s)", len(files), len(parts))
    return concat(frames)


def _arguments(config: Config) -> tuple[Any, ...]:
    fallbacks = [s.csv_mapping for s in config.data.sources if s.csv_mapping is not None]
    return (config.model.system_prompt, fallbacks, config.model, config.validation, config.dedupe)


def concat(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Block frames as one frame, row order kept, index 0..n-1 (as one read_files call makes it).
    Empty blocks are left out, so their column types never widen the others'."""
    full = [f for f in frames if len(f)]
    if not full:
        return frames[0]
    if len(full) == 1:
        return full[0]
    frame = pd.concat(full, ignore_index=True)
    assert list(frame.columns) == list(full[0].columns), "blocks disagree on their columns"
    return frame


@task(name="screen", cache_policy=NO_CACHE, persist_result=False)
def screen_task(files: list[ingest.InputFile], config: Config) -> pd.DataFrame:
    """Prefect wrapper of screen: ingest, validate and rule 1 of dedupe, on Ray."""
    frame = screen(files, config)
    log.debug("screened: %s", records.counts_by_reason(frame))
    return frame
