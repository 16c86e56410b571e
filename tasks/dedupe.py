"""Dedupe: credentials, PII, eval leakage, exact and near duplicates, and contradictions.

Guarantees of `dedupe` (its reasons, in precedence order, are tuneline/records.py's):
- it returns a new frame with the same rows in the same order; only rows still kept on entry are
  looked at, and a row is never dropped: it is quarantined with `records.quarantine`, so a row
  already quarantined keeps its first reason (but for a duplicate following the record it names,
  below, with `records.requarantine`);
- the rules run in the order of that precedence, each on the rows the earlier ones kept:
  1. `secret_detected`: a credential in any text of the example (tuneline/secrets.py); the detail
     names the detector and the text that holds it, never any part of the value;
     PII (emails, phone numbers) by `dedupe.pii`: allow (kept as is), redact (kept; `example` becomes a
     new dict with [email]/[phone] in place; the input's objects are never modified), quarantine
     (`pii_detected`);
  2. `eval_leakage`: the normalised prompt equals, or has word-shingle Jaccard >= leakage_threshold
     with, the normalised prompt of an eval example; detail names the eval example;
  3. `exact_duplicate`: the same normalised example as an earlier record;
  4. `near_duplicate`: word-shingle Jaccard >= near_duplicate_threshold with an earlier kept record;
  5. `contradiction`: the same normalised prompt as another kept record with a different normalised
     answer, resolved by `dedupe.contradictions` (keep-latest | keep-majority | quarantine-all);
- preference (DPO) lines: a record is its input and its preferred answer (the non-preferred answer
  is left out of rules 3 and 4, so the same input and preferred answer with another non-preferred
  answer is a duplicate); rule 5 looks for the same input with the preferred and the non-preferred
  answers swapped (two inputs each preferring the other's answer), resolved by the same policy; the
  same input with different preferred answers is no contradiction (A > C and B > C agree);
- reinforcement lines (`messages` and grader fields): a record is its prompt and its grader fields
  (`reference_answer`, ...), which are its answer for rules 3 to 5: the same prompt with other
  grader fields is a contradiction;
- "earlier" and "latest" mean the (partition, source, line) order; `duplicate_of` is the record_id of
  the record kept in a duplicate's place (for contradictions: the record it contradicts);
- a duplicate follows the record it names when a later rule quarantines that record: an exact
  duplicate of a near duplicate is a near duplicate of the record kept in their place, and a duplicate
  of a record that rule 5 quarantines is a contradiction, with that record's `duplicate_of`;
- columns `prompt_key`, `answer_key` and `split_key` (digests of the normalised prompt and answer:
  tuneline/records.py) are set on every row that was kept when the duplicate rules began, null
  elsewhere (`prompt_key` also where the normalised prompt is empty).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneline import records
from tuneline.config import DedupeConfig
from tuneline.formats import (
    CHAT_KEYS,
    example_text_places,
    example_texts,
    grader_fields,
    message_text,
    prompt_and_answer,
)
from tuneline.heap import release_free_memory
from tuneline.near_duplicates import (
    CandidateSearch,
    Documents,
    TextTable,
    find_exact_duplicates,
    find_matches,
    find_near_duplicates,
)
from tuneline.normalize import Normalizer, normalize_text, turns_prompt_and_answer
from tuneline.secrets import detect_secret, find_secrets_and_pii, redact_example
from tuneline.tasks import export
from tuneline.threads import limited

_PII_NAMES = {"email": "an email address", "phone": "a phone number"}

log = logging.getLogger(__name__)


def record_order(frame: pd.DataFrame) -> np.ndarray:
    """Each row's rank in (partition, source, line) order: the order "earlier" and "latest" refer to."""
    if not len(frame):
        return np.zeros(0, dtype=np.int64)
    partition = records.sorted_codes(frame[records.PARTITION])
    source = records.sorted_codes(frame[records.SOURCE])
    line = frame[records.LINE].to_numpy(dtype=np.int64)
    order = np.lexsort((np.arange(len(frame)), line, source, partition))
    rank = np.empty(len(frame), dtype=np.int64)
    rank[order] = np.arange(len(frame))
    return rank


class _Stage:
    """The frame being deduplicated, and how a rule quarantines positions of it."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.n = len(frame)
        # Read for the rows a rule names only: as arrays of Python strings, the ids and sources of a
        # million rows would take about 0.15 GB for as long as the rules run.
        self._record_id = frame[records.RECORD_ID]
        self._source = frame[records.SOURCE]
        self.line = frame[records.LINE].to_numpy()

    def record_ids(self, positions: np.ndarray | Sequence[int]) -> list[Any]:
        return self._record_id.iloc[np.asarray(positions, dtype=np.int64)].tolist()

    def positions_of(self, record_ids: Sequence[Any]) -> dict[Any, int]:
        """The position of each of `record_ids` found in the frame (the last, were one there twice)."""
        found = np.flatnonzero(self._record_id.isin(set(record_ids)).to_numpy())
        return dict(zip(self.record_ids(found), found.tolist(), strict=True))

    def kept(self) -> np.ndarray:
        return np.flatnonzero(records.kept_mask(self.frame).to_numpy())

    def quarantine(
        self,
        positions: np.ndarray | Sequence[int],
        reason: str,
        details: Sequence[str],
        duplicate_of: np.ndarray | Sequence[int] | None = None,
    ) -> int:
        """Quarantine rows by position; `details` and `duplicate_of` (positions) go with them."""
        others = None
        if duplicate_of is not None:
            others = self.record_ids(duplicate_of)
        return records.quarantine_at(self.frame, positions, reason, details, others)

    def describe(self, position: int) -> str:
        # One cell each: a take (describe_all) walks every chunk of the column, a cell only finds one.
        record_id, source = self._record_id.iat[position], self._source.iat[position]
        return f"record {record_id} (line {self.line[position]} of {source})"

    def describe_all(self, positions: np.ndarray | Sequence[int]) -> list[str]:
        at = np.asarray(positions, dtype=np.int64)
        return [
            f"record {record_id} (line {line} of {source})"
            for record_id, line, source in zip(
                self.record_ids(at), self.line[at].tolist(), self._source.iloc[at].tolist(), strict=True
            )
        ]


def dedupe(
    frame: pd.DataFrame,
    eval_examples: list[dict[str, Any]],
    config: DedupeConfig,
    *,
    candidates: CandidateSearch | None = None,
) -> pd.DataFrame:
    """The frame with the dedupe rules applied (see the module docstring for the guarantees):
    `per_record_rules` (rules 1 and 2), then `batch_rules` (rules 3 to 5). `candidates`: how the
    near-duplicate search finds its candidate pairs (default: here; the ray engine's map -> shuffle
    -> reduce gives the same pairs)."""
    out, documents = per_record_rules(frame, eval_examples, config)
    return batch_rules(out, documents, config, candidates)


def per_record_rules(
    frame: pd.DataFrame, eval_examples: Sequence[Any], config: DedupeConfig
) -> tuple[pd.DataFrame, Documents]:
    """Rules 1 and 2, and the normalised forms the later rules compare: every one a
    function of one record (and the eval set), so a block of records gets the same answer here as in
    the whole batch (the engines run this per block, tuneline/engines/blocks.py). Returns the new
    frame, with its `prompt_key`, `answer_key` and `split_key` columns set on the rows still kept
    after rule 1, and the normalised examples of those rows, in frame order, as Documents."""
    # Copy-on-write: only the columns written here are copied (raw text stays shared).
    out = frame.copy(deep=False)
    stage = _Stage(out)
    examples = out[records.EXAMPLE].to_numpy(dtype=object, copy=True)
    _credentials_and_pii(stage, examples, config)
    out[records.EXAMPLE] = pd.Series(examples, index=out.index, dtype=object)

    positions = stage.kept()
    table = TextTable()
    documents, prompts, answers = normalized_documents(examples[positions], table)
    _set_keys(out, positions, examples[positions], prompts, answers)
    _eval_leakage(stage, positions, prompts, table, eval_examples, config)
    return out, documents


def batch_rules(
    frame: pd.DataFrame,
    documents: Documents,
    config: DedupeConfig,
    candidates: CandidateSearch | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Rules 3 to 5 across the whole batch, on a frame `per_record_rules` made (or the concatenation of
    the frames it made per block, with their Documents concatenated: the same thing). `threads`: at
    most that many of the flow's threads for their numpy work (tuneline/threads.py's `limited`; None:
    one per core, up to a few; the flow passes engines.flow_threads of its execution config)."""
    with limited(threads):
        out = frame.copy(deep=False)
        stage = _Stage(out)
        rank = record_order(out)
        # The rows the duplicate rules began with (kept after rule 1): those with normalised forms.
        positions = np.flatnonzero(out[records.SPLIT_KEY].notna().to_numpy())
        assert len(positions) == len(documents), "the Documents are not those of the frame's rows"
        # Index into `positions` (and `documents`) of the records each rule still has to look at.
        alive = records.kept_mask(out).to_numpy()[positions]

        alive &= ~_exact_duplicates(stage, positions, documents, rank, alive)
        # What the record order and the exact duplicates let go (a GB at ten million records) goes back
        # to the OS before the near-duplicate search, the flow's peak (tuneline/heap.py).
        release_free_memory()
        alive &= ~_near_duplicates(stage, positions, documents, rank, alive, config, candidates)
        _contradictions(stage, positions, rank, alive, config)
        _duplicates_of_quarantined_records(stage)
        log.info("dedupe: %s", records.counts_by_reason(out))
        return out


def credentials_and_pii(frame: pd.DataFrame, config: DedupeConfig) -> pd.DataFrame:
    """Rule 1 alone (credentials, then PII by `dedupe.pii`), for data that is not deduplicated against
    the batch but is trained on all the same: the general corpus mixed into training."""
    out = frame.copy(deep=False)
    examples = out[records.EXAMPLE].to_numpy(dtype=object, copy=True)
    _credentials_and_pii(_Stage(out), examples, config)
    out[records.EXAMPLE] = pd.Series(examples, index=out.index, dtype=object)
    return out


def _credentials_and_pii(stage: _Stage, examples: np.ndarray, config: DedupeConfig) -> None:
    """Rule 1: credentials, then PII by policy (redaction writes new dicts into `examples`)."""
    positions = stage.kept()
    distinct, text_of, owner_of = _texts_of(examples[positions])
    secrets, pii = find_secrets_and_pii(distinct)
    first_finding: dict[int, str] = {}
    for occurrence in np.flatnonzero(np.isin(text_of, list(secrets))).tolist():
        # The detector's name only: a detail never holds any part of the value.
        first_finding.setdefault(int(owner_of[occurrence]), secrets[int(text_of[occurrence])].secret_type)
    flagged = sorted(first_finding)
    stage.quarantine(
        positions[flagged],
        records.SECRET_DETECTED,
        [
            f"contains what looks like a credential ({first_finding[k]}) in "
            f"{_where_secret(examples[positions[k]])}; remove it from the source data (and revoke it)"
            for k in flagged
        ],
    )
    if config.pii == "allow":
        return
    kinds_by_record: dict[int, set[str]] = {}
    for occurrence in np.flatnonzero(np.isin(text_of, list(pii))).tolist():
        owner = int(owner_of[occurrence])
        if owner not in first_finding:
            kinds_by_record.setdefault(owner, set()).update(pii[int(text_of[occurrence])])
    found = sorted(kinds_by_record)
    if config.pii == "quarantine":
        stage.quarantine(
            positions[found],
            records.PII_DETECTED,
            [
                f"contains {' and '.join(_PII_NAMES[k] for k in sorted(kinds_by_record[i]))} "
                "(dedupe.pii: quarantine); remove it from the source data, or set dedupe.pii: redact"
                for i in found
            ],
        )
        return
    for index in found:
        examples[positions[index]] = redact_example(examples[positions[index]])


def _where_secret(example: dict[str, Any]) -> str:
    """Which text of the example holds the first credential (for a flagged record only: the scan above
    works on distinct texts and does not keep their places)."""
    for where, text in example_text_places(example):
        if detect_secret(text) is not None:
            return where
    return "the example"


def _texts_of(examples: Sequence[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The distinct free texts of the examples (a text shared by many, like the system prompt, is
    scanned once), and for each occurrence of a text, in order: which distinct text, which example."""
    distinct: dict[str, int] = {}
    text_of: list[int] = []
    owner_of: list[int] = []
    for index, example in enumerate(examples):
        for text in example_texts(example):
            found = distinct.get(text)
            if found is None:
                found = distinct[text] = len(distinct)
            text_of.append(found)
            owner_of.append(index)
    return list(distinct), np.asarray(text_of, dtype=np.int64), np.asarray(owner_of, dtype=np.int64)


def normalized_documents(
    examples: Sequence[dict[str, Any]], table: TextTable
) -> tuple[Documents, list[str], list[str]]:
    """The normalised example of each record as Documents (parts: each turn's role and text), and its
    normalised prompt and answer."""
    ids: dict[str, int] = {}  # raw text -> id of its normalised text in the table (-1: empty)
    intern, texts = table.intern, table.texts
    parts: list[int] = []
    offsets = [0]
    prompts: list[str] = []
    answers: list[str] = []

    def text_id(raw: str) -> int:
        normalized = normalize_text(raw)
        found = ids[raw] = intern(normalized) if normalized else -1
        return found

    def normalized(raw: str) -> str:
        # A single-turn prompt is the user's text itself, and the answer the assistant's: seen already.
        found = ids.get(raw)
        if found is None:
            return normalize_text(raw)
        return texts[found] if found >= 0 else ""

    for example in examples:
        turns, prompt, answer = turns_prompt_and_answer(example)
        if "input" in example:  # preference: the input and the preferred answer
            turns = [turn for turn in turns if turn[0] != "non_preferred_output"]
        elif "messages" in example and example.keys() - CHAT_KEYS:
            answer = _fields_text(example)  # reinforcement: the grader's fields are the answer
            turns = [*turns, ("item", answer)]
        for role, text in turns:
            found = ids.get(role)
            if found is None:
                found = text_id(role)
            if found >= 0:
                parts.append(found)
            found = ids.get(text)
            if found is None:
                found = text_id(text)
            if found >= 0:
                parts.append(found)
        offsets.append(len(parts))
        prompts.append(normalized(prompt))
        answers.append(normalized(answer))
    documents = Documents(table, np.asarray(parts, dtype=np.int64), np.asarray(offsets, dtype=np.int64))
    return documents, prompts, answers


def _fields_text(example: dict[str, Any]) -> str:
    """The grader fields of a reinforcement line as one text: `key value` pairs in key order."""
    fields = grader_fields(example)
    return " ".join(f"{key} {_plain_text(fields[key])}" for key in sorted(fields))


def _plain_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _set_keys(
    frame: pd.DataFrame,
    positions: np.ndarray,
    examples: Sequence[dict[str, Any]],
    prompts: list[str],
    answers: list[str],
) -> None:
    """The digests of the normalised forms (records.PROMPT_KEY, ANSWER_KEY, SPLIT_KEY) of the rows at
    `positions`, whose examples, normalised prompts and answers these are, set in `frame`. Digests,
    not the texts: what the batch holds of each record until export is 64 bytes, not two texts, and
    a 128-bit digest makes two different texts share a group with a chance far below 2**-64 for any
    batch that fits on a disk."""
    keys, agreeing = contradiction_keys(examples, prompts, answers)
    prompt_keys = [_digest(key) if prompt else None for key, prompt in zip(keys, prompts, strict=True)]
    answer_keys = [_digest(answer) for answer in agreeing]
    split_keys = [export.split_key_of(p, a) for p, a in zip(prompts, answers, strict=True)]
    for name, values, size in (
        (records.PROMPT_KEY, prompt_keys, 16),
        (records.ANSWER_KEY, answer_keys, 16),
        (records.SPLIT_KEY, split_keys, 32),
    ):
        frame[name] = records.digests(frame.index, positions, values, size)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def contradiction_keys(
    examples: Sequence[dict[str, Any]], prompts: list[str], answers: list[str]
) -> tuple[list[str], list[str]]:
    """What rule 5 groups records by, and the answer that must agree within a group.

    A chat or reinforcement record: its normalised prompt, and its answer. A preference record: its
    normalised prompt with the unordered pair of its answers, and which of the two it prefers, so a
    group disagrees exactly when the same input has the same two answers in both orders."""
    assert len(examples) == len(prompts) == len(answers)
    keys = list(prompts)
    for index, example in enumerate(examples):
        prompt, answer = prompts[index], answers[index]
        if "input" not in example or not prompt:
            continue
        rejected = normalize_text(message_text(example["non_preferred_output"][0]))
        low, high = sorted((answer, rejected))
        keys[index] = f"{prompt}\x1f{low}\x1f{high}"
    return keys, list(answers)


def _eval_prompts(eval_examples: Sequence[Any]) -> tuple[list[str], list[int]]:
    """Normalised prompts of the eval examples that have one, and their 1-based position in the set."""
    normalize = Normalizer()
    prompts: list[str] = []
    numbers: list[int] = []
    for number, example in enumerate(eval_examples, start=1):
        try:
            prompt = normalize(prompt_and_answer(example)[0])
        except (AttributeError, IndexError, KeyError, TypeError):
            continue  # not a training-shaped line: it has no prompt to leak
        if prompt:
            prompts.append(prompt)
            numbers.append(number)
    return prompts, numbers


def _eval_leakage(
    stage: _Stage,
    positions: np.ndarray,
    prompts: list[str],
    table: TextTable,
    eval_examples: Sequence[Any],
    config: DedupeConfig,
) -> np.ndarray:
    """Rule 2; returns which of `positions` it quarantined."""
    leaked = np.zeros(len(positions), dtype=bool)
    eval_prompts, numbers = _eval_prompts(eval_examples)
    if not eval_prompts or not len(positions):
        return leaked
    matches = find_matches(
        Documents.of_texts(prompts, table),
        Documents.of_texts(eval_prompts, table),
        threshold=config.leakage_threshold,
        shingle_size=config.shingle_size,
    )
    found = np.flatnonzero(matches.reference >= 0)
    details = []
    for index in found.tolist():
        number = numbers[int(matches.reference[index])]
        value = float(matches.similarity[index])
        how = (
            "equals"
            if value >= 1.0 and prompts[index] == eval_prompts[int(matches.reference[index])]
            else f"is a near-duplicate (word-shingle Jaccard {value:.3f} >= {config.leakage_threshold}) of"
        )
        details.append(
            f"the normalised prompt {how} the prompt of eval example {number} of the eval set; "
            "keep it out of the training data (or out of the eval set)"
        )
    stage.quarantine(positions[found], records.EVAL_LEAKAGE, details)
    leaked[found] = True
    return leaked


def _exact_duplicates(
    stage: _Stage, positions: np.ndarray, documents: Documents, rank: np.ndarray, alive: np.ndarray
) -> np.ndarray:
    """Rule 3; returns which of `positions` it quarantined."""
    duplicated = np.zeros(len(positions), dtype=bool)
    first = find_exact_duplicates(documents, rank[positions], eligible=alive)
    found = np.flatnonzero(first >= 0)
    originals = positions[first[found]]
    rows = positions[found]
    stage.quarantine(
        rows,
        records.EXACT_DUPLICATE,
        [f"the same normalised example as {o}, which is kept" for o in stage.describe_all(originals)],
        originals.tolist(),
    )
    duplicated[found] = True
    return duplicated


def _near_duplicates(
    stage: _Stage,
    positions: np.ndarray,
    documents: Documents,
    rank: np.ndarray,
    alive: np.ndarray,
    config: DedupeConfig,
    candidates: CandidateSearch | None = None,
) -> np.ndarray:
    """Rule 4; returns which of `positions` it quarantined."""
    duplicated = np.zeros(len(positions), dtype=bool)
    result = find_near_duplicates(
        documents,
        rank[positions],
        threshold=config.near_duplicate_threshold,
        num_perm=config.num_perm,
        shingle_size=config.shingle_size,
        candidates=candidates,
        eligible=alive,
    )
    found = np.flatnonzero(result.duplicate_of >= 0)
    originals = positions[result.duplicate_of[found]]
    stage.quarantine(
        positions[found],
        records.NEAR_DUPLICATE,
        [
            f"a near-duplicate of {o}, which is kept: word {config.shingle_size}-shingle "
            f"Jaccard {value:.3f} >= {config.near_duplicate_threshold}"
            for o, value in zip(stage.describe_all(originals), result.similarity[found].tolist(), strict=True)
        ],
        originals.tolist(),
    )
    log.debug(
        "near duplicates: %d candidate pairs, %d compared, %d confirmed on the words",
        result.candidates,
        result.compared,
        result.confirmed,
    )
    duplicated[found] = True
    return duplicated


def _contradictions(
    stage: _Stage,
    positions: np.ndarray,
    rank: np.ndarray,
    alive: np.ndarray,
    config: DedupeConfig,
) -> None:
    """Rule 5: groups of kept records with one prompt key and more than one answer key (records.py's
    PROMPT_KEY and ANSWER_KEY, from `contradiction_keys`: for preference records, the input with its
    two answers, and which one is preferred)."""
    frame = stage.frame
    has_prompt = frame[records.PROMPT_KEY].notna().to_numpy()[positions]
    considered = np.flatnonzero(alive & has_prompt)
    if len(considered) < 2:
        return
    considered_rows = positions[considered]
    answers = records.digest_words(frame, records.ANSWER_KEY, considered_rows)
    prompt_codes, contested = _contested_prompts(
        records.digest_words(frame, records.PROMPT_KEY, considered_rows), answers
    )
    if not len(contested):
        return
    groups: dict[int, list[int]] = {}
    for k in np.flatnonzero(np.isin(prompt_codes, contested)).tolist():
        groups.setdefault(int(prompt_codes[k]), []).append(k)
    rows: list[int] = []
    details: list[str] = []
    others: list[int] = []
    policy = config.contradictions
    for members in groups.values():
        members.sort(key=lambda k: rank[positions[considered[k]]])  # earliest first
        swapped = _is_preference(frame, positions[considered[members[0]]])  # pairs in both orders
        differs = (
            "with the preferred and non-preferred answers swapped" if swapped else "with a different answer"
        )
        answer_of = {k: answers[k].tobytes() for k in members}
        latest_with: dict[bytes, int] = {}  # answer -> the latest member giving it
        count: dict[bytes, int] = {}
        for k in members:
            latest_with[answer_of[k]] = k
            count[answer_of[k]] = count.get(answer_of[k], 0) + 1
        if policy == "quarantine-all":
            # Each record names the latest record that answers differently: the latest of all, or,
            # for the records that share its answer, the latest of the other answers.
            by_recency = sorted(latest_with.values(), key=lambda m: rank[positions[considered[m]]])
            latest, runner_up = by_recency[-1], by_recency[-2]
            for k in members:
                other = latest if answer_of[k] != answer_of[latest] else runner_up
                rows.append(k)
                others.append(other)
                details.append(
                    f"the same prompt as {stage.describe(positions[considered[other]])}, {differs} "
                    "(dedupe.contradictions: quarantine-all); fix the answers in the source data"
                )
            continue
        if policy == "keep-latest":
            winner = members[-1]
            why = "the latest answer is kept (dedupe.contradictions: keep-latest)"
        else:
            # Most frequent answer; a tie goes to the answer given latest.
            best = max(count, key=lambda a: (count[a], rank[positions[considered[latest_with[a]]]]))
            winner = latest_with[best]
            why = f"the most frequent answer ({count[best]} of {len(members)}) is kept (dedupe.contradictions: keep-majority)"
        for k in members:
            if answer_of[k] != answer_of[winner]:
                rows.append(k)
                others.append(winner)
                details.append(
                    f"the same prompt as {stage.describe(positions[considered[winner]])} {differs}; {why}"
                )
    stage.quarantine(
        positions[considered[rows]],
        records.CONTRADICTION,
        details,
        positions[considered[others]].tolist(),
    )


def _contested_prompts(prompts: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For records' prompt and answer keys (rows of digest words): a code of each record's prompt key
    (equal exactly where the keys are), and the codes of the prompts given more than one answer. One
    sort of the prompt keys, then each answer compared with the answer of its prompt's first record:
    factorizing the two key columns and the pairs of codes with pandas took 1.7 GB of temporaries at
    ten million records (sampled), the batch rules' peak."""
    order = np.lexsort(tuple(prompts[:, j] for j in reversed(range(prompts.shape[1]))))
    ordered = prompts[order]
    first_of_run = np.ones(len(order), dtype=bool)
    first_of_run[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    del ordered
    prompt_codes = np.empty(len(order), dtype=np.int64)
    prompt_codes[order] = np.cumsum(first_of_run) - 1
    first_record = order[first_of_run]  # of each prompt code
    del order, first_of_run
    differs = (answers != answers[first_record[prompt_codes]]).any(axis=1)
    return prompt_codes, np.unique(prompt_codes[differs])


def _is_preference(frame: pd.DataFrame, position: int) -> bool:
    """Whether the row is a preference record (its `kind`, or, in a frame validate did not make, its
    example: rule 5 groups a preference record only with preference records)."""
    if records.KIND in frame:
        kind = frame[records.KIND].iat[position]
        return isinstance(kind, str) and kind == "preference"
    return "input" in records.example_value(frame[records.EXAMPLE].iat[position])


def _duplicates_of_quarantined_records(stage: _Stage) -> None:
    """A duplicate names the record kept in its place; when a later rule quarantined that record, the
    duplicate follows it: an exact duplicate of a near duplicate becomes a near duplicate of the record
    kept in their place, and a duplicate of a record rule 5 quarantined becomes a contradiction of the
    record that one contradicts (it repeats the answer that lost)."""
    frame = stage.frame
    while True:  # a chain is at most exact -> near -> contradiction long
        reason = frame[records.REASON].to_numpy(dtype=object)
        original = frame[records.DUPLICATE_OF].to_numpy(dtype=object)
        detail = frame[records.DETAIL].to_numpy(dtype=object)
        rows: list[int] = []
        moved: list[tuple[str, Any, str]] = []  # (reason, duplicate_of, detail)
        duplicates = np.flatnonzero(np.isin(reason, [records.EXACT_DUPLICATE, records.NEAR_DUPLICATE]))
        at = stage.positions_of(original[duplicates].tolist())
        for position in duplicates.tolist():
            lost = at.get(original[position])
            if lost is None:  # named a record outside this frame: nothing here can move it
                continue
            how = (
                "the same normalised example as"
                if reason[position] == records.EXACT_DUPLICATE
                else "a near-duplicate of"
            )
            if reason[lost] == records.CONTRADICTION:
                rows.append(position)
                moved.append(
                    (
                        records.CONTRADICTION,
                        original[lost],
                        f"{how} {stage.describe(lost)}, which gives an answer that lost: {detail[lost]}",
                    )
                )
            elif reason[lost] == records.NEAR_DUPLICATE and reason[position] == records.EXACT_DUPLICATE:
                rows.append(position)
                moved.append(
                    (records.NEAR_DUPLICATE, original[lost], f"{how} {stage.describe(lost)}, {detail[lost]}")
                )
        if not rows:
            return
        for new_reason in sorted({m[0] for m in moved}):
            picked = [i for i, m in enumerate(moved) if m[0] == new_reason]
            records.requarantine(
                frame,
                [rows[i] for i in picked],
                new_reason,
                [moved[i][2] for i in picked],
                [moved[i][1] for i in picked],
            )


@task(name="duplicates", cache_policy=NO_CACHE, persist_result=False)
def batch_rules_task(
    frame: pd.DataFrame,
    documents: Documents,
    config: DedupeConfig,
    candidates: CandidateSearch | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """Prefect wrapper of batch_rules: exact and near duplicates and contradictions across the batch."""
    return batch_rules(frame, documents, config, candidates, threads)
