from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tuneline import records, threads
from tuneline.config import DedupeConfig
from tuneline.near_duplicates import local_candidates
from tuneline.normalize import jaccard, normalized_example, normalized_prompt_and_answer, word_shingles
from tuneline.records import ANSWER_KEY, PROMPT_KEY, SPLIT_KEY
from tuneline.tasks import export
from tuneline.tasks.dedupe import (
    batch_rules,
    batch_rules_task,
    credentials_and_pii,
    dedupe,
    per_record_rules,
    record_order,
)

SYSTEM = "You are the Acme support assistant."
CONFIG = DedupeConfig()
# Contradiction tests: no record is a near-duplicate of another unless identical.
ONLY_IDENTICAL = DedupeConfig(near_duplicate_threshold=1.0)

WORDS = [f"word{i}" for i in range(300)]


def chat(
    question: str, answer: str = "Category: billing. We will look into it.", system: str = SYSTEM
) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def question(seed: int, length: int = 40) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(length))


def frame_of(
    *examples: Any, order: list[tuple[str, str, int]] | None = None, reasons: dict[int, str] | None = None
) -> pd.DataFrame:
    """A validated record frame: one row per example, line i + 1 of one file unless `order` says
    (partition, source, line); `reasons` quarantines rows beforehand."""
    rows = []
    for index, example in enumerate(examples):
        partition, source, line = (
            order[index] if order else ("2026-11-20", "dt=2026-11-20/part-0.jsonl", index + 1)
        )
        raw = json.dumps(example)
        rows.append(
            {
                records.RECORD_ID: records.make_record_id(source, partition, line, raw),
                records.SOURCE: source,
                records.PARTITION: partition,
                records.LINE: line,
                records.RAW: raw,
                records.EXAMPLE: example,
                records.REASON: None,
                records.DETAIL: None,
                records.DUPLICATE_OF: None,
            }
        )
    frame = pd.DataFrame(rows, columns=records.BASE_COLUMNS).astype({records.LINE: "int64"})
    for position, reason in (reasons or {}).items():
        mask = np.zeros(len(frame), dtype=bool)
        mask[position] = True
        records.quarantine(frame, mask, reason, "quarantined before dedupe")
    return frame


def reasons(frame: pd.DataFrame) -> list[str | None]:
    return [None if pd.isna(r) else r for r in frame[records.REASON]]


def duplicate_of(frame: pd.DataFrame, position: int) -> int | None:
    """The position of the record a row names in duplicate_of."""
    value = frame[records.DUPLICATE_OF].iloc[position]
    if pd.isna(value):
        return None
    return int(np.flatnonzero(frame[records.RECORD_ID].to_numpy() == value)[0])


EVAL = [
    chat(
        "How do I change the email address on my Acme account? I moved to a new provider last week and want receipts there."
    )
]


# --- credentials and PII -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "credential",
    [
        "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2,
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2c3D4e5F6g7H8i9J0" * 2,
        "xoxb-123456789012-1234567890123-abcdefghijklmnop",
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg\n-----END EC PRIVATE KEY-----",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ],
)
def test_credentials_are_quarantined_naming_their_kind(credential: str) -> None:
    frame = frame_of(chat(f"Sign-in fails. My key is {credential} if that helps."), chat(question(1)))
    out = dedupe(frame, [], CONFIG)
    assert reasons(out) == ["secret_detected", None]
    detail = out[records.DETAIL].iloc[0]
    assert "credential" in detail and "revoke" in detail
    assert credential not in detail  # the detail masks it; `raw` keeps the record


def test_credentials_in_tool_call_arguments_are_found() -> None:
    example = chat("Look up my order")
    example["messages"][2] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "c",
                "type": "function",
                "function": {"name": "f", "arguments": '{"key": "AKIAIOSFODNN7EXAMPLE"}'},
            }
        ],
    }
    assert reasons(dedupe(frame_of(example), [], CONFIG)) == ["secret_detected"]


def test_ordinary_support_text_is_not_flagged() -> None:
    texts = [
        "Order #48213 arrived broken; ticket TCK-2024-000123, tracking 1Z999AA10123456784.",
        "Charged $1,299.00 twice on 2026-11-02. Invoice INV-88213, account 1234567.",
        "App version 4.12.3 (build 20261102) crashes; error 0x80070005 after reset.",
        "See https://help.acme.example/refunds?order=48213 - serial SN-4821-3394-2211.",
    ]
    frame = frame_of(*(chat(t) for t in texts))
    out = dedupe(frame, [], DedupeConfig(pii="quarantine"))
    assert reasons(out) == [None] * len(texts)
    assert list(out[records.EXAMPLE]) == list(frame[records.EXAMPLE])


PII_TEXT = "Send the invoice to maria.lopez12@example.com or call (212) 555-0147."


def test_pii_policy_allow_keeps_the_text() -> None:
    frame = frame_of(chat(PII_TEXT))
    out = dedupe(frame, [], DedupeConfig(pii="allow"))
    assert reasons(out) == [None]
    assert out[records.EXAMPLE].iloc[0] == frame[records.EXAMPLE].iloc[0]


def test_pii_policy_redact_writes_a_new_example_and_leaves_the_input_alone() -> None:
    frame = frame_of(chat(PII_TEXT), chat(question(2)))
    before = copy.deepcopy(frame[records.EXAMPLE].iloc[0])
    out = dedupe(frame, [], DedupeConfig(pii="redact"))
    assert reasons(out) == [None, None]
    redacted = out[records.EXAMPLE].iloc[0]
    assert redacted["messages"][1]["content"] == "Send the invoice to [email] or call [phone]."
    assert frame[records.EXAMPLE].iloc[0] == before  # the input frame's objects are untouched
    assert out[records.RAW].iloc[0] == frame[records.RAW].iloc[0]  # raw keeps the original
    assert out[records.EXAMPLE].iloc[1] is frame[records.EXAMPLE].iloc[1]
    # The digests dedupe keeps are those of the redacted example, the one exported.
    assert normalized_prompt_and_answer(redacted)[0] == "send the invoice to email or call phone"
    assert out[SPLIT_KEY].iloc[0] == export.split_key(redacted)
    assert out[SPLIT_KEY].iloc[0] != export.split_key(frame[records.EXAMPLE].iloc[0])


def test_pii_policy_quarantine_names_what_was_found() -> None:
    out = dedupe(frame_of(chat(PII_TEXT), chat(question(3))), [], DedupeConfig(pii="quarantine"))
    assert reasons(out) == ["pii_detected", None]
    assert "an email address and a phone number" in out[records.DETAIL].iloc[0]
    assert "dedupe.pii" in out[records.DETAIL].iloc[0]


def test_a_credential_wins_over_pii() -> None:
    out = dedupe(frame_of(chat(PII_TEXT + " key AKIAIOSFODNN7EXAMPLE")), [], DedupeConfig(pii="quarantine"))
    assert reasons(out) == ["secret_detected"]


# --- eval leakage --------------------------------------------------------------------------------------


def test_eval_leakage_exact_and_near_with_the_eval_example_named() -> None:
    leaked = EVAL[0]["messages"][1]["content"]
    frame = frame_of(
        chat(leaked.upper().replace("?", " ?!"), system="Another system prompt."),  # equal once normalised
        chat(leaked.replace("there.", "here.")),  # the last word changed: Jaccard 20/22
        chat(leaked.replace("last week and want receipts there", "recently")),  # too different
        chat(question(4)),
    )
    out = dedupe(frame, [{"not": "an example"}, *EVAL], CONFIG)
    assert reasons(out) == ["eval_leakage", "eval_leakage", None, None]
    assert "equals the prompt of eval example 2" in out[records.DETAIL].iloc[0]
    assert "near-duplicate (word-shingle Jaccard 0.909 >= 0.85)" in out[records.DETAIL].iloc[1]
    assert "eval example 2" in out[records.DETAIL].iloc[1]


# --- duplicates ----------------------------------------------------------------------------------------


def test_exact_duplicates_up_to_case_whitespace_and_punctuation() -> None:
    original = chat("Where is my order #48213? It's late.", "Category: shipping. It ships today.")
    variant = chat("WHERE is my order 48213 -- it's   late", "category: shipping; it ships today!")
    frame = frame_of(original, chat(question(5)), variant, copy.deepcopy(original))
    out = dedupe(frame, [], CONFIG)
    assert reasons(out) == [None, None, "exact_duplicate", "exact_duplicate"]
    assert duplicate_of(out, 2) == 0 and duplicate_of(out, 3) == 0
    assert f"record {out[records.RECORD_ID].iloc[0]} (line 1 of" in out[records.DETAIL].iloc[2]


def test_first_occurrence_is_by_partition_source_and_line_not_frame_order() -> None:
    example = chat(question(6))
    order = [("2026-11-21", "a.jsonl", 1), ("2026-11-20", "b.jsonl", 9), ("2026-11-20", "a.jsonl", 5)]
    frame = frame_of(example, copy.deepcopy(example), copy.deepcopy(example), order=order)
    assert list(record_order(frame)) == [2, 1, 0]
    out = dedupe(frame, [], CONFIG)
    assert reasons(out) == ["exact_duplicate", "exact_duplicate", None]
    assert duplicate_of(out, 0) == 2 and duplicate_of(out, 1) == 2


def test_near_duplicates_are_decided_on_the_exact_jaccard() -> None:
    base = question(7, 60)
    words = base.split()
    examples = [chat(base)]
    for edits in range(1, 7):  # each variant changes its own positions: 1 to 6 words
        changed = list(words)
        for k in range(edits):
            changed[(7 * edits + 9 * k) % len(words)] = f"other{edits}"
        examples.append(chat(" ".join(changed)))
    out = dedupe(frame_of(*examples), [], CONFIG)
    sets = [word_shingles(normalized_example(e), CONFIG.shingle_size) for e in examples]
    threshold = CONFIG.near_duplicate_threshold
    kept: list[int] = []
    for index in range(len(examples)):  # the rule by its definition: any earlier kept record
        similar = [k for k in kept if jaccard(sets[index], sets[k]) >= threshold]
        assert (reasons(out)[index] == "near_duplicate") == bool(similar), (
            index,
            jaccard(sets[index], sets[0]),
        )
        if similar:
            other = duplicate_of(out, index)
            assert other in similar
            assert (
                f"Jaccard {jaccard(sets[index], sets[other]):.3f} >= 0.85" in out[records.DETAIL].iloc[index]
            )
        else:
            kept.append(index)
    assert set(reasons(out)[1:]) == {"near_duplicate", None}  # both sides of the threshold occur


def test_rules_apply_in_the_contract_order() -> None:
    leaked = EVAL[0]["messages"][1]["content"]
    original = chat(question(8, 60))
    near = copy.deepcopy(original)
    near["messages"][1]["content"] = near["messages"][1]["content"].replace("word", "Word", 1) + " extra"
    frame = frame_of(
        chat(leaked + " AKIAIOSFODNN7EXAMPLE"),  # secret and leak: secret
        chat(leaked),  # leak
        chat(leaked),  # leak (not a duplicate: the first rule it breaks)
        original,
        copy.deepcopy(original),  # exact duplicate
        near,  # near-duplicate
    )
    out = dedupe(frame, EVAL, CONFIG)
    assert reasons(out) == [
        "secret_detected",
        "eval_leakage",
        "eval_leakage",
        None,
        "exact_duplicate",
        "near_duplicate",
    ]


# --- contradictions --------------------------------------------------------------------------------------

ASK = "How do I get a refund for a damaged blender?"
ANSWER_A = "Category: refunds. Send us a photo and we refund you within five days."
ANSWER_B = "Category: shipping. We will send a replacement blender free of charge."
ANSWER_C = "Category: billing. Refunds go back to the original card in ten days."


def contradicting(*answers_and_systems: tuple[str, str]) -> pd.DataFrame:
    return frame_of(*(chat(ASK, answer, system) for answer, system in answers_and_systems), chat(question(9)))


def test_contradictions_keep_latest() -> None:
    frame = contradicting((ANSWER_A, SYSTEM), (ANSWER_B, SYSTEM), (ANSWER_C, SYSTEM))
    out = dedupe(frame, [], DedupeConfig(near_duplicate_threshold=1.0, contradictions="keep-latest"))
    assert reasons(out) == ["contradiction", "contradiction", None, None]
    assert duplicate_of(out, 0) == 2 and duplicate_of(out, 1) == 2
    assert "keep-latest" in out[records.DETAIL].iloc[0]


def test_copies_of_a_losing_answer_are_contradictions_too() -> None:
    # Two copies of answer A, then answer B: the copy named record 0 as kept in its place, but
    # keep-latest quarantines record 0; under quarantine-all no record of the prompt is kept.
    frame = contradicting((ANSWER_A, SYSTEM), (ANSWER_A, SYSTEM), (ANSWER_B, SYSTEM))
    latest = dedupe(frame, [], DedupeConfig(contradictions="keep-latest"))
    assert reasons(latest) == ["contradiction", "contradiction", None, None]
    assert duplicate_of(latest, 0) == 2 and duplicate_of(latest, 1) == 2
    assert latest[records.DETAIL].iloc[1].startswith("the same normalised example as record")
    everything = dedupe(frame, [], DedupeConfig(contradictions="quarantine-all"))
    assert reasons(everything) == ["contradiction"] * 3 + [None]
    assert duplicate_of(everything, 1) == duplicate_of(everything, 0) == 2


def test_a_duplicate_follows_the_record_it_names_when_a_later_rule_quarantines_it() -> None:
    long = question(21, 60)
    edited = " ".join(["changed", *long.split()[1:]])  # one word of 60 changed: a near duplicate
    # Record 2 is the same as record 1, which is a near duplicate of record 0: record 0 is kept in
    # place of both.
    chained = dedupe(frame_of(chat(long), chat(edited), chat(edited)), [], CONFIG)
    assert reasons(chained) == [None, "near_duplicate", "near_duplicate"]
    assert duplicate_of(chained, 1) == duplicate_of(chained, 2) == 0
    assert chained[records.DETAIL].iloc[2].startswith("the same normalised example as record")
    # Record 1 is a near duplicate of record 0, whose answer loses to record 2's: record 1 repeats
    # the answer that lost, and contradicts record 2 too.
    lost = dedupe(frame_of(chat(long, ANSWER_A), chat(edited, ANSWER_A), chat(long, ANSWER_B)), [], CONFIG)
    assert reasons(lost) == ["contradiction", "contradiction", None]
    assert duplicate_of(lost, 0) == duplicate_of(lost, 1) == 2
    assert lost[records.DETAIL].iloc[1].startswith("a near-duplicate of record")


def test_contradictions_keep_majority_and_its_tie_break() -> None:
    frame = contradicting((ANSWER_A, SYSTEM), (ANSWER_B, SYSTEM), (ANSWER_A, "Another system prompt."))
    out = dedupe(frame, [], DedupeConfig(near_duplicate_threshold=1.0, contradictions="keep-majority"))
    assert reasons(out) == [None, "contradiction", None, None]
    assert duplicate_of(out, 1) == 2  # the latest record with the winning answer
    assert "2 of 3" in out[records.DETAIL].iloc[1]
    tie = contradicting((ANSWER_A, SYSTEM), (ANSWER_B, SYSTEM))
    out = dedupe(tie, [], DedupeConfig(near_duplicate_threshold=1.0, contradictions="keep-majority"))
    assert reasons(out) == ["contradiction", None, None]  # a tie goes to the latest answer


def test_contradictions_quarantine_all() -> None:
    frame = contradicting((ANSWER_A, SYSTEM), (ANSWER_B, SYSTEM), (ANSWER_A, "Another system prompt."))
    out = dedupe(frame, [], DedupeConfig(near_duplicate_threshold=1.0, contradictions="quarantine-all"))
    assert reasons(out) == ["contradiction", "contradiction", "contradiction", None]
    assert duplicate_of(out, 0) == 1 and duplicate_of(out, 1) == 2 and duplicate_of(out, 2) == 1


def test_agreeing_records_with_one_prompt_are_not_contradictions() -> None:
    frame = contradicting((ANSWER_A, SYSTEM), (ANSWER_A, "Another system prompt."))
    out = dedupe(frame, [], ONLY_IDENTICAL)
    assert reasons(out) == [None, None, None]
    assert out[ANSWER_KEY].iloc[0] == out[ANSWER_KEY].iloc[1]
    assert out[PROMPT_KEY].iloc[0] == out[PROMPT_KEY].iloc[1]


# --- the invariant ---------------------------------------------------------------------------------------


def test_only_kept_rows_are_touched_and_no_row_is_lost() -> None:
    example = chat(question(10))
    frame = frame_of(
        example,
        copy.deepcopy(example),
        chat(PII_TEXT),
        chat("bad", "AKIAIOSFODNN7EXAMPLE"),
        reasons={1: "invalid_weight", 2: "too_long", 3: "missing_content"},
    )
    snapshot = frame.copy(deep=True)
    out = dedupe(frame, [], CONFIG)
    pd.testing.assert_frame_equal(frame, snapshot)  # the input frame is not modified
    assert len(out) == len(frame) and list(out[records.RECORD_ID]) == list(frame[records.RECORD_ID])
    assert reasons(out) == [None, "invalid_weight", "too_long", "missing_content"]
    assert list(out[records.DETAIL].iloc[1:]) == ["quarantined before dedupe"] * 3
    assert out[records.EXAMPLE].iloc[2] is frame[records.EXAMPLE].iloc[2]  # a quarantined row is not redacted
    for key in (PROMPT_KEY, ANSWER_KEY, SPLIT_KEY):
        assert out[key].iloc[0] is not None and out[key].iloc[1:].isna().all()


def test_an_empty_frame_and_the_prefect_task(prefect_server: None) -> None:
    empty = frame_of()
    assert len(dedupe(empty, EVAL, CONFIG)) == 0
    frame = frame_of(chat(question(11)), chat(question(11)))
    screened, documents = per_record_rules(frame, EVAL, CONFIG)
    assert reasons(batch_rules_task(screened, documents, CONFIG)) == [None, "exact_duplicate"]


@pytest.mark.skipif(threads.available_cpus() < 2, reason="needs two cores")
def test_the_batch_rules_keep_to_the_threads_they_are_given() -> None:
    """The ray engine's flow passes threads=1 (engines.flow_threads: its batch is too large for one
    machine, and threads would hold more): the candidate search runs inside that limit, with the same
    answer as on the flow's threads."""
    base = [question(500 + k, 30) for k in range(20)]
    examples = [chat(" ".join(base[i % 20].split()[: 29 - i % 2]) + f" order{i}") for i in range(200)]
    screened, documents = per_record_rules(frame_of(*examples), EVAL, CONFIG)
    seen: list[int] = []

    def engine_search(*arguments: Any) -> Iterator[np.ndarray]:
        seen.append(threads.flow_threads())
        return local_candidates(*arguments)

    out = {limit: batch_rules(screened, documents, CONFIG, engine_search, limit) for limit in (1, None)}
    assert seen == [1, threads.flow_threads()] and seen[1] > 1
    pd.testing.assert_frame_equal(out[1], out[None])
    assert "near_duplicate" in reasons(out[1])


TEMPLATES = [question(100 + k, 30) for k in range(4)]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # template
            st.integers(0, 3),  # words changed
            st.sampled_from(["", "AKIAIOSFODNN7EXAMPLE", "jo@example.com", "!!"]),
            st.sampled_from([ANSWER_A, ANSWER_B]),
            st.sampled_from([None, "invalid_json"]),
        ),
        max_size=25,
    ),
    st.sampled_from(["keep-latest", "keep-majority", "quarantine-all"]),
    st.sampled_from(["allow", "redact", "quarantine"]),
)
def test_the_invariant_holds_on_generated_frames(rows: list, policy: str, pii: str) -> None:
    examples = []
    prior = {}
    for index, (template, edits, extra, answer, reason) in enumerate(rows):
        words = TEMPLATES[template].split()
        for k in range(edits):
            words[3 * k] = f"changed{index}"
        examples.append(chat(" ".join(words) + " " + extra, answer))
        if reason:
            prior[index] = reason
    frame = frame_of(*examples, reasons=prior)
    config = DedupeConfig.model_validate({"contradictions": policy, "pii": pii})
    out = dedupe(frame, EVAL, config)
    assert len(out) == len(frame)
    for position in range(len(out)):
        if position in prior:
            assert reasons(out)[position] == prior[position]
    kept = out[out[records.REASON].isna()]
    keys = [normalized_example(e) for e in kept[records.EXAMPLE]]
    assert len(set(keys)) == len(keys)  # no two kept records are exact duplicates
    ids = dict(zip(out[records.RECORD_ID], range(len(out)), strict=True))
    for position, row in enumerate(out.itertuples()):
        if row.reason in ("exact_duplicate", "near_duplicate"):
            other = ids[row.duplicate_of]
            assert pd.isna(out[records.REASON].iloc[other])  # the record kept in its place
            a, b = (normalized_example(out[records.EXAMPLE].iloc[k]) for k in (position, other))
            similarity = jaccard(word_shingles(a, 3), word_shingles(b, 3))
            assert similarity >= config.near_duplicate_threshold
            assert record_order(out)[other] < record_order(out)[position]
        if row.reason == "contradiction":
            other = ids[row.duplicate_of]
            copied = re.match(r"a near-duplicate of record (\S+) ", row.detail)
            if copied:  # a near duplicate of a record that lost: it contradicts what that one does
                lost = ids[copied.group(1)]
                assert out[records.REASON].iloc[lost] == "contradiction"
                assert out[records.DUPLICATE_OF].iloc[lost] == row.duplicate_of
                a, b = (normalized_example(out[records.EXAMPLE].iloc[k]) for k in (position, lost))
                assert jaccard(word_shingles(a, 3), word_shingles(b, 3)) >= config.near_duplicate_threshold
                continue
            mine, theirs = (
                normalized_prompt_and_answer(out[records.EXAMPLE].iloc[k]) for k in (position, other)
            )
            assert mine[0] == theirs[0] and mine[1] != theirs[1]
            assert out[PROMPT_KEY].iloc[other] == out[PROMPT_KEY].iloc[position]
    if pii != "allow":
        assert not any("jo@example.com" in json.dumps(e) for e in kept[records.EXAMPLE])


def test_credentials_alone_for_data_that_is_not_deduplicated() -> None:
    same = chat(question(1))
    frame = frame_of(same, same, chat("My key is AKIAIOSFODNN7EXAMPLE"), chat("mail ana@example.com"))
    out = credentials_and_pii(frame, CONFIG)
    assert reasons(out) == [None, None, "secret_detected", None]  # duplicates stay: only rule 1 runs
    assert out[records.EXAMPLE].iloc[3]["messages"][1]["content"] == "mail [email]"  # dedupe.pii: redact
