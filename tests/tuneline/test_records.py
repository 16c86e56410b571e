from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tuneline import formats, records


def frame(n: int) -> pd.DataFrame:
    rows = [
        {
            records.RECORD_ID: records.make_record_id("a.jsonl", "2025-01-01", i + 1, f"line {i}"),
            records.SOURCE: "a.jsonl",
            records.PARTITION: "2025-01-01",
            records.LINE: i + 1,
            records.RAW: f"line {i}",
            records.EXAMPLE: {"i": i},
            records.REASON: None,
            records.DETAIL: None,
            records.DUPLICATE_OF: None,
        }
        for i in range(n)
    ]
    return pd.DataFrame(rows, columns=records.BASE_COLUMNS).astype(
        {records.REASON: object, records.DETAIL: object, records.DUPLICATE_OF: object}
    )


def test_record_id_is_stable_and_depends_on_every_part() -> None:
    base = records.make_record_id("a.jsonl", "2025-01-01", 3, '{"x":1}')
    assert base == records.make_record_id("a.jsonl", "2025-01-01", 3, '{"x":1}')
    assert len(base) == 24 and int(base, 16) >= 0
    variants = {
        records.make_record_id("b.jsonl", "2025-01-01", 3, '{"x":1}'),
        records.make_record_id("a.jsonl", "2025-01-02", 3, '{"x":1}'),
        records.make_record_id("a.jsonl", "2025-01-01", 4, '{"x":1}'),
        records.make_record_id("a.jsonl", "2025-01-01", 3, '{"x":2}'),
    }
    assert base not in variants and len(variants) == 4
    # Fields cannot run into each other: the separator is not part of any path or line number.
    assert records.make_record_id("a", "b", 1, "c") != records.make_record_id("a\x1fb", "", 1, "c")
    assert records.make_record_id("s", "", 1, "bad \udcff byte")  # a lone surrogate does not crash


def test_empty_frame_has_the_columns() -> None:
    empty = records.empty_frame()
    assert list(empty.columns) == records.BASE_COLUMNS
    assert empty[records.LINE].dtype == np.int64
    assert records.counts_by_reason(empty) == {}
    assert records.kept_mask(empty).empty


def test_quarantine_keeps_the_first_reason() -> None:
    data = frame(5)
    assert (
        records.quarantine(data, np.array([True, True, False, False, False]), "invalid_json", "broken") == 2
    )
    # Row 1 is already quarantined: it keeps invalid_json; only row 2 is newly quarantined.
    details = ["d0", "d1", "d2", "d3", "d4"]
    dupes = ["", "x", "id-of-0", "", ""]
    assert (
        records.quarantine(
            data, pd.Series([False, True, True, False, False]), "exact_duplicate", details, dupes
        )
        == 1
    )
    assert data[records.REASON].tolist() == ["invalid_json", "invalid_json", "exact_duplicate", None, None]
    assert data[records.DETAIL].tolist() == ["broken", "broken", "d2", None, None]
    assert data[records.DUPLICATE_OF].tolist() == [None, None, "id-of-0", None, None]
    assert records.kept_mask(data).tolist() == [False, False, False, True, True]
    assert records.quarantine(data, np.zeros(5, dtype=bool), "too_long", "x") == 0


def test_counts_by_reason_sum_to_quarantined() -> None:
    data = frame(6)
    records.quarantine(data, np.array([1, 0, 1, 0, 0, 0], dtype=bool), "too_long", "t")
    records.quarantine(data, np.array([0, 1, 0, 0, 0, 1], dtype=bool), "contradiction", "c")
    counts = records.counts_by_reason(data)
    assert counts == {"contradiction": 2, "too_long": 2}
    assert list(counts) == sorted(counts)
    assert sum(counts.values()) == int((~records.kept_mask(data)).sum())


def test_the_vocabulary_holds_every_reason_once_in_precedence_order() -> None:
    keys = [reason.key for reason in records.REASONS]
    assert len(keys) == len(set(keys)) == len(records.KNOWN_REASONS)
    # Every format rule is a reason of the validate stage, after ingest's reasons and before dedupe's.
    assert set(formats.RULES) <= set(records.VALIDATE_REASONS)
    stages = [reason.stage for reason in records.REASONS]
    assert stages == sorted(stages, key=["ingest", "validate", "dedupe"].index)
    assert keys.index(records.TOO_LONG) > max(keys.index(k) for k in formats.RULES)
    assert records.DATA_TYPE in formats.RULES
    assert records.INGEST_REASONS == (
        records.INVALID_JSON,
        records.INVALID_ENCODING,
        records.INVALID_CSV,
        records.CSV_MAPPING,
    )
    assert records.DEDUPE_REASONS == (
        records.SECRET_DETECTED,
        records.PII_DETECTED,
        records.EVAL_LEAKAGE,
        records.EXACT_DUPLICATE,
        records.NEAR_DUPLICATE,
        records.CONTRADICTION,
    )


def test_an_unknown_reason_is_refused() -> None:
    data = frame(2)
    with pytest.raises(records.UnknownReason, match="'made_up' is not a quarantine reason"):
        records.quarantine(data, np.array([True, False]), "made_up", "x")
    with pytest.raises(records.UnknownReason):
        records.quarantine_at(data, [], "made_up", [])
    assert records.kept_mask(data).all()


def test_quarantine_at_positions_and_requarantine_of_quarantined_rows_only() -> None:
    data = frame(4)
    assert records.quarantine_at(data, [3, 1], records.EXACT_DUPLICATE, ["d3", "d1"], ["id-a", "id-b"]) == 2
    assert data[records.DETAIL].tolist() == [None, "d1", None, "d3"]
    assert data[records.DUPLICATE_OF].tolist() == [None, "id-b", None, "id-a"]
    # A duplicate follows the record it names to a later rule's reason.
    assert records.requarantine(data, [1], records.CONTRADICTION, ["moved"], ["id-c"]) == 1
    assert data[records.REASON].tolist() == [None, "contradiction", None, "exact_duplicate"]
    assert data.loc[1, records.DETAIL] == "moved" and data.loc[1, records.DUPLICATE_OF] == "id-c"
    with pytest.raises(ValueError, match="kept row"):
        records.requarantine(data, [0], records.CONTRADICTION, ["x"], ["y"])
    assert records.kept_mask(data).tolist() == [True, False, True, False]


def test_sorted_codes_rank_a_categorical_as_its_strings() -> None:
    # Categories in the order the blocks met them, not sorted; a null ranks as "".
    values = ["b.jsonl", "a.jsonl", None, "c.jsonl", "a.jsonl", "", "b.jsonl"]
    categorical = pd.Series(records.labels(values))
    assert list(categorical.cat.categories) == sorted({v for v in values if v is not None})
    scrambled = categorical.cat.reorder_categories(["c.jsonl", "b.jsonl", "", "a.jsonl"])
    as_strings = pd.Series(values, dtype=object)
    expected = [2, 1, 0, 3, 1, 0, 2]
    assert records.sorted_codes(as_strings).tolist() == expected
    assert records.sorted_codes(categorical).tolist() == expected
    assert records.sorted_codes(scrambled).tolist() == expected


def test_digest_words_are_the_digests_bytes_as_words_and_a_null_reads_as_zeros() -> None:
    rng = np.random.default_rng(5)
    values = [rng.bytes(16) for _ in range(5)]
    index = pd.RangeIndex(6)
    column = records.digests(index, np.array([0, 1, 2, 4, 5]), values, 16)  # row 3 null
    # Two chunks, as blocks joined by the engines leave a column.
    data = pd.DataFrame({"key": pd.concat([column.iloc[:2], column.iloc[2:]], ignore_index=True)})
    words = records.digest_words(data, "key", [5, 3, 0, 2])
    assert words.dtype == np.uint64 and words.shape == (4, 2)
    assert [row.tobytes() for row in words] == [values[4], bytes(16), values[0], values[2]]
    assert records.digest_words(data, "key", []).shape == (0, 2)
