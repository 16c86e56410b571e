"""The data contract: the record frame every data stage takes and returns, its columns, the whole
vocabulary of quarantine reasons, and the one way a record is quarantined.

Every stage takes and returns one pandas DataFrame with a row per input record. A stage never drops
a row: it quarantines it with `quarantine` (setting `reason`, `detail`, and `duplicate_of` for
duplicates). Rows whose `reason` is null are the ones still kept. So `input_records == kept +
quarantined` holds by construction, by reason, at every stage boundary.

Every column a stage adds is named here, and every reason a record can be quarantined with is in
`REASONS`, in precedence order (the first rule a record breaks is the one reported): a stage names
its columns and reasons from this module, never with string literals of its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa

from tuneline import formats

# --- columns -------------------------------------------------------------------------------------------

# Made by ingest; every stage can rely on them.
RECORD_ID = "record_id"  # stable: sha256 of source, partition, line and content
# SOURCE and PARTITION (and KIND below) hold a few distinct values: categoricals made by `labels`.
SOURCE = "source"  # the file (path or URL, never with credentials) the record came from
PARTITION = "partition"  # "YYYY-MM-DD" from a dt= folder, "" when the source is not partitioned
LINE = "line"  # 1-based line (JSONL) or data row (CSV, header not counted; Parquet) in the source
# The physical lines of the source file that hold the record, 1-based, every line counted (the CSV
# header is line 1): equal to `line` for JSONL; first < last for a CSV row whose quoted field holds a
# line break; 0 for Parquet rows and for a file that cannot be read, which have no lines.
FIRST_LINE = "first_line"
LAST_LINE = "last_line"
# The original text of the record, so nothing is ever lost (from the engines' screen on, in the
# batch's TextStore: tuneline/text_store.py's raw_texts reads it wherever it is).
RAW = "raw"
# The parsed example (dict), or None when it could not be parsed. From the engines' screen on (after
# the per-record rules, the last that change an example), the training line export writes for it:
# canonical JSON bytes (tasks/export.py's canonical_line), a third of the dict's memory, kept in the
# batch's TextStore (tuneline/text_store.py's examples reads it wherever it is); an example JSON cannot
# represent stays a dict in its cell (export quarantines it). `example_value` reads either form.
EXAMPLE = "example"
REASON = "reason"  # null while kept; the rule's key once quarantined (one of REASONS)
DETAIL = "detail"  # human-readable: what exactly broke the rule, and the fix
DUPLICATE_OF = "duplicate_of"  # record_id of the record this one duplicates or contradicts

BASE_COLUMNS = [
    RECORD_ID,
    SOURCE,
    PARTITION,
    LINE,
    FIRST_LINE,
    LAST_LINE,
    RAW,
    EXAMPLE,
    REASON,
    DETAIL,
    DUPLICATE_OF,
]

# Added by validate (null on rows that were never countable).
KIND = "kind"  # the line format: chat | completion | preference (`labels`)
N_TOKENS = "n_tokens"  # exact tokens of the example as it will be exported (Int64)
N_ASSISTANT_TOKENS = "n_assistant_tokens"  # of which the assistant turns that are learned from
TRUNCATED = "truncated"  # bool: the example was cut to fit the training context
TRUNCATION = "truncation"  # how it was cut, or null

# Added by dedupe, on every row still kept when the duplicate rules began (null elsewhere): digests of
# the normalised prompt and answer (tuneline/normalize.py) that rule 5 and the export's split compare,
# so that the batch holds 64 bytes a record instead of the two texts (`digests` makes such a column).
# What rule 5 groups by, blake2b-128 of the normalised prompt (a preference record's with its two
# answers, tasks/dedupe.py's contradiction_keys); null when the prompt is empty (rule 5 skips those).
PROMPT_KEY = "prompt_key"
ANSWER_KEY = "answer_key"  # blake2b-128 of the answer that must agree within a group (the preferred one)
SPLIT_KEY = "split_key"  # sha256 of the normalised prompt and answer: the side export puts the example on

# Added by the engines' screen, which moves `raw` and each training line out of the frame into the
# batch's TextStore (tuneline/text_store.py; the moved cells become null): where the row's texts
# start in it (-1: none stored), and the bytes of each (-1: in its cell, as before).
TEXT_AT = "text_at"
RAW_SIZE = "raw_size"
EXAMPLE_SIZE = "example_size"

# --- reasons -------------------------------------------------------------------------------------------

# ingest: the record cannot be read.
INVALID_JSON = "invalid_json"
INVALID_ENCODING = "invalid_encoding"
INVALID_CSV = "invalid_csv"
CSV_MAPPING = "csv_mapping"
# validate, after the format rules of tuneline/formats.py.
TOO_LONG = "too_long"
# dedupe, in the order its rules run.
SECRET_DETECTED = "secret_detected"
PII_DETECTED = "pii_detected"
EVAL_LEAKAGE = "eval_leakage"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
CONTRADICTION = "contradiction"
# A format rule (tuneline/formats.py), also given by export to an example JSON cannot represent.
DATA_TYPE = "data_type"


@dataclass(frozen=True, slots=True)
class Reason:
    """A quarantine reason: its key, the stage that quarantines with it, and what it means."""

    key: str
    stage: str
    meaning: str


REASONS: tuple[Reason, ...] = (
    Reason(INVALID_JSON, "ingest", "the line is not valid JSON"),
    Reason(INVALID_ENCODING, "ingest", "the record or file is not readable UTF-8 (or not readable at all)"),
    Reason(
        INVALID_CSV,
        "ingest",
        "a physical line of a CSV region whose quoting cannot be parsed, or whose quote merged rows",
    ),
    Reason(CSV_MAPPING, "ingest", "a CSV or Parquet row that no column mapping fits"),
    *(Reason(key, "validate", meaning) for key, meaning in formats.RULES.items()),
    Reason(TOO_LONG, "validate", "the example is over the model's training context"),
    Reason(SECRET_DETECTED, "dedupe", "a credential in the example's text"),
    Reason(PII_DETECTED, "dedupe", "an email address or phone number (dedupe.pii: quarantine)"),
    Reason(EVAL_LEAKAGE, "dedupe", "the prompt is, or nearly is, an eval-set prompt"),
    Reason(EXACT_DUPLICATE, "dedupe", "the same normalised example as an earlier kept record"),
    Reason(NEAR_DUPLICATE, "dedupe", "a near-duplicate of an earlier kept record"),
    Reason(CONTRADICTION, "dedupe", "the same prompt as another record, with a different answer"),
)
KNOWN_REASONS = frozenset(reason.key for reason in REASONS)
INGEST_REASONS = tuple(r.key for r in REASONS if r.stage == "ingest")
VALIDATE_REASONS = tuple(r.key for r in REASONS if r.stage == "validate")
DEDUPE_REASONS = tuple(r.key for r in REASONS if r.stage == "dedupe")


class UnknownReason(ValueError):
    """A stage quarantined with a key that is not in REASONS: a bug in the stage, not in the data."""


def make_record_id(source: str, partition: str, line: int, raw: str) -> str:
    digest = hashlib.sha256(f"{source}\x1f{partition}\x1f{line}\x1f{raw}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:24]


def labels(values: Sequence[str | None] | np.ndarray) -> pd.Categorical:
    """A column of a few distinct strings repeated over the records (SOURCE, PARTITION, KIND) as a
    categorical: a code of one or two bytes a record instead of a string each (a source path took 46
    bytes a record as an Arrow string, half a GB a ten million records). The engines join the blocks'
    categoricals with union_categoricals (tuneline/engines/blocks.py), so the batch's column stays one."""
    return pd.Categorical(values)


def sorted_codes(column: pd.Series) -> np.ndarray:
    """Each row's rank among the column's distinct values in sorted string order (null as ""): equal
    values share a code. A categorical is ranked by its categories, never a string per row."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        # Code -1 (null) picks the last entry: "".
        values = [*column.cat.categories.astype(str), ""]
        return pd.factorize(pd.Index(values, dtype=object), sort=True)[0][column.cat.codes.to_numpy()]
    return pd.factorize(column.fillna("").astype(str), sort=True)[0]


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in BASE_COLUMNS}).astype(
        {LINE: "int64", FIRST_LINE: "int64", LAST_LINE: "int64"}
    )


def digests(index: pd.Index, positions: np.ndarray, values: Sequence[bytes | None], size: int) -> pd.Series:
    """A column over `index` holding `values` (digests of `size` bytes, or None) at `positions`, null
    elsewhere: an Arrow fixed-size binary column, `size` bytes a row in one buffer."""
    cells: list[bytes | None] = [None] * len(index)
    for position, value in zip(np.asarray(positions).tolist(), values, strict=True):
        cells[position] = value
    array = pd.arrays.ArrowExtensionArray(pa.array(cells, type=pa.binary(size)))
    return pd.Series(array, index=index)


def digests_at(frame: pd.DataFrame, column: str, positions: np.ndarray | Sequence[int]) -> pa.Array:
    """The digests of a `digests` column at `positions`, as one Arrow array (taken by Arrow: pandas'
    iloc and tolist of 65,536 of 2M digests in 140 blocks' chunks took 2.5 times as long)."""
    values = pa.array(frame[column].array)  # its Arrow data, chunked or not, without a copy
    taken = values.take(pa.array(np.asarray(positions, dtype=np.int64)))
    return taken.combine_chunks() if isinstance(taken, pa.ChunkedArray) else taken


def digest_words(frame: pd.DataFrame, column: str, positions: np.ndarray | Sequence[int]) -> np.ndarray:
    """The digests of a `digests` column at `positions` as rows of 64-bit words (shape: positions x
    size / 8), for numpy to sort and compare; a null digest reads as zeros."""
    taken = digests_at(frame, column, positions)
    width = taken.type.byte_width // 8
    if not len(taken):
        return np.zeros((0, width), dtype=np.uint64)
    words = np.frombuffer(taken.buffers()[1], dtype=np.uint64, count=(taken.offset + len(taken)) * width)
    words = words.reshape(-1, width)[taken.offset :]
    if taken.null_count:
        words = words.copy()
        words[taken.is_null().to_numpy(zero_copy_only=False)] = 0
    return words


def kept_mask(frame: pd.DataFrame) -> pd.Series:
    return frame[REASON].isna()


def example_value(value: Any) -> Any:
    """An `example` cell as the parsed example: a training line (bytes) parsed, anything else as it is."""
    return orjson.loads(value) if isinstance(value, bytes) else value


def quarantine(
    frame: pd.DataFrame,
    mask: pd.Series | np.ndarray,
    reason: str,
    detail: str | pd.Series | Sequence[str | None],
    duplicate_of: pd.Series | Sequence[str | None] | None = None,
) -> int:
    """Quarantine the still-kept rows selected by `mask` (in place); returns how many were quarantined.

    `detail` and `duplicate_of` are one value for all, or values aligned with the frame. A row already
    quarantined keeps its first reason: the first rule it broke is the one reported.
    """
    _check(reason)
    selected = np.asarray(mask, dtype=bool) & kept_mask(frame).to_numpy()
    return _assign(frame, selected, reason, detail, duplicate_of)


def quarantine_at(
    frame: pd.DataFrame,
    positions: np.ndarray | Sequence[int],
    reason: str,
    details: Sequence[str],
    duplicate_of: Sequence[str | None] | None = None,
) -> int:
    """`quarantine` by row position: `details` (and `duplicate_of`) go with `positions`, in order."""
    rows = np.asarray(positions, dtype=np.int64)
    if not len(rows):
        _check(reason)
        return 0
    mask = np.zeros(len(frame), dtype=bool)
    mask[rows] = True
    aligned = np.full(len(frame), None, dtype=object)
    aligned[rows] = list(details)
    others = None
    if duplicate_of is not None:
        others = np.full(len(frame), None, dtype=object)
        others[rows] = list(duplicate_of)
    return quarantine(frame, mask, reason, list(aligned), None if others is None else list(others))


def requarantine(
    frame: pd.DataFrame,
    positions: np.ndarray | Sequence[int],
    reason: str,
    details: Sequence[str],
    duplicate_of: Sequence[str | None],
) -> int:
    """Give rows that are already quarantined another reason (in place); kept rows are never touched.

    The one exception to "the first reason stays": a duplicate names the record kept in its place, and
    when a later rule quarantines that record, the duplicate follows it (see tasks/dedupe.py).
    """
    _check(reason)
    selected = np.zeros(len(frame), dtype=bool)
    selected[np.asarray(positions, dtype=np.int64)] = True
    if (selected & kept_mask(frame).to_numpy()).any():
        raise ValueError("requarantine: a kept row can only be quarantined with quarantine()")
    aligned = np.full(len(frame), None, dtype=object)
    aligned[np.asarray(positions, dtype=np.int64)] = list(details)
    others = np.full(len(frame), None, dtype=object)
    others[np.asarray(positions, dtype=np.int64)] = list(duplicate_of)
    return _assign(frame, selected, reason, list(aligned), list(others))


def _check(reason: str) -> None:
    if reason not in KNOWN_REASONS:
        raise UnknownReason(
            f"{reason!r} is not a quarantine reason of the data contract (tuneline/records.py)"
        )


def _assign(
    frame: pd.DataFrame,
    selected: np.ndarray,
    reason: str,
    detail: str | pd.Series | Sequence[str | None],
    duplicate_of: pd.Series | Sequence[str | None] | None,
) -> int:
    count = int(selected.sum())
    if not count:
        return 0
    frame.loc[selected, REASON] = reason
    frame.loc[selected, DETAIL] = _pick(detail, selected)
    if duplicate_of is not None:
        frame.loc[selected, DUPLICATE_OF] = _pick(duplicate_of, selected)
    return count


def _pick(values: str | pd.Series | Sequence[str | None], selected: np.ndarray) -> object:
    if isinstance(values, str):
        return values
    return np.asarray(values, dtype=object)[selected]


def counts_by_reason(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame[REASON].dropna().value_counts().sort_index().items()}
