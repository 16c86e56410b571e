"""The `ray` execution engine: the per-partition work of the data plane as Ray tasks.

`screen(files, config)` splits the selected input files into blocks (`execution.files_per_task` files
each, in the order `ingest.select_files` sorted them), and runs one Ray task per block that reads the
files (tasks/ingest.py's `read_files`), applies the format rules and counts exact tokens
(tasks/validate.py's `validate`) and screens for credentials and PII (tasks/dedupe.py's
`credentials_and_pii`, rule 1). The blocks' frames come back in block order and are concatenated: the
frame the local engine builds, row for row (see tuneline/engines/__init__.py for why). The batch-wide
rules (rules 2 to 5 of tasks/dedupe.py) then run on it in the flow, `screened=True`, with the
near-duplicate candidate search (signatures, LSH bands, candidate pairs: most of rule 4's work) as
map -> shuffle -> reduce Ray tasks (`RayCandidates`); the exact check of the pairs, and the exact
duplicates, leakage and contradictions, run in the flow's process.

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

import numpy as np
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
from tuneline.near_duplicates import (
    Banding,
    Documents,
    band_bucket_pairs,
    band_keys,
    distinct_pair_codes,
    sketches,
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
    method: str = "supervised",
) -> pd.DataFrame:
    """What one Ray task does: a block of files read, validated (as lines of a `method` training file)
    and screened (rule 1)."""
    frame = ingest.read_files(files, system_prompt, csv_fallbacks)
    frame = validate.validate(frame, model, validation, method)
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
    return (
        config.model.system_prompt,
        fallbacks,
        config.model,
        config.validation,
        config.dedupe,
        config.training.method,
    )


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


# --------------------------------------------------------------------------------------------------
# Near-duplicate candidates: map -> shuffle -> reduce.


def map_block(
    documents: Documents, start: int, num_perm: int, shingle_size: int, banding: Banding, reducers: int
) -> tuple[Any, ...]:
    """Map: the MinHash signatures and band keys of one block of records (`start` is its first
    record's index), and the band entries (record, key, next band's key) of its records with words,
    split by reducer (key mod reducers: a bucket's entries all go to one reducer). Returns the
    signatures, then one list of per-band entries per reducer (separate objects: each reducer
    fetches only its own)."""
    signatures, word_counts = sketches(documents, num_perm, shingle_size)
    keys = band_keys(signatures, banding)
    eligible = np.flatnonzero(word_counts > 0)
    records = start + eligible
    pieces: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(reducers)]
    for band in range(banding.bands):
        key = keys[band, eligible]
        following = keys[(band + 1) % banding.bands, eligible]
        target = (key % np.uint64(reducers)).astype(np.int64)
        order = np.argsort(target, kind="stable")
        bounds = np.searchsorted(target[order], np.arange(reducers + 1))
        for reducer in range(reducers):
            chosen = order[bounds[reducer] : bounds[reducer + 1]]
            pieces[reducer].append((records[chosen], key[chosen], following[chosen]))
    return (signatures, *pieces)


def reduce_buckets(rank: np.ndarray, n: int, bands: int, *pieces: Any) -> np.ndarray:
    """Reduce: the candidate pairs of the buckets one reducer holds (every entry of each, from every
    map task), as distinct pair codes (later * n + earlier)."""
    found: list[np.ndarray] = []
    for band in range(bands):
        parts = [piece[band] for piece in pieces]
        found.extend(
            band_bucket_pairs(
                np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]),
                rank,
                n,
            )
        )
    return distinct_pair_codes(found)


class RayCandidates:
    """The near-duplicate candidate search (tuneline/near_duplicates.py's CandidateSearch) on Ray: map
    tasks over blocks of `execution.block_records` records, a shuffle of their band entries by bucket
    through Ray's object store (which spills to disk when it is full), reduce tasks that pair the
    records of each bucket, and their union here. Every bucket is whole in one reducer, so the pairs
    are exactly those of `candidate_pairs`; the exact check then runs on them as with the local engine."""

    def __init__(self, execution: ExecutionConfig) -> None:
        self.execution = execution

    def __call__(
        self, documents: Documents, rank: np.ndarray, num_perm: int, shingle_size: int, banding: Banding
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ray = connect(self.execution)
        n = len(documents)
        reducers = self.execution.shuffle_partitions or max(1, int(ray.cluster_resources().get("CPU", 1)))
        retries = {"max_retries": self.execution.max_retries, "retry_exceptions": False}
        mapper = ray.remote(map_block).options(
            name="tuneline.near_duplicates.map", num_returns=reducers + 1, **retries
        )
        reducer = ray.remote(reduce_buckets).options(name="tuneline.near_duplicates.reduce", **retries)
        step = self.execution.block_records
        maps = [
            mapper.remote(
                documents.detached(start, min(start + step, n)),
                start,
                num_perm,
                shingle_size,
                banding,
                reducers,
            )
            for start in range(0, n, step)
        ]
        rank_ref = ray.put(np.asarray(rank))
        reduced = [
            reducer.remote(rank_ref, n, banding.bands, *[outputs[1 + r] for outputs in maps])
            for r in range(reducers)
        ]
        signatures = np.concatenate(ray.get([outputs[0] for outputs in maps]))
        codes = distinct_pair_codes(ray.get(reduced))
        log.info(
            "ray engine: near-duplicate candidates from %d map and %d reduce task(s)", len(maps), reducers
        )
        return signatures, codes // n, codes % n


@task(name="screen", cache_policy=NO_CACHE, persist_result=False)
def screen_task(files: list[ingest.InputFile], config: Config) -> pd.DataFrame:
    """Prefect wrapper of screen: ingest, validate and rule 1 of dedupe, on Ray."""
    frame = screen(files, config)
    log.debug("screened: %s", records.counts_by_reason(frame))
    return frame
