"""Export: the kept records as canonical JSONL training and validation files, quarantine.jsonl and a manifest.

Guarantees:
- the train/validation side of an example is a pure function of its normalised prompt and answer (the
  forms dedupe compares: NFKC, casefold, punctuation removed, whitespace collapsed): stable across
  runs, input order and file layout, and one question with one answer is always on one side;
- lines are canonical JSON (sorted keys, separators "," and ":", UTF-8 unescaped), one per example,
  ordered by the same hash, so the same examples always give the same bytes;
- dataset_hash = sha256(train bytes + b"\\0" + validation bytes);
- a share (export.general_mix_fraction) of the training file is general data from data.general_corpus,
  chosen deterministically, as a guard against forgetting; it never enters the validation file; with
  training.method dpo or reinforcement nothing is mixed in (the corpus is chat lines, and one file
  holds one format: the config refuses a fraction above 0 there);
- every input record ends in exactly one place: input_records == kept + quarantined, the per-reason
  counts sum to quarantined, and kept == train - general_mixed + validation;
- quarantine.jsonl holds one line per quarantined record: where it came from (source, partition, line,
  first_line..last_line), its reason and detail, and its raw text, in which no credential any detector
  of tuneline/secrets.py finds is left (each one is replaced by `[masked credential: <detector>]`), nor,
  unless dedupe.pii is `allow`, an email address or phone number ([email], [phone]). The value of a
  secret stays in the source data only, where source and line find it; the file is logged to MLflow as
  it is written;
- nothing is published (train/validation files are not written) when the data-quality check failed or
  the cost estimate is over cost.max_estimated_cost_usd; the manifest, quarantine and report still are.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneline import engines, fork_server, records, text_store, tokens
from tuneline.config import Config, ExportConfig
from tuneline.normalize import Normalizer, normalized_prompt_and_answer
from tuneline.secrets import find_secrets_and_pii, mask_credentials, redact_text
from tuneline.sorted_lines import SortedFile, SortedLines, lines_in_order
from tuneline.text_store import TextStore

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"
QUARANTINE_FILE = "quarantine.jsonl"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.html"

log = logging.getLogger(__name__)

QUARANTINE_FIELDS = (
    records.RECORD_ID,
    records.SOURCE,
    records.PARTITION,
    records.LINE,
    records.FIRST_LINE,
    records.LAST_LINE,
    records.REASON,
    records.DETAIL,
    records.DUPLICATE_OF,
    records.RAW,
)


def canonical_line(example: Any) -> bytes:
    """One training line: JSON with sorted keys, no spaces, UTF-8 unescaped, newline-terminated."""
    return orjson.dumps(example, option=orjson.OPT_SORT_KEYS) + b"\n"


def with_training_lines(frame: pd.DataFrame) -> pd.DataFrame:
    """A shallow copy of `frame` whose examples are the training lines export writes for them
    (canonical_line), for a frame no rule changes an example of any more (the engines' screen makes
    one, tuneline/engines/blocks.py): a line takes about a third of the memory of the parsed example
    and a tenth of the time to pickle between processes, and export writes it as it is. An example
    JSON cannot represent (an integer beyond 64 bits, a non-string key) stays as it is: export
    quarantines it."""
    examples = frame[records.EXAMPLE].to_numpy(dtype=object, copy=True)
    for position, example in enumerate(examples.tolist()):
        if example is not None:
            line = _training_line(example)
            if line is not None:
                examples[position] = line
    out = frame.copy(deep=False)
    out[records.EXAMPLE] = pd.Series(examples, index=out.index, dtype=object)
    return out


def _training_line(example: Any) -> bytes | None:
    """The training line of an example, as it is when it is one already; None when JSON cannot
    represent the example."""
    if isinstance(example, bytes):
        return example
    try:
        return canonical_line(example)
    except (TypeError, orjson.JSONEncodeError):
        return None


def split_key(example: dict[str, Any], normalizer: Normalizer | None = None) -> bytes:
    """sha256 of the normalised example's prompt and answer (tuneline/normalize.py, the forms dedupe
    compares): case, width, punctuation and whitespace variants share one key, hence one side."""
    return split_key_of(*normalized_prompt_and_answer(example, normalizer))


def split_key_of(normalized_prompt: str, normalized_answer: str) -> bytes:
    """split_key of an example from its normalised prompt and answer (dedupe makes it where it
    normalises them: records.SPLIT_KEY)."""
    return hashlib.sha256(f"{normalized_prompt}\x1f{normalized_answer}".encode()).digest()


def validation_mask(keys: Sequence[bytes], validation_fraction: float) -> np.ndarray:
    """The side of each example: its key's first 8 bytes read as a number in [0, 1) against the
    fraction, True for validation. For a whole number k, k / 2**64 < f exactly when k < ceil(f * 2**64)
    (a float times a power of two is exact), so the comparison is exact in 64-bit integers."""
    limit = math.ceil(validation_fraction * 2**64)
    if limit > np.iinfo(np.uint64).max:
        return np.ones(len(keys), dtype=bool)
    leading = np.frombuffer(b"".join(key[:8] for key in keys), dtype=">u8")
    return leading < np.uint64(limit)


@dataclass(frozen=True)
class GeneralExamples:
    """Valid general-data examples (already in the exported format) and their token counts."""

    source: str
    examples: list[dict[str, Any]]
    n_tokens: list[int]
    n_assistant_tokens: list[int]
    rejected: int = 0  # lines of the corpus that broke a rule and are never mixed in


@dataclass(frozen=True)
class RunContext:
    """What the manifest says about the run beyond the data itself."""

    as_of: str
    config_hash: str
    sources: list[dict[str, Any]]
    partitions: list[str]
    window: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FileDigest:
    """What the manifest says of one written file: its lines, bytes and sha256."""

    lines: int
    bytes: int
    sha256: str


# Kept examples read back from the text store and split at once (each side's lines go to disk after).
_EXPORT_CHUNK = 1 << 16
# Quarantined records from which build_dataset's `quarantine_beside` makes their lines in a second
# process (_QuarantineBeside): below, starting the process would cost more than it saves.
QUARANTINE_BESIDE_RECORDS = 8192


@dataclass
class Dataset:
    """The export, built before anything is written: the train, validation and quarantine lines in
    order in temporary files (tuneline/sorted_lines.py), their hash, and the figures of the manifest."""

    train: SortedFile
    validation: SortedFile
    quarantine: SortedFile
    dataset_hash: str
    counts: dict[str, Any]
    tokens: dict[str, Any]
    cost: dict[str, Any]
    files: dict[str, FileDigest]  # by file name: train, validation and quarantine
    general_source: str | None = None
    general_rejected: int = 0

    @property
    def train_lines(self) -> list[bytes]:
        """The training file's lines, read back (for a small dataset: the whole file in memory)."""
        return self.train.read_lines()

    @property
    def validation_lines(self) -> list[bytes]:
        return self.validation.read_lines()

    @property
    def quarantine_lines(self) -> list[bytes]:
        return self.quarantine.read_lines()

    def close(self) -> None:
        """Let the temporary files go."""
        self.train.close()
        self.validation.close()
        self.quarantine.close()


@dataclass(frozen=True)
class ExportOutcome:
    published: bool
    problems: list[str]
    manifest: dict[str, Any]
    out_dir: Path


def build_dataset(
    frame: pd.DataFrame,
    config: Config,
    general: GeneralExamples | None = None,
    texts: TextStore | None = None,
    quarantine_beside: bool = False,
) -> Dataset:
    """Split, mix, serialise and hash; estimate tokens and cost. Nothing is written to the outputs: the
    lines of each side are sorted into a temporary file (tuneline/sorted_lines.py), a chunk of
    examples read at a time, so the batch's lines are never all in memory. An example that is already
    its training line (with_training_lines) is written as it is; `texts`: the store the engines'
    screen moved the frame's texts to (tuneline/text_store.py). With `quarantine_beside`, the lines of
    a large quarantine (QUARANTINE_BESIDE_RECORDS) of such a frame are made in a second process
    meanwhile (_QuarantineBeside), the same bytes."""
    kept_positions = np.flatnonzero(records.kept_mask(frame).to_numpy())
    token_counts = _int_column(frame, records.N_TOKENS)
    assistant_counts = _int_column(frame, records.N_ASSISTANT_TOKENS)
    # Dedupe leaves each example's split key in the frame: reusing it saves normalising it again.
    has_key = records.SPLIT_KEY in frame
    if config.training.method != "supervised":
        general = None
    mixing = general is not None and config.export.general_mix_fraction > 0

    expected = _expected_bytes(frame, kept_positions)
    train, validation = SortedLines(expected), SortedLines(expected)
    beside: _QuarantineBeside | None = None
    if (
        quarantine_beside
        and text_store.is_packed(frame)
        and len(frame) - len(kept_positions) >= QUARANTINE_BESIDE_RECORDS
    ):
        # The quarantine is made while the lines below are, so which records it holds is settled
        # first: those whose example JSON cannot represent are kept ones not stored as lines (rare).
        loose = kept_positions[frame[records.EXAMPLE_SIZE].to_numpy()[kept_positions] < 0]
        examples = text_store.examples(frame, loose, texts)
        bad = [p for p, e in zip(loose.tolist(), examples, strict=True) if _training_line(e) is None]
        if bad:
            frame = _quarantined_unserialisable(frame, bad)
            kept_positions = np.flatnonzero(records.kept_mask(frame).to_numpy())
        del loose, examples
        beside = _QuarantineBeside(frame, config.dedupe.pii != "allow", texts)
    unserialisable: list[int] = []
    # Machine integers, not lists of Python ints (36 bytes each: 0.7 GB at ten million examples).
    task_tokens = array("q")
    train_tokens = array("q")
    train_assistant_tokens = validation_tokens = 0
    task_lines: set[bytes] = set()  # digests of the task's lines, when general examples are mixed in
    fraction = config.export.validation_fraction
    normalizer = Normalizer()
    train_keys: list[bytes] = []
    train_lines: list[bytes] = []
    validation_keys: list[bytes] = []
    validation_lines: list[bytes] = []
    for start in range(0, len(kept_positions), _EXPORT_CHUNK):
        positions = kept_positions[start : start + _EXPORT_CHUNK]
        examples = text_store.examples(frame, positions, texts)
        made = [_training_line(example) for example in examples]
        lines = [line for line in made if line is not None]
        if len(lines) < len(made):
            serialised = np.fromiter((line is not None for line in made), dtype=bool, count=len(made))
            unserialisable.extend(positions[~serialised].tolist())
            positions = positions[serialised]
            examples = [example for example, line in zip(examples, made, strict=True) if line is not None]
        del made
        found = (
            records.digests_at(frame, records.SPLIT_KEY, positions.tolist()).to_pylist()
            if has_key
            else [None] * len(positions)
        )
        # Dedupe leaves the key in the frame; an example not deduplicated (or with a null key) gets
        # it made from the example.
        keys: list[bytes] = [
            key if isinstance(key, bytes) else split_key(records.example_value(example), normalizer)
            for key, example in zip(found, examples, strict=True)
        ]
        del examples, found
        chunk_tokens = token_counts[positions]  # int64, as array("q") holds them
        task_tokens.frombytes(chunk_tokens.tobytes())
        on_validation = validation_mask(keys, fraction)
        validation_at, train_at = (
            np.flatnonzero(on_validation).tolist(),
            np.flatnonzero(~on_validation).tolist(),
        )
        validation_keys, validation_lines = (
            [keys[i] for i in validation_at],
            [lines[i] for i in validation_at],
        )
        train_keys, train_lines = [keys[i] for i in train_at], [lines[i] for i in train_at]
        validation_tokens += int(chunk_tokens[on_validation].sum())
        train_tokens.frombytes(chunk_tokens[~on_validation].tobytes())
        train_assistant_tokens += int(assistant_counts[positions][~on_validation].sum())
        if mixing:
            task_lines.update(_line_digest(line) for line in lines)
        train.add(train_keys, train_lines)
        validation.add(validation_keys, validation_lines)
    del train_keys, train_lines, validation_keys, validation_lines  # the last chunk's, on disk now
    if unserialisable:
        # Only examples not stored as lines can be: with a quarantine made beside, settled above.
        assert beside is None, "an example JSON cannot represent was found after the quarantine began"
        frame = _quarantined_unserialisable(frame, unserialisable)

    mixed = _general_mix(train.count, task_lines, general, config.export)
    train.add([m[0] for m in mixed], [m[1] for m in mixed])
    train_tokens.extend(m[2] for m in mixed)
    train_assistant_tokens += sum(m[3] for m in mixed)
    digest = hashlib.sha256()
    train_file = train.write_sorted(digest)
    digest.update(b"\0")
    validation_file = validation.write_sorted(digest)
    files = {
        name: FileDigest(written.lines, written.size, written.sha256)
        for name, written in ((TRAIN_FILE, train_file), (VALIDATION_FILE, validation_file))
    }
    quarantined = (
        beside.result()
        if beside is not None
        else lines_in_order(
            quarantine_lines(frame, redact_pii=config.dedupe.pii != "allow", texts=texts),
            what="the quarantine's lines",
        )
    )
    files[QUARANTINE_FILE] = FileDigest(quarantined.lines, quarantined.size, quarantined.sha256)

    kept = int(records.kept_mask(frame).sum())
    by_reason = records.counts_by_reason(frame)
    counts = {
        "input_records": len(frame),
        "kept": kept,
        "quarantined": len(frame) - kept,
        "quarantined_by_reason": by_reason,
        "train": train_file.lines,
        "validation": validation_file.lines,
        "general_mixed": len(mixed),
        "truncated": int(frame[records.TRUNCATED].sum()) if records.TRUNCATED in frame else 0,
    }
    limit = tokens.context_limit(
        config.model.base, config.validation.context_limits, config.validation.default_context_limit
    )
    token_stats = {
        "encoding": tokens.encoding_name_for_model(config.model.base, config.model.tokenizer),
        "context_limit": limit,
        "train_total": int(sum(train_tokens)),
        "train_assistant_total": int(train_assistant_tokens),
        "validation_total": int(validation_tokens),
        "general_total": int(sum(m[2] for m in mixed)),
        "max_example": int(max(task_tokens, default=0)),
        "mean_example": round(float(np.mean(task_tokens)), 2) if task_tokens else 0.0,
        "p95_example": int(np.percentile(task_tokens, 95)) if task_tokens else 0,
    }
    estimate = tokens.estimate_cost(
        train_tokens,
        model=config.model.base,
        limit=limit,
        prices=config.cost.training_price_per_1m_tokens,
        prices_as_of=config.cost.prices_as_of.isoformat(),
        n_epochs=config.training.hyperparameters.n_epochs,
    )
    cap = config.cost.max_estimated_cost_usd
    cost = {
        **estimate.as_dict(),
        "max_estimated_cost_usd": cap,
        "within_cap": estimate.estimated_cost_usd is None or estimate.estimated_cost_usd <= cap,
    }
    return Dataset(
        train=train_file,
        validation=validation_file,
        quarantine=quarantined,
        dataset_hash=digest.hexdigest(),
        files=files,
        counts=counts,
        tokens=token_stats,
        cost=cost,
        general_source=general.source if general else None,
        general_rejected=general.rejected if general else 0,
    )


def _quarantined_unserialisable(frame: pd.DataFrame, positions: Sequence[int]) -> pd.DataFrame:
    """A copy of `frame` (the caller's is left as it is) with the rows at `positions`, whose examples
    JSON cannot represent, quarantined."""
    frame = frame.copy()
    mask = np.zeros(len(frame), dtype=bool)
    mask[list(positions)] = True
    records.quarantine(frame, mask, records.DATA_TYPE, "the example holds a value JSON cannot represent")
    return frame


def _expected_bytes(frame: pd.DataFrame, positions: np.ndarray) -> int:
    """About how many bytes the lines of the rows at `positions` take (what stored examples take;
    1 kB for every other)."""
    if not text_store.is_packed(frame):
        return 1024 * len(positions)
    sizes = frame[records.EXAMPLE_SIZE].to_numpy()[positions]
    return int(np.where(sizes >= 0, sizes, 1024).sum())


def _line_digest(line: bytes) -> bytes:
    """A 128-bit digest of a line: what tells a general example from the task's lines without holding
    them (two different lines share one with a probability of 2**-128)."""
    return hashlib.blake2b(line, digest_size=16).digest()


def _int_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.zeros(len(frame), dtype=np.int64)
    return frame[column].astype("Int64").fillna(0).to_numpy(dtype=np.int64)


def _general_mix(
    n_train: int, task_lines: set[bytes], general: GeneralExamples | None, export: ExportConfig
) -> list[tuple[bytes, bytes, int, int]]:
    """General examples making up `export.general_mix_fraction` of the training file, the same ones for
    the same corpus: (split key, line, tokens, assistant tokens) of each, none whose line is one of
    the task's (`task_lines`: their _line_digest)."""
    if general is None or export.general_mix_fraction <= 0 or not n_train:
        return []
    wanted = export.general_examples_for(n_train)
    pool: dict[bytes, tuple[bytes, bytes, int, int]] = {}
    normalizer = Normalizer()
    for example, n_tokens, n_assistant in zip(
        general.examples, general.n_tokens, general.n_assistant_tokens, strict=True
    ):
        line = canonical_line(example)
        if _line_digest(line) not in task_lines:
            key = split_key(example, normalizer)
            pool.setdefault(key, (key, line, n_tokens, n_assistant))
    return [pool[key] for key in sorted(pool)[:wanted]]


def quarantine_lines(
    frame: pd.DataFrame, *, redact_pii: bool, texts: TextStore | None = None
) -> Iterator[list[bytes]]:
    """One canonical JSON line per quarantined record, in frame order, a chunk of records at a time:
    where it came from, why, and its raw text (from `texts` where the engines' screen stored it) with
    credentials masked (and PII redacted with `redact_pii`). In chunks because the raw texts parsed
    to be masked take twice the lines' memory on the way (measured: the 51,569 lines, 44 MB, of 1M
    synthetic chats peaked at 153 MB made at once, 61 MB in chunks of 8,192), and the export writes
    each chunk to a temporary file as it comes (ten million records' quarantine held half a GB)."""
    for columns in _quarantine_columns(frame, texts):
        yield quarantine_chunk(columns, redact_pii)


def _quarantine_columns(frame: pd.DataFrame, texts: TextStore | None) -> Iterator[dict[str, list[Any]]]:
    """The QUARANTINE_FIELDS of the quarantined records, in frame order, a chunk at a time; their raw
    texts as they were read (quarantine_chunk masks them)."""
    everything = np.flatnonzero(~records.kept_mask(frame).to_numpy())
    for start in range(0, len(everything), _EXPORT_CHUNK):
        positions = everything[start : start + _EXPORT_CHUNK]
        quarantined = frame.iloc[positions][list(QUARANTINE_FIELDS)]
        columns = {name: quarantined[name].tolist() for name in QUARANTINE_FIELDS}
        columns[records.RAW] = text_store.raw_texts(frame, positions, texts)
        yield columns


def quarantine_chunk(columns: dict[str, list[Any]], redact_pii: bool) -> list[bytes]:
    """The quarantine's lines of a chunk of `_quarantine_columns`, raw texts and details masked: a
    function of the chunk alone, which the quarantine's process (`_QuarantineBeside`) runs as it is."""
    columns[records.RAW] = masked_texts(columns[records.RAW], redact_pii=redact_pii, as_json=True)
    columns[records.DETAIL] = masked_texts(columns[records.DETAIL], redact_pii=redact_pii, as_json=False)
    return [
        orjson.dumps(
            {name: _plain(value) for name, value in zip(QUARANTINE_FIELDS, values, strict=True)},
            option=orjson.OPT_SORT_KEYS,
        )
        + b"\n"
        for values in zip(*columns.values(), strict=True)
    ]


class _QuarantineBeside:
    """The quarantine's lines made in a process of the fork server (tuneline/fork_server.py) while the
    flow's thread sorts the training and validation lines: a thread here reads each chunk's fields and
    raw texts, hands them to the process (at most two chunks on the way) and writes the lines that
    come back (`lines_in_order`). The masking is Python work, so a thread alone could not run it beside
    the sorting (measured before: no faster); a second process can. A process that dies, or cannot
    start, leaves the quarantine to be made in the flow's process again, from the start (`result`)."""

    def __init__(self, frame: pd.DataFrame, redact_pii: bool, texts: TextStore | None) -> None:
        self._frame, self._redact_pii, self._texts = frame, redact_pii, texts
        self._made: SortedFile | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tuneline-quarantine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with (
                tempfile.TemporaryDirectory(prefix="tuneline-quarantine-") as directory,
                ProcessPoolExecutor(1, mp_context=fork_server.context()) as pool,
            ):
                made_by: set[int] = set()
                self._made = lines_in_order(
                    self._lines(pool, directory, made_by), what="the quarantine's lines"
                )
            log.info(
                "export: the quarantine's %d lines made in process %s, beside the flow's",
                self._made.lines,
                ", ".join(map(str, sorted(made_by))),
            )
        except BaseException as exc:  # handed to the flow's thread by `result`
            self._error = exc

    def _lines(self, pool: ProcessPoolExecutor, directory: str, made_by: set[int]) -> Iterator[list[bytes]]:
        waiting: deque[Future[fork_server.Returned[list[bytes]]]] = deque()

        def taken() -> list[bytes]:
            returned = waiting.popleft().result()
            made_by.add(returned.process)
            return returned.value()

        for columns in _quarantine_columns(self._frame, self._texts):
            waiting.append(
                pool.submit(fork_server.called, directory, quarantine_chunk, columns, self._redact_pii)
            )
            del columns
            while waiting and (len(waiting) > 1 or waiting[0].done()):
                yield taken()
        while waiting:
            yield taken()

    def result(self) -> SortedFile:
        """The quarantine's lines, once made (in this process, if the quarantine's process failed)."""
        self._thread.join()
        if isinstance(self._error, BrokenProcessPool | OSError):
            log.warning("export: the quarantine's process failed (%s); making its lines here", self._error)
            self._error = None
            self._made = lines_in_order(
                quarantine_lines(self._frame, redact_pii=self._redact_pii, texts=self._texts),
                what="the quarantine's lines",
            )
        if self._error is not None:
            raise self._error
        assert self._made is not None
        return self._made


def masked_texts(texts: Sequence[Any], *, redact_pii: bool, as_json: bool) -> list[Any]:
    """The texts with every credential masked (tuneline/secrets.py) and, with `redact_pii`, emails and
    phone numbers redacted. With `as_json`, a text that is JSON (a record's raw line) is masked string
    by string, keys included, and written back as canonical JSON, so a value escaped in the line
    (\\u0041, \\/) is masked like any other; a text that is not JSON is masked as it is."""
    parsed: list[Any] = []
    strings: dict[str, None] = {}
    for text in texts:
        value = _json_value(text) if as_json and isinstance(text, str) else None
        parsed.append(value)
        if value is not None:
            _strings_of(value, strings)
        elif isinstance(text, str):
            strings[text] = None
    distinct = list(strings)
    secrets, pii = find_secrets_and_pii(distinct)
    flagged = {distinct[i] for i in secrets} | ({distinct[i] for i in pii} if redact_pii else set())
    if not flagged:
        return list(texts)

    def clean(text: str) -> str:
        if text not in flagged:
            return text
        text = mask_credentials(text)
        return redact_text(text) if redact_pii else text

    out: list[Any] = []
    for text, value in zip(texts, parsed, strict=True):
        if value is not None:
            found: dict[str, None] = {}
            _strings_of(value, found)
            if flagged.isdisjoint(found):
                out.append(text)
            else:
                out.append(orjson.dumps(_mapped_strings(value, clean), option=orjson.OPT_SORT_KEYS).decode())
        else:
            out.append(clean(text) if isinstance(text, str) else text)
    return out


def _json_value(text: str) -> Any:
    """The JSON value of a text, or None when it is not JSON (or is a bare string: masked as text)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict | list) else None


def _strings_of(value: Any, into: dict[str, None]) -> None:
    if isinstance(value, str):
        into[value] = None
    elif isinstance(value, dict):
        for key, item in value.items():
            into[key] = None
            _strings_of(item, into)
    elif isinstance(value, list):
        for item in value:
            _strings_of(item, into)


def _mapped_strings(value: Any, change: Any) -> Any:
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {change(key): _mapped_strings(item, change) for key, item in value.items()}
    if isinstance(value, list):
        return [_mapped_strings(item, change) for item in value]
    return value


def _plain(value: Any) -> Any:
    # Missing values arrive as None, NaN or pd.NA depending on the column's dtype: all are null.
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.integer):
        return int(value)
    return value


def manifest(
    dataset: Dataset, config: Config, context: RunContext, problems: Sequence[str], published: bool
) -> dict[str, Any]:
    """manifest.json: hash, counts, tokens, cost, sources, partitions, config hash."""

    def described(name: str) -> dict[str, Any]:
        digest = dataset.files[name]
        return {"path": name, "lines": digest.lines, "bytes": digest.bytes, "sha256": digest.sha256}

    files = {
        "quarantine": described(QUARANTINE_FILE),
        "report": {"path": REPORT_FILE},
    }
    if published:
        files["train"] = described(TRAIN_FILE)
        files["validation"] = described(VALIDATION_FILE)
    return {
        "dataset_hash": dataset.dataset_hash,
        "published": published,
        "problems": list(problems),
        "as_of": context.as_of,
        "window": context.window,
        "config_hash": context.config_hash,
        "model": config.model.base,
        "method": config.training.method,
        "counts": dataset.counts,
        "tokens": dataset.tokens,
        "cost": dataset.cost,
        "sources": context.sources,
        "partitions": context.partitions,
        "general": {
            "source": dataset.general_source,
            "mix_fraction": config.export.general_mix_fraction,
            "mixed": dataset.counts["general_mixed"],
            "rejected_lines": dataset.general_rejected,
        },
        "split": {
            "validation_fraction": config.export.validation_fraction,
            "key": "sha256(normalized prompt, normalized answer)",
        },
        "files": files,
    }


def cost_problem(dataset: Dataset) -> str | None:
    """Why the cost estimate stops the run, or None."""
    cost = dataset.cost
    if cost["within_cap"]:
        return None
    return (
        f"estimated training cost ${cost['estimated_cost_usd']:,.2f} ({cost['billed_tokens']:,} billed tokens, "
        f"{cost['n_epochs']} epochs of {cost['model']} at ${cost['price_per_1m_tokens']}/1M) is over "
        f"cost.max_estimated_cost_usd = ${cost['max_estimated_cost_usd']:,.2f} "
        "(raise the cap, lower the epochs, or prepare less data)"
    )


def write_outputs(
    dataset: Dataset, manifest_document: dict[str, Any], report_html: str, out_dir: Path, *, published: bool
) -> None:
    """Write the files atomically; without `published`, remove stale train/validation files instead."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_copy(out_dir / QUARANTINE_FILE, dataset.quarantine)
    _write(out_dir / REPORT_FILE, [report_html.encode("utf-8")])
    if published:
        _write_copy(out_dir / TRAIN_FILE, dataset.train)
        _write_copy(out_dir / VALIDATION_FILE, dataset.validation)
    else:
        # Files from an earlier run must not pass for this run's data.
        for name in (TRAIN_FILE, VALIDATION_FILE):
            (out_dir / name).unlink(missing_ok=True)
    document = orjson.dumps(manifest_document, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n"
    _write(out_dir / MANIFEST_FILE, [document])


def _write(path: Path, chunks: list[bytes]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        handle.writelines(chunks)
    tmp.replace(path)


def _write_copy(path: Path, lines: SortedFile) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        lines.copy_to(handle)
    tmp.replace(path)


# The data-quality check's outcome for the batch: its failures (none: it passed) and its report page.
# The export asks for it once the dataset is built, so a check that runs meanwhile (the prepare flow's,
# beside it: tasks/quality.py's QualityCheck) is waited for only then.
QualityOutcome = Callable[[], tuple[Sequence[str], str]]


def export(
    frame: pd.DataFrame,
    config: Config,
    context: RunContext,
    out_dir: Path,
    *,
    quality: QualityOutcome,
    general: GeneralExamples | None = None,
    texts: TextStore | None = None,
) -> ExportOutcome:
    """Build the dataset, decide whether it may be published (data quality passed, cost within the cap),
    write. `texts`: the store of the frame's texts, where the engines' screen moved them."""
    beside = engines.work_beside_the_flow(config.execution)
    dataset = build_dataset(frame, config, general, texts, quarantine_beside=beside)
    try:
        quality_failures, report_html = quality()
        problems = [f"data quality: {failure}" for failure in quality_failures]
        over_cap = cost_problem(dataset)
        if over_cap:
            problems.append(f"cost: {over_cap}")
        published = not problems
        document = manifest(dataset, config, context, problems, published)
        write_outputs(dataset, document, report_html, out_dir, published=published)
    finally:
        dataset.close()
    return ExportOutcome(published, problems, document, out_dir)


@task(name="export", cache_policy=NO_CACHE, persist_result=False)
def export_task(
    frame: pd.DataFrame,
    config: Config,
    context: RunContext,
    out_dir: Path,
    quality: QualityOutcome,
    general: GeneralExamples | None = None,
    texts: TextStore | None = None,
) -> ExportOutcome:
    """Prefect wrapper of export."""
    return export(frame, config, context, out_dir, quality=quality, general=general, texts=texts)
