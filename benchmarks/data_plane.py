"""Data-plane throughput: N synthetic support chats through ingest -> validate -> dedupe -> quality -> export.

The N lines come from tuneline.demo.synthetic.synthetic_chat_lines (about 5% dirt: exact duplicates,
near-duplicates, malformed JSON, format errors) and are written to a temporary JSONL file, which the
real stages then read as the prepare flow does, with the local engine: `screen` (ingest, validate and
the per-record rules of dedupe, block by block in `--workers` processes, default one per core;
`--workers 1`: all in this process), `dedupe` (the batch-wide rules), quality, export; only their
functions are called (no Prefect). The `screen` time includes starting the workers (and, the first
time in a process, their fork server). Printed: wall time per stage, examples/s, peak memory (max RSS
of this process, and the peak of its PSS summed with its workers', sampled every `--memory-interval`
seconds, default 1: see TreeMemory for what sampling costs; both before the baselines run), and two
ratios measured in the same run:

- tokenizer-bound: our examples/s over the examples/s of one raw tiktoken `encode_ordinary_batch`
  (all cores) over the message texts of the same examples (target >= 0.3); for reference, also over
  `encode_ordinary` called text by text (no thread pool) on the naive loop's sample;
- naive loop: our examples/s over a per-example Python loop doing what the OpenAI cookbook does
  (json.loads, its format-error checks, `num_tokens_from_messages` with tiktoken). The loop runs over
  the first `--naive-sample` lines (default 100,000), since its cost per example is constant,
  `--naive-runs` times (default 3) before the pipeline and as many times after it; its rate is the
  median of those runs (one run varies by up to a third from the next on the 2-core dev machine, and
  a single run after the pipeline made the ratio swing by as much between two benchmarks).

Near-duplicate recall (not timed): on the exact-duplicate survivors of the first `--recall-sample`
lines (default 10,000), find_near_duplicates against the exact answer of an all-pairs similarity
join (exact_near_duplicates: prefix filtering, every pair confirmed on the words), decided by the same
rule in rank order; printed as found / expected.

`--scaling` also times near-duplicate detection alone (tuneline.near_duplicates.find_near_duplicates
on the records that survive exact-duplicate removal, as in the stage) on N (the fastest of three runs)
and on 10N records of the same generator, and prints the time ratio (target <= 12: linear).

`--engine ray` (needs `pip install 'tuneline[ray]'`) writes the N lines as `--files` partition files
instead of one, and runs the pipeline twice on them: with the ray engine (ingest, validate and the
per-record rules of dedupe as Ray tasks on a local Ray of `--ray-cpus` CPUs, started before the clock
starts, and the near-duplicate candidates by map -> shuffle -> reduce on Ray; the rest of dedupe,
quality and export in this process, as tuneline/engines/ray_engine.py does) and with the local
engine (its default worker processes); it prints both engines' examples/s, their ratio, whether their training, validation and
quarantine files are byte-identical, and each run's peak memory summed over this process and its Ray
processes (PSS, so the shared object store is counted once). The cookbook baselines and the recall
are skipped with `--engine ray`; `--ray-only` skips the local engine's run too (ten million examples
took 17 to 23 minutes with the ray engine on the 2-core dev machine), and `--object-store-gib` caps
Ray's object store, which then spills to disk.

    .venv/bin/python benchmarks/data_plane.py 100000 [--scaling] [--seed 0] [--naive-sample 100000]
        [--naive-runs 3] [--workers N] [--memory-interval 1.0]
    .venv/bin/python benchmarks/data_plane.py 1000000 --engine ray [--files 16] [--ray-cpus 2]
        [--object-store-gib 1] [--ray-only]

Targets (issues 3 and 20, on the 2-core dev machine): 1,000,000 examples in <= 5 minutes, peak memory
<= 8 GiB; ours / naive loop >= 1.0 (issue 20), recall not below 1.0000 on the default sample (measured
before the issue-20 changes: 127 of 127 on 9,759 records).

One script (~600 lines) on purpose: the pipeline and both baselines, the recall check, the --scaling
run and the two engines are each measured on the same examples in the same run, which is what makes
their ratios meaningful.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import tiktoken

from tuneline import engines, heap, records
from tuneline.config import Source, load_config
from tuneline.demo.synthetic import synthetic_chat_lines
from tuneline.near_duplicates import (
    Documents,
    TextTable,
    find_exact_duplicates,
    find_near_duplicates,
    shingles_of_words,
)
from tuneline.normalize import jaccard, word_shingles
from tuneline.tasks import dedupe, export, ingest, quality
from tuneline.tokens import encoding_name_for_model, get_encoding

T = TypeVar("T")


def timed(label: str, timings: dict[str, float], run: Callable[[], T]) -> T:
    start = time.perf_counter()
    result = run()
    timings[label] = time.perf_counter() - start
    print(
        f"  {label:<10} {timings[label]:8.2f} s   memory after: {rss_gib():.2f} GiB, peak so far {peak_rss_gib():.2f} GiB",
        flush=True,
    )
    return result


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024)  # Linux: KiB


def rss_gib() -> float:
    """The resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def write_lines(n: int, seed: int, directory: Path) -> Path:
    path = directory / "synthetic.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        handle.writelines(synthetic_chat_lines(n, seed=seed))
    return path


def run_pipeline(
    path: Path, out_dir: Path, workers: int | None = None
) -> tuple[dict[str, float], dict[str, int]]:
    return run_pipeline_on([Source(name="benchmark", uri=str(path))], out_dir, workers)


def run_pipeline_on(
    sources: list[Source], out_dir: Path, workers: int | None = None
) -> tuple[dict[str, float], dict[str, int]]:
    """The prepare flow's stages with the local engine (`workers` processes; None: one per core)."""
    config = load_config(overrides={"execution.workers": workers} if workers else None)
    timings: dict[str, float] = {}
    eval_examples = [json.loads(line) for line in Path(config.data.eval_set).read_text().splitlines()]
    files = ingest.select_files(sources, date(2026, 11, 22), 1).files
    # Ingest, validate and the per-record rules, block by block on every core (tuneline/engines/local.py),
    # then the batch-wide rules, as the prepare flow runs them.
    screened = timed("screen", timings, lambda: engines.screen(files, config, eval_examples))
    checking = quality.QualityCheck.for_batch(len(screened.frame), config.execution)  # as prepare does
    frame = timed(
        "dedupe",
        timings,
        functools.partial(
            dedupe.batch_rules,
            screened.frame,
            screened.documents,
            config.dedupe,
            threads=engines.flow_threads(config.execution),
        ),
    )
    texts = screened.texts
    del screened  # as the prepare flow does: the normalised texts end with the batch rules
    return _finish(frame, texts, config, timings, out_dir, checking)


def _finish(
    frame: Any, texts: Any, config: Any, timings: dict[str, float], out_dir: Path, checking: Any
) -> tuple[dict[str, float], dict[str, int]]:
    """The quality check (where `checking`, a quality.QualityCheck, runs it) and the export (both
    engines run them from this process)."""
    heap.release_free_memory()  # as the prepare flow does once the batch rules are done
    # As the prepare flow does: beside the flow, the check runs while export builds the dataset (its
    # stage's time is then its start; the export's includes any wait for it), else first, here.
    waiting = ThreadPoolExecutor(1)

    def started() -> Future[Any]:
        if checking.beside:
            return waiting.submit(checking.check, frame, config.model, config.validation)
        done: Future[Any] = Future()
        done.set_result(checking.check(frame, config.model, config.validation))
        return done

    checked = timed("quality", timings, started)

    def judged() -> tuple[list[str], str]:
        verdict = checked.result()
        return ([] if verdict.success else ["failed"]), quality.render_report(verdict)

    context = export.RunContext(
        as_of="2026-11-22", config_hash=config.config_hash(), sources=[], partitions=[]
    )
    timed(
        "export",
        timings,
        lambda: export.export(
            frame,
            config,
            context,
            out_dir,
            quality=judged,
            texts=texts,
        ),
    )
    waiting.shutdown()
    texts.close()
    counts = {
        "input": len(frame),
        "kept": int(records.kept_mask(frame).sum()),
        **records.counts_by_reason(frame),
    }
    return timings, counts


def write_parts(n: int, seed: int, directory: Path, files: int) -> Path:
    """The N lines of write_lines as `files` partition files of about equal size, in one folder."""
    folder = directory / "parts"
    folder.mkdir(parents=True)
    per_file = -(-n // files)
    lines = synthetic_chat_lines(n, seed=seed)
    for index in range(files):
        chunk = list(itertools.islice(lines, per_file))
        if not chunk:
            break
        (folder / f"part-{index:05d}.jsonl").write_text("".join(chunk), encoding="utf-8")
    chunk = []
    heap.release_free_memory()  # the generator's garbage (a GB at ten million lines) is not the pipeline's
    return folder


class TreeMemory:
    """The peak memory of this process and its children (Ray's raylet, object store, workers) while a
    block runs: the sum of their PSS (/proc/PID/smaps_rollup), so shared pages count once, sampled
    every `interval` seconds (--memory-interval). Reading a process's smaps_rollup walks its page
    tables, 11 to 17 ms for a process of 1 to 1.5 GB here, while its memory map is locked: sampled
    every 0.25 s, it slowed the pipeline it measured by 5 to 20% (screen, dedupe and quality of 1M,
    50.3 and 52.1 s unsampled, 55.0 and 62.1 s at 0.25 s, 52.3 and 53.0 s at 1 s)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def now() -> float:
        import psutil

        me = psutil.Process()
        total = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                with open(f"/proc/{process.pid}/smaps_rollup") as handle:
                    for line in handle:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                            break
            except OSError:
                continue
        return total / 2**30

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(self.interval)


def run_ray_pipeline(folder: Path, out_dir: Path) -> tuple[dict[str, float], dict[str, int]]:
    """run_pipeline with the ray engine: ingest, validate and the per-record rules of dedupe as Ray
    tasks, and the near-duplicate candidates by map -> shuffle -> reduce on Ray."""
    from tuneline.engines import ray_engine

    config = load_config(overrides={"execution.engine": "ray"})
    timings: dict[str, float] = {}
    eval_examples = [json.loads(line) for line in Path(config.data.eval_set).read_text().splitlines()]
    files = ingest.select_files([Source(name="benchmark", uri=str(folder))], date(2026, 11, 22), 1).files
    # engines.screen, as the prepare flow calls it (it runs ray_engine.screen for this config).
    screened = timed("screen", timings, lambda: engines.screen(files, config, eval_examples))
    search = ray_engine.RayCandidates(config.execution)
    checking = quality.QualityCheck.for_batch(len(screened.frame), config.execution)
    frame = timed(
        "dedupe",
        timings,
        functools.partial(
            dedupe.batch_rules,
            screened.frame,
            screened.documents,
            config.dedupe,
            search,
            engines.flow_threads(config.execution),
        ),
    )
    texts = screened.texts
    del screened  # as the prepare flow does: the normalised texts end with the batch rules
    return _finish(frame, texts, config, timings, out_dir, checking)


def first_lines(path: Path, n: int) -> list[str]:
    """The first n lines of a file, without their newlines."""
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in itertools.islice(handle, n)]


def message_texts(lines: Iterable[str]) -> list[str]:
    texts: list[str] = []
    for line in lines:
        try:
            example = json.loads(line)
        except ValueError:
            continue
        for message in example.get("messages") or ():
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
    return texts


def cookbook_rate(lines: list[str], encoding: Any) -> float:
    """Examples per second of one run of cookbook_loop over `lines`."""
    start = time.perf_counter()
    cookbook_loop(lines, encoding)
    return len(lines) / (time.perf_counter() - start)


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{rate:,.0f}" for rate in rates)


def cookbook_loop(lines: list[str], encoding: Any) -> int:
    """The OpenAI cookbook's chat fine-tuning data checks and token counts, one example at a time."""
    format_errors: dict[str, int] = defaultdict(int)
    total_tokens = 0
    for line in lines:
        try:
            ex = json.loads(line)
        except ValueError:
            format_errors["invalid_json"] += 1
            continue
        if not isinstance(ex, dict):
            format_errors["data_type"] += 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            format_errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                format_errors["message_missing_key"] += 1
            if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
                format_errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                format_errors["unrecognized_role"] += 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, str):
                format_errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            format_errors["example_missing_assistant_message"] += 1
        num_tokens = 0
        for message in messages:
            num_tokens += 3
            for key, value in message.items():
                if isinstance(value, str):
                    num_tokens += len(encoding.encode(value))
                if key == "name":
                    num_tokens += 1
        total_tokens += num_tokens + 3
    return total_tokens


def near_duplicate_seconds(n: int, seed: int, config: Any) -> tuple[float, int, int]:
    """Seconds find_near_duplicates takes on the exact-duplicate survivors of n synthetic lines."""
    examples = []
    for line in synthetic_chat_lines(n, seed=seed):
        try:
            examples.append(json.loads(line))
        except ValueError:
            continue
    table = TextTable()
    documents, _, _ = dedupe.normalized_documents(examples, table)
    rank = np.arange(len(documents))
    survivors = np.flatnonzero(find_exact_duplicates(documents, rank) < 0)
    subset = documents.subset(survivors)
    del examples
    gc.collect()
    start = time.perf_counter()
    result = find_near_duplicates(
        subset,
        rank[survivors],
        threshold=config.near_duplicate_threshold,
        num_perm=config.num_perm,
        shingle_size=config.shingle_size,
    )
    seconds = time.perf_counter() - start
    return seconds, len(subset), int((result.duplicate_of >= 0).sum())


def exact_near_duplicates(
    documents: Documents, rank: np.ndarray, *, threshold: float, shingle_size: int
) -> np.ndarray:
    """The near-duplicate rule answered exactly, with no sketch: every pair of records at word-shingle
    Jaccard >= threshold, found by an all-pairs similarity join with prefix filtering (a pair that
    shares a fraction t of its shingles shares one of the first |x| - ceil(t |x|) + 1 shingles of
    each record in one global order, rarest first) and confirmed on the words; then the records are
    decided in rank order against earlier kept records, as find_near_duplicates decides them.
    Returns duplicate_of (-1: kept)."""
    n = len(documents)
    words, offsets = documents.words()
    shingles, shingle_offsets = shingles_of_words(words, offsets, shingle_size)
    owner = np.repeat(np.arange(n), np.diff(shingle_offsets))
    order = np.lexsort((shingles, owner))
    shingles, owner = shingles[order], owner[order]
    distinct = np.ones(len(shingles), dtype=bool)
    distinct[1:] = (shingles[1:] != shingles[:-1]) | (owner[1:] != owner[:-1])
    shingles, owner = shingles[distinct], owner[distinct]
    sizes = np.bincount(owner, minlength=n)
    by_record = shingles.copy()  # distinct, grouped by record
    # The global order: rarest shingle first (ties by hash).
    values, which, frequency = np.unique(shingles, return_inverse=True, return_counts=True)
    position_of = np.empty(len(values), dtype=np.int64)
    position_of[np.lexsort((values, frequency))] = np.arange(len(values))
    global_position = position_of[which]
    order = np.lexsort((global_position, owner))
    global_position, owner = global_position[order], owner[order]
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=starts[1:])
    at = np.arange(len(owner)) - starts[owner]
    prefix = sizes - np.ceil(threshold * sizes - 1e-9).astype(np.int64) + 1
    chosen = at < prefix[owner]
    # Records that share a prefix shingle: every pair within each group of equal shingles.
    group_order = np.argsort(global_position[chosen], kind="stable")
    keys, members = global_position[chosen][group_order], owner[chosen][group_order]
    group_end = np.searchsorted(keys, keys, side="right")
    codes: list[np.ndarray] = []
    index = np.arange(len(keys))
    distance = 1
    while True:
        within = index[index + distance < group_end]
        if not len(within):
            break
        a, b = members[within], members[within + distance]
        later_first = rank[a] > rank[b]
        codes.append(np.where(later_first, a, b) * n + np.where(later_first, b, a))
        distance += 1
    pairs = np.unique(np.concatenate(codes)) if codes else np.zeros(0, dtype=np.int64)
    # Verified on the 64-bit shingle hashes, then (near the threshold and above) on the words.
    hashed = [frozenset(by_record[starts[r] : starts[r + 1]].tolist()) for r in range(n)]
    words_of: dict[int, frozenset[tuple[str, ...]]] = {}

    def exact(record: int) -> frozenset[tuple[str, ...]]:
        found = words_of.get(record)
        if found is None:
            found = words_of[record] = word_shingles(documents.text(record), shingle_size)
        return found

    similar: dict[int, list[int]] = {}  # later -> earlier records at or above the threshold
    for later, earlier in zip((pairs // n).tolist(), (pairs % n).tolist(), strict=True):
        close = jaccard(hashed[later], hashed[earlier]) >= threshold - 0.01  # type: ignore[arg-type]
        if close and jaccard(exact(later), exact(earlier)) >= threshold:
            similar.setdefault(later, []).append(earlier)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    for later in sorted(similar, key=lambda record: rank[record]):
        kept = [e for e in similar[later] if duplicate_of[e] < 0]
        if kept:
            duplicate_of[later] = min(kept, key=lambda record: rank[record])
    return duplicate_of


def near_duplicate_recall(n: int, seed: int, config: Any) -> None:
    """find_near_duplicates against exact_near_duplicates on the exact-duplicate survivors of the first
    n synthetic lines; prints recall and what was reported beyond the exact answer."""
    examples = []
    for line in synthetic_chat_lines(n, seed=seed):
        try:
            examples.append(json.loads(line))
        except ValueError:
            continue
    table = TextTable()
    documents, _, _ = dedupe.normalized_documents(examples, table)
    rank = np.arange(len(documents))
    survivors = np.flatnonzero(find_exact_duplicates(documents, rank) < 0)
    subset = documents.subset(survivors)
    start = time.perf_counter()
    truth = exact_near_duplicates(
        subset, rank[survivors], threshold=config.near_duplicate_threshold, shingle_size=config.shingle_size
    )
    seconds = time.perf_counter() - start
    found = find_near_duplicates(
        subset,
        rank[survivors],
        threshold=config.near_duplicate_threshold,
        num_perm=config.num_perm,
        shingle_size=config.shingle_size,
    ).duplicate_of
    expected, reported = truth >= 0, found >= 0
    recall = (expected & reported).sum() / max(1, expected.sum())
    print(
        f"near-duplicate recall against the exact all-pairs answer ({len(subset):,} records, "
        f"{seconds:.1f} s): {int((expected & reported).sum()):,} of {int(expected.sum()):,} found, "
        f"recall {recall:.4f}; {int((reported & ~expected).sum())} reported beyond it (each an exact "
        f"match to a record the search kept)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("n", type=int, help="number of synthetic examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--naive-sample", type=int, default=100_000)
    parser.add_argument(
        "--naive-runs",
        type=int,
        default=3,
        help="runs of the naive loop before the pipeline, and as many after",
    )
    parser.add_argument(
        "--scaling", action="store_true", help="also time near-duplicate detection at N and 10N"
    )
    parser.add_argument(
        "--recall-sample",
        type=int,
        default=10_000,
        help="lines whose near-duplicates are also found exactly, for the recall (0: skip); the "
        "exact answer costs about quadratic time in them",
    )
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument(
        "--workers", type=int, default=None, help="local engine processes (default: one per core)"
    )
    parser.add_argument("--files", type=int, default=16, help="partition files (--engine ray)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument(
        "--object-store-gib",
        type=float,
        default=None,
        help="size of the local Ray's object store, beyond which it spills to disk (default: Ray's, 30%% of memory)",
    )
    parser.add_argument(
        "--ray-only", action="store_true", help="with --engine ray: run the ray engine alone (no local run)"
    )
    parser.add_argument(
        "--memory-interval",
        type=float,
        default=1.0,
        help="seconds between samples of the process tree's PSS (each sample costs the pipeline time)",
    )
    args = parser.parse_args()
    if args.engine == "ray":
        compare_engines(args)
        return
    config = load_config()
    print(
        f"data plane benchmark: N = {args.n:,} synthetic chats, {os.cpu_count()} CPUs, load {os.getloadavg()}"
    )

    with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        path = write_lines(args.n, args.seed, directory)
        print(
            f"generated {path.stat().st_size / 2**20:,.0f} MiB in {time.perf_counter() - start:.1f} s (not timed)"
        )
        # The naive loop runs --naive-runs times before the pipeline and as often after it, on the same
        # sample, and the ratio takes the median rate of all those runs: on this machine one run of it
        # varies by a third from the next, and the load can change during a benchmark.
        encoding = get_encoding(encoding_name_for_model(config.model.base, config.model.tokenizer))
        sample = first_lines(path, args.naive_sample)
        naive_rates = [cookbook_rate(sample, encoding) for _ in range(args.naive_runs)]
        del sample, encoding
        get_encoding.cache_clear()  # the pipeline loads its vocabulary as it would in a run of its own
        tiktoken.registry.ENCODINGS.clear()
        gc.collect()
        print("stages:")
        with TreeMemory(args.memory_interval) as memory:
            timings, counts = run_pipeline(path, directory / "out", args.workers)
        total = sum(timings.values())
        peak = max(peak_rss_gib(), memory.peak)
        ours = args.n / total
        print(
            f"  {'total':<10} {total:8.2f} s   {ours:,.0f} examples/s   peak memory {peak_rss_gib():.2f} GiB "
            f"(this process), {memory.peak:.2f} GiB (with its workers, PSS)"
        )
        print(f"  counts: {counts}")
        gc.collect()

        lines = path.read_text(encoding="utf-8").splitlines()
        encoding = get_encoding(encoding_name_for_model(config.model.base, config.model.tokenizer))
        texts = message_texts(lines)
        start = time.perf_counter()
        encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        tokenizer_seconds = time.perf_counter() - start
        del texts
        tokenizer = args.n / tokenizer_seconds
        sample = first_lines(path, args.naive_sample)
        # For reference: the same encoder one text at a time (no thread pool), on the sample.
        sample_texts = message_texts(sample)
        start = time.perf_counter()
        for text in sample_texts:
            encoding.encode_ordinary(text)
        sequential = len(sample) / (time.perf_counter() - start)
        naive_rates += [cookbook_rate(sample, encoding) for _ in range(args.naive_runs)]
        naive = statistics.median(naive_rates)
        print("baselines:")
        print(
            f"  tokenizer-bound (raw encode_ordinary_batch): {tokenizer:,.0f} examples/s ({tokenizer_seconds:.1f} s)"
        )
        print(f"  (sequential encode_ordinary, {len(sample):,} examples: {sequential:,.0f} examples/s)")
        print(
            f"  naive cookbook loop ({len(sample):,} examples): {naive:,.0f} examples/s, the median of "
            f"{len(naive_rates)} runs (before the pipeline {_rates(naive_rates[: args.naive_runs])}; "
            f"after it {_rates(naive_rates[args.naive_runs :])})"
        )
        print("ratios:")
        print(f"  ours / tokenizer-bound = {ours / tokenizer:.2f}  (target >= 0.3)")
        print(f"  ours / sequential tokenizer = {ours / sequential:.2f}")
        print(f"  ours / naive loop      = {ours / naive:.2f}")
        print(
            f"targets: total {total:.0f} s for {args.n:,} (<= 300 s at 1,000,000); peak {peak:.2f} GiB (<= 8)"
        )

    del lines, sample
    gc.collect()
    if args.recall_sample > 0:
        near_duplicate_recall(min(args.n, args.recall_sample), args.seed, config.dedupe)
    if args.scaling:
        # The fastest of three runs at N: a run of a few seconds is easily slowed by other work on a
        # shared machine, which would make the ratio say nothing about the search itself.
        runs = [near_duplicate_seconds(args.n, args.seed, config.dedupe) for _ in range(3)]
        small, n_small, found_small = min(runs)
        print(
            f"near-duplicates at N:   {n_small:,} records, {found_small:,} found, {small:.2f} s "
            f"(fastest of {', '.join(f'{r[0]:.2f}' for r in runs)})"
        )
        large, n_large, found_large = near_duplicate_seconds(10 * args.n, args.seed, config.dedupe)
        print(f"near-duplicates at 10N: {n_large:,} records, {found_large:,} found, {large:.2f} s")
        print(f"  time ratio 10N / N = {large / small:.2f}  (target <= 12)")


def compare_engines(args: argparse.Namespace) -> None:
    """--engine ray: the same partition files through the ray engine, then the local engine."""
    import ray

    print(
        f"data plane benchmark, ray vs local engine: N = {args.n:,} synthetic chats in {args.files} files, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        folder = write_parts(args.n, args.seed, directory, args.files)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"generated {size / 2**20:,.0f} MiB in {time.perf_counter() - start:.1f} s (not timed)")
        start = time.perf_counter()
        store = int(args.object_store_gib * 2**30) if args.object_store_gib else None
        ray.init(
            num_cpus=args.ray_cpus,
            object_store_memory=store,
            include_dashboard=False,
            logging_level="WARNING",
        )
        print(
            f"local Ray started in {time.perf_counter() - start:.1f} s (not timed): {ray.cluster_resources()}"
        )
        # Not timed: Ray's workers start and import tuneline, and both engines load their vocabulary and
        # the quality stage's library, on a small sample, so neither engine pays a first run's costs.
        start = time.perf_counter()
        warm = write_parts(min(args.n, 2_000), args.seed + 1, directory / "warm-up", 2)
        with contextlib.redirect_stdout(io.StringIO()):
            run_ray_pipeline(warm, directory / "warm-up" / "ray")
            run_pipeline_on([Source(name="benchmark", uri=str(warm))], directory / "warm-up" / "local")
        print(f"warmed up both engines in {time.perf_counter() - start:.1f} s (not timed)")
        rates: dict[str, float] = {}
        peaks: dict[str, float] = {}
        for engine in ("ray",) if args.ray_only else ("ray", "local"):
            print(f"{engine} engine:")
            with TreeMemory(args.memory_interval) as memory:
                if engine == "ray":
                    timings, counts = run_ray_pipeline(folder, directory / engine)
                else:
                    source = [Source(name="benchmark", uri=str(folder))]
                    timings, counts = run_pipeline_on(source, directory / engine)
            total = sum(timings.values())
            rates[engine], peaks[engine] = args.n / total, memory.peak
            print(
                f"  {'total':<10} {total:8.2f} s   {rates[engine]:,.0f} examples/s   "
                f"peak memory (this process + Ray's, PSS) {memory.peak:.2f} GiB"
            )
            print(f"  counts: {counts}")
            gc.collect()
            if engine == "ray":
                ray.shutdown()  # the local engine's run is measured without Ray's processes
        if args.ray_only:
            return
        same = all(
            (directory / "ray" / name).read_bytes() == (directory / "local" / name).read_bytes()
            for name in (export.TRAIN_FILE, export.VALIDATION_FILE, export.QUARANTINE_FILE)
        )
        hashes = {
            e: json.loads((directory / e / export.MANIFEST_FILE).read_text())["dataset_hash"]
            for e in ("ray", "local")
        }
        print("ratios:")
        print(f"  ray / local examples/s = {rates['ray'] / rates['local']:.2f}")
        print(f"  peak memory: ray {peaks['ray']:.2f} GiB, local {peaks['local']:.2f} GiB")
        print(
            f"  byte-identical train/validation/quarantine: {same}; same dataset hash: {len(set(hashes.values())) == 1}"
        )


if __name__ == "__main__":
    main()
