"""The `ray` execution engine: the per-partition work of the data plane as Ray tasks.

`screen(files, config, eval_examples)` runs one Ray task per block of tuneline/engines/blocks.py's
plan (files, or line-aligned parts of a large JSONL file), each reading and validating its block and
applying the per-record rules of dedupe (credentials, PII, eval leakage; `blocks.screen_block`). The
blocks' results come back in block order (pickled by the task itself: `screen_block_pickled` says
why), each one's raw texts and training lines go to the batch's store on the flow's disk as it arrives
(tuneline/text_store.py), and they are put together: what the local engine builds, row for row
(blocks.py says why). The batch-wide rules (rules 3 to 5 of tasks/dedupe.py, `batch_rules`) then run
on it in the flow, with the near-duplicate candidate search (LSH band keys of the signatures the
blocks made, candidate pairs) as map -> shuffle -> reduce Ray tasks (`RayCandidates`); the exact
check of the pairs, and the exact duplicates and contradictions, run in the flow's process.

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
import pickle
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tuneline import heap
from tuneline.config import Config, ConfigError, ExecutionConfig
from tuneline.engines import blocks
from tuneline.near_duplicates import (
    Banding,
    Signatures,
    band_bucket_pairs,
    band_keys,
    distinct_pair_codes,
    signature_rows,
)
from tuneline.tasks import ingest

log = logging.getLogger(__name__)

# Ray tasks of at most this many blocks at once per CPU of the cluster: the driver holds only the
# frames that came back, not every block's input at once, and the object store only the records of
# the near-duplicate map tasks that are running or about to.
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
        else:
            if execution.num_cpus:
                options["num_cpus"] = execution.num_cpus
            if execution.object_store_memory:
                options["object_store_memory"] = execution.object_store_memory
        try:
            ray.init(**options)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
            where = execution.address or "a local Ray"
            raise ConfigError(
                f"execution.address: could not connect to {where} ({_first_line(exc)}); "
                "start the cluster (`ray start --head`), fix the address, or set execution.address: null"
            ) from None
    return ray


def _in_flight(ray: Any) -> int:
    """How many tasks the driver keeps submitted at once (_IN_FLIGHT_PER_CPU per CPU of the cluster)."""
    return max(2, _IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def screen(
    files: Sequence[ingest.InputFile], config: Config, eval_examples: Sequence[Any]
) -> blocks.Screened:
    """`files` read, validated and put through the per-record rules by Ray tasks (one per block of
    tuneline/engines/blocks.py's plan)."""
    execution = config.execution
    planned = blocks.plan(files, execution)
    arguments = (eval_examples, *blocks.block_arguments(config))
    stores = blocks.BatchOnDisk()
    if not planned:  # nothing to read: the same empty result the local engine makes
        return blocks.concat([stores.stored(blocks.screen_block([], *arguments))], stores)
    ray = connect(execution)
    remote = ray.remote(screen_block_pickled).options(
        name="tuneline.screen_block", max_retries=execution.max_retries, retry_exceptions=False
    )
    shared = [ray.put(value) for value in arguments]
    limit = _in_flight(ray)
    pending: list[Any] = []
    results: list[blocks.Screened] = []
    # The frames' containers are all alive (tuneline/heap.py).
    with heap.collector_paused():
        for block in planned:
            pending.append(remote.remote(block.files, *shared))
            if len(pending) >= limit:
                results.append(stores.stored(pickle.loads(ray.get(pending.pop(0)))))
        while pending:
            results.append(stores.stored(pickle.loads(ray.get(pending.pop(0)))))
        log.info("ray engine: %d file(s) in %d task(s)", len(files), len(planned))
        return blocks.concat(results, stores)


def screen_block_pickled(files: Sequence[ingest.InputFile], *arguments: Any) -> bytes:
    """A block's task: blocks.screen_block, its result pickled here. The flow unpickles a copy, so
    Ray's object store lets the block go as soon as it is read: a result Ray deserialises itself keeps
    its numpy arrays as views into the store, and with them the whole block, its texts included
    (about 1.3 GB a million records, which the flow moves to disk), pinned in the flow's memory. The
    worker's free heap goes back to the OS before it waits for its next task (tuneline/heap.py), as
    after each of the search's map and reduce tasks: an idle worker kept up to 1.5 GB at 10M records."""
    result = pickle.dumps(blocks.screen_block(files, *arguments), protocol=pickle.HIGHEST_PROTOCOL)
    heap.release_free_memory()
    return result


# --------------------------------------------------------------------------------------------------
# Near-duplicate candidates: map -> shuffle -> reduce.


def map_block(
    signatures: np.ndarray, eligible: np.ndarray, start: int, banding: Banding, reducers: int
) -> Any:
    """Map: the band keys of one block of records (their signatures; `start` is its first record's
    index), and the band entries (record, key, next band's key) of its eligible records, split by
    reducer (key mod reducers: a bucket's entries all go to one reducer). Returns one list of per-band
    entries per reducer (separate objects: each reducer fetches only its own), or the one list itself
    for one reducer (Ray's single return value)."""
    keys = band_keys(signatures, banding)
    eligible = np.flatnonzero(eligible)
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
    del keys  # the block's band keys: the pieces hold what the reducers need
    heap.release_free_memory()
    return tuple(pieces) if reducers > 1 else pieces[0]


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
    codes = distinct_pair_codes(found)
    del found
    heap.release_free_memory()
    return codes


class RayCandidates:
    """The near-duplicate candidate search (tuneline/near_duplicates.py's CandidateSearch) on Ray: map
    tasks over the signatures of blocks of `execution.block_records` records, a shuffle of their band
    entries by bucket through Ray's object store (which spills to disk when it is full), and reduce
    tasks that pair the records of each bucket. Every bucket is whole in one reducer, so the pairs are
    exactly those of `candidate_pairs`; the agreement filter and the exact check then run on them as
    with the local engine.

    Reducers: `execution.shuffle_partitions`, else one per map task (at least one per CPU), so that
    one reducer's pairs are about a map block's worth; a few run at a time, and each one's pairs come
    back as a piece for the caller to filter (near_duplicates.AgreementFilter) as it comes: the batch's
    candidate pairs are never all held, here or in the object store."""

    def __init__(self, execution: ExecutionConfig) -> None:
        self.execution = execution

    def __call__(
        self, signatures: Signatures, eligible: np.ndarray, rank: np.ndarray, banding: Banding
    ) -> Iterator[np.ndarray]:
        ray = connect(self.execution)
        n = len(signatures)
        step = self.execution.block_records
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        reducers = self.execution.shuffle_partitions or max(cpus, -(-n // step))
        retries = {"max_retries": self.execution.max_retries, "retry_exceptions": False}
        mapper = ray.remote(map_block).options(
            name="tuneline.near_duplicates.map", num_returns=reducers, **retries
        )
        reducer = ray.remote(reduce_buckets).options(name="tuneline.near_duplicates.reduce", **retries)
        # Each map's signatures go to the object store as it is submitted, and leave it once it has
        # run: a few at a time, not all at once.
        limit = _in_flight(ray)
        maps: list[list[Any]] = []
        running: list[Any] = []
        for start in range(0, n, step):
            if len(running) >= limit:
                _, running = ray.wait(running, num_returns=1)
            stop = min(start + step, n)
            outputs = mapper.remote(
                signature_rows(signatures, slice(start, stop)), eligible[start:stop], start, banding, reducers
            )
            maps.append(list(outputs) if reducers > 1 else [outputs])
            running.append(maps[-1][0])
        rank_ref = ray.put(np.asarray(rank))
        running = []
        for r in range(reducers + 1):
            if r < reducers:
                running.append(reducer.remote(rank_ref, n, banding.bands, *[outputs[r] for outputs in maps]))
                for outputs in maps:
                    outputs[r] = None  # the reducer holds its entries: they leave once it has run
            while running and (len(running) >= limit or r == reducers):
                done, running = ray.wait(running, num_returns=1)
                codes = np.array(ray.get(done[0]))  # a copy: the object leaves the store
                del done
                yield codes
        log.info(
            "ray engine: near-duplicate candidates from %d map and %d reduce task(s)", len(maps), reducers
        )
