"""What the demo data guarantees, checked before anything is written: every planted record shows the
one defect it was planted for and no other, every record not planted is clean and distinct.

The checks use the library's own building blocks: the format rules (tuneline/formats.py), exact token
counts (tuneline/tokens.py), the credential and PII detectors (tuneline/secrets.py) and the normalised
forms and shingles (tuneline/normalize.py). They do not re-implement the data contract's stages or
their precedence: since a plant has a single defect, no precedence can give it another reason, and the
answer key is written from what was planted. That the pipeline quarantines exactly the planted records
with exactly these reasons is checked on the real data plane by tests/flows/test_prepare.py.

Similarity is checked with margins on both sides of the configured thresholds (planted pairs at least
`PLANTED_SIMILAR_AT_LEAST`, every other pair below `DISTINCT_BELOW`) and in every reading of
"normalised" (messages.READINGS), so the data does not hang on the threshold or the reading.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tuneline import formats, secrets, tokens
from tuneline.config import DedupeConfig, ValidationConfig
from tuneline.demo.content import DIRT, SYSTEM_PROMPT
from tuneline.demo.messages import (
    READINGS,
    chat_example,
    example_text,
    jaccard,
    jaccard_matrix,
    normalized_example,
    normalized_prompt_answer,
    shingles,
)
from tuneline.demo.planting import DemoRecord

MODEL = "tuneline-tiny"
CONTEXT_LIMIT = ValidationConfig().context_limits[MODEL]
ENCODING = tokens.encoding_name_for_model(MODEL)

DISTINCT_BELOW = 0.8
PLANTED_SIMILAR_AT_LEAST = 0.9
_CONFIGURED = (DedupeConfig().near_duplicate_threshold, DedupeConfig().leakage_threshold)
if not DISTINCT_BELOW <= min(_CONFIGURED) <= max(_CONFIGURED) < PLANTED_SIMILAR_AT_LEAST:
    raise RuntimeError(f"the dedupe thresholds {_CONFIGURED} left the demo data's margins")

UNREADABLE = ("invalid_encoding", "invalid_json")
# The reasons of the rules that relate records to each other (or to the eval set).
RELATIONAL = ("eval_leakage", "exact_duplicate", "near_duplicate", "contradiction")
# Kinds the demo must plant at least three times each.
REQUIRED_KINDS = tuple(k for k in DIRT.kinds if k not in ("contradiction_kept", "csv_empty_reply"))


def read_line(record: DemoRecord) -> tuple[str | None, Any]:
    """(why ingest cannot read it, the line as a JSON value): a CSV row is its mapped chat example."""
    if record.row is not None:
        _, _, message, reply = record.row
        return None, chat_example(message, reply)
    assert record.raw is not None
    try:
        text = record.raw.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_encoding", None
    try:
        return None, json.loads(text)
    except ValueError:
        return "invalid_json", None


def as_chat(line: dict[str, Any]) -> dict[str, Any]:
    """A legacy prompt/completion line as validate converts it; chat as it is."""
    if formats.detect_kind(line) == "completion":
        return formats.completion_to_chat(line, SYSTEM_PROMPT)
    return line


def check(records: Sequence[DemoRecord], eval_examples: Sequence[dict[str, Any]]) -> None:
    """Raise RuntimeError listing every broken guarantee."""
    problems: list[str] = []

    def expect(ok: bool, record: DemoRecord, what: str) -> None:
        if not ok:
            problems.append(f"{record.where} ({record.kind or 'clean'}: {record.note}) {what}")

    examples: dict[int, dict[str, Any]] = {}  # id(record) -> the example, for well-formed records
    for record in records:
        unreadable, line = read_line(record)
        if unreadable is not None or record.reason in UNREADABLE:
            expect(unreadable == record.reason, record, f"reads as {unreadable}, planted as {record.reason}")
            continue
        issue = formats.check_example(line)
        if issue is not None or record.reason in formats.RULES:
            got = issue.key if issue else None
            expect(got == record.reason, record, f"breaks format rule {got}, planted as {record.reason}")
            continue
        examples[id(record)] = as_chat(line)
    formed = [r for r in records if id(r) in examples]
    chats = [examples[id(r)] for r in formed]

    encoding = tokens.get_encoding(ENCODING)
    for record, n in zip(formed, tokens.count_tokens(chats, encoding), strict=True):
        expect((n > CONTEXT_LIMIT) == (record.reason == "too_long"), record, f"has {n} tokens")
    found_secrets, found_pii = secrets.find_secrets_and_pii([example_text(e) for e in chats])
    for index, record in enumerate(formed):
        finding = found_secrets.get(index)
        expect((finding is not None) == (record.reason == "secret_detected"), record, f"secret: {finding}")
        expect((index in found_pii) == (record.kind == "pii"), record, f"PII: {found_pii.get(index)}")

    related = [r for r in formed if r.reason is None or r.reason in RELATIONAL]
    for reading in READINGS:
        _check_relations(related, examples, eval_examples, reading, expect, problems)

    counts = Counter(r.kind for r in records)
    problems += [f"fewer than 3 records of kind {kind}" for kind in REQUIRED_KINDS if counts[kind] < 3]
    if problems:
        raise RuntimeError("the demo data breaks its own guarantees:\n- " + "\n- ".join(problems))


def _check_relations(
    related: list[DemoRecord],
    examples: dict[int, dict[str, Any]],
    eval_examples: Sequence[dict[str, Any]],
    reading: Any,
    expect: Any,
    problems: list[str],
) -> None:
    """Among the records the relational rules see: leaks are near their eval line and nothing else is
    near any; copies equal their earlier original and nothing else equals anything; the only similar
    pairs are the planted near-duplicates (later than their originals); the only shared questions are
    the planted contradictions, each answered differently from its kept, latest answer."""
    chat = {id(r): examples[id(r)] for r in related}
    eval_prompts = [shingles(normalized_prompt_answer(e, reading)[0]) for e in eval_examples]
    for record in related:
        prompt = shingles(normalized_prompt_answer(chat[id(record)], reading)[0])
        nearest = max((jaccard(prompt, other) for other in eval_prompts), default=0.0)
        if record.reason == "eval_leakage":
            assert record.eval_line is not None
            leaked = jaccard(prompt, eval_prompts[record.eval_line - 1])
            expect(
                leaked >= PLANTED_SIMILAR_AT_LEAST, record, f"is {leaked:.3f} like its eval line ({reading})"
            )
        else:
            expect(nearest < DISTINCT_BELOW, record, f"is {nearest:.2f} like an eval prompt ({reading})")

    keys = {id(r): normalized_example(chat[id(r)], reading) for r in related}
    copies = [r for r in related if r.reason == "exact_duplicate"]
    for record in copies:
        original = record.duplicate_of
        expect(original is not None and id(original) in keys, record, "copies no kept record")
        if original is not None and id(original) in keys:
            expect(keys[id(record)] == keys[id(original)], record, f"differs from its original ({reading})")
            expect(original.order < record.order, record, "comes before its original")
    distinct = [r for r in related if r.reason != "exact_duplicate"]
    if len({keys[id(r)] for r in distinct}) != len(distinct):
        problems.append(f"two records that are not planted copies are equal when normalised ({reading})")

    similarity = jaccard_matrix([shingles(keys[id(r)]) for r in distinct])
    planted_pairs = {
        (id(r), id(r.duplicate_of)) for r in distinct if r.reason == "near_duplicate" and r.duplicate_of
    }
    for i, j in zip(*np.nonzero(np.triu(similarity, k=1) >= DISTINCT_BELOW), strict=True):
        a, b = distinct[i], distinct[j]
        if (id(a), id(b)) not in planted_pairs and (id(b), id(a)) not in planted_pairs:
            problems.append(f"{a.where} and {b.where} have Jaccard {similarity[i, j]:.2f} ({reading})")
    position = {id(r): i for i, r in enumerate(distinct)}
    for record in distinct:
        if record.reason != "near_duplicate":
            continue
        original = record.duplicate_of
        if original is None or id(original) not in position:
            expect(False, record, "is near no kept record")
            continue
        value = similarity[position[id(record)], position[id(original)]]
        expect(PLANTED_SIMILAR_AT_LEAST <= value < 1.0, record, f"has Jaccard {value:.3f} with its original")
        expect(original.order < record.order, record, "comes before its original")

    by_prompt: dict[str, list[DemoRecord]] = {}
    for record in distinct:
        by_prompt.setdefault(normalized_prompt_answer(chat[id(record)], reading)[0], []).append(record)
    for group in by_prompt.values():
        if len(group) == 1:
            continue
        latest = max(group, key=lambda r: r.order)
        answer = normalized_prompt_answer(chat[id(latest)], reading)[1]
        for record in group:
            if record is latest:
                expect(record.reason is None, record, f"is the latest answer to its question ({reading})")
                continue
            expect(
                record.reason == "contradiction" and record.duplicate_of is latest,
                record,
                f"shares its question with {latest.where} ({reading})",
            )
            theirs = normalized_prompt_answer(chat[id(record)], reading)[1]
            expect(theirs != answer, record, f"answers as {latest.where} does ({reading})")
    for record in distinct:
        if record.reason == "contradiction":
            kept = record.duplicate_of
            shared = kept is not None and kept in by_prompt.get(
                normalized_prompt_answer(chat[id(record)], reading)[0], []
            )
            expect(shared, record, f"does not share its question with the record it contradicts ({reading})")
