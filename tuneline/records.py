"""The record frame that flows through the data stages, and the one way a record is quarantined.

Every stage takes and returns one pandas DataFrame with a row per input record. A stage never drops
a row: it quarantines it by setting `reason` (and `detail`, and `duplicate_of` for duplicates). Rows
whose `reason` is null are the ones still kept. So `input_records == kept + quarantined` holds by
construction, by reason, at every stage boundary.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

# Columns every stage can rely on (ingest creates them).
RECORD_ID = "record_id"  # stable: sha256 of source, partition, line and content
SOURCE = "source"  # the file (path or URL) the record came from
PARTITION = "partition"  # "YYYY-MM-DD" from a dt= folder, "" when the source is not partitioned
LINE = "line"  # 1-based line (JSONL) or row (CSV/Parquet, header not counted) in the source
RAW = "raw"  # the original text of the record, so nothing is ever lost
EXAMPLE = "example"  # the parsed example (dict) or None when it could not be parsed
REASON = "reason"  # null while kept; the rule's error key once quarantined
DETAIL = "detail"  # human-readable: what exactly broke the rule
DUPLICATE_OF = "duplicate_of"  # record_id of the record this one duplicates or contradicts

BASE_COLUMNS = [RECORD_ID, SOURCE, PARTITION, LINE, RAW, EXAMPLE, REASON, DETAIL, DUPLICATE_OF]


def make_record_id(source: str, partition: str, line: int, raw: str) -> str:
    digest = hashlib.sha256(f"{source}\x1f{partition}\x1f{line}\x1f{raw}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:24]


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({column: pd.Series(dtype=object) for column in BASE_COLUMNS}).astype({LINE: "int64"})


def kept_mask(frame: pd.DataFrame) -> pd.Series:
    return frame[REASON].isna()


def quarantine(
    frame: pd.DataFrame,
    mask: pd.Series | np.ndarray,
    reason: str,
    detail: str | pd.Series | list[str],
    duplicate_of: pd.Series | list[str] | None = None,
) -> int:
    """Quarantine the still-kept rows selected by `mask` (in place); returns how many were quarantined.

    A row already quarantined keeps its first reason: the first rule it broke is the one reported.
    """
    selected = np.asarray(mask, dtype=bool) & kept_mask(frame).to_numpy()
    count = int(selected.sum())
    if not count:
        return 0
    frame.loc[selected, REASON] = reason
    frame.loc[selected, DETAIL] = _pick(detail, selected)
    if duplicate_of is not None:
        frame.loc[selected, DUPLICATE_OF] = _pick(duplicate_of, selected)
    return count


def _pick(values: str | pd.Series | list[str], selected: np.ndarray) -> object:
    if isinstance(values, str):
        return values
    return np.asarray(values, dtype=object)[selected]


def counts_by_reason(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame[REASON].dropna().value_counts().sort_index().items()}
