from __future__ import annotations

import html
import json
import uuid
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pytest

from tasks import ingest, validate
from tuneline import formats, records, tokens
from tuneline.config import ModelConfig, ValidationConfig

CHAT_MODEL = ModelConfig(base="tuneline-tiny", system_prompt="House style.")
COMPLETION_MODEL = ModelConfig(base="babbage-002")
RULES = ValidationConfig(min_examples=3, max_quarantine_fraction=0.5, context_limits={"tuneline-tiny": 64})


def chat(question: str, answer: str = "Billing: done.", *more: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}, *more]
    }


def frame_of(*lines: Any) -> pd.DataFrame:
    """The record frame ingest makes of these lines (objects are written as JSON, strings as they are)."""
    path = f"/validate-{uuid.uuid4().hex}/part.jsonl"
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    fs = fsspec.filesystem("memory")
    fs.pipe(path, text.encode())
    try:
        return ingest.read_files([ingest.InputFile("t", f"memory://{path}", path, "", "jsonl", None)], None)
    finally:
        fs.rm(path)


def reasons(frame: pd.DataFrame) -> list[str | None]:
    return [None if pd.isna(r) else r for r in frame[records.REASON]]


def test_format_rules_become_quarantine_reasons_with_details() -> None:
    raw = frame_of(
        chat("fine"),
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        "{not json",
        chat("has <|endoftext|> inside"),
        [1, 2],
    )
    checked = validate.validate(raw, CHAT_MODEL, RULES)
    assert reasons(checked) == [
        None,
        "unrecognized_role",
        "example_missing_assistant_message",
        "invalid_json",  # ingest's reason stays: the first rule broken is the one reported
        "forbidden_special_token",
        "data_type",
    ]
    detail = checked[records.DETAIL].iloc[1]
    assert "'bot'" in detail and formats.RULES["unrecognized_role"] in detail
    assert reasons(raw) == [None, None, None, "invalid_json", None, None]  # the input frame is untouched
    assert checked[validate.KIND].tolist()[:3] == ["chat", "chat", "chat"]


def test_token_columns_are_exact_and_null_where_not_countable() -> None:
    examples = [chat("where is my parcel"), chat("refund", "Billing: refunded.")]
    checked = validate.validate(frame_of(*examples, "{bad"), CHAT_MODEL, RULES)
    encoding = validate.encoding_for(CHAT_MODEL)
    assert checked[validate.N_TOKENS].tolist()[:2] == tokens.count_tokens(examples, encoding)
    assert checked[validate.N_ASSISTANT_TOKENS].tolist()[:2] == tokens.count_assistant_tokens(
        examples, encoding
    )
    assert checked[validate.N_TOKENS].isna().tolist() == [False, False, True]
    assert str(checked[validate.N_TOKENS].dtype) == "Int64"


def test_legacy_lines_become_chat_for_chat_models_only() -> None:
    legacy = {"prompt": " Where is it? ", "completion": " Shipping: today. "}
    for_chat = validate.validate(frame_of(legacy), CHAT_MODEL, RULES)
    assert for_chat[records.EXAMPLE].iloc[0] == formats.completion_to_chat(legacy, "House style.")
    assert for_chat[validate.KIND].iloc[0] == "chat"
    for_babbage = validate.validate(frame_of(legacy, chat("a chat line")), COMPLETION_MODEL, RULES)
    assert for_babbage[records.EXAMPLE].iloc[0] == legacy
    assert for_babbage[validate.KIND].iloc[0] == "completion"
    assert reasons(for_babbage) == [None, "invalid_completion_example"]
    preference = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    }
    assert reasons(validate.validate(frame_of(preference), CHAT_MODEL, RULES)) == ["missing_messages_list"]


def long_text(words: int) -> str:
    return " ".join(f"word{i}" for i in range(words))


def test_over_long_examples_are_quarantined_by_default() -> None:
    checked = validate.validate(frame_of(chat(long_text(80))), CHAT_MODEL, RULES)
    assert reasons(checked) == ["too_long"]
    detail = checked[records.DETAIL].iloc[0]
    assert (
        "64-token training context of tuneline-tiny" in detail and "validation.too_long: truncate" in detail
    )


def test_truncate_drops_trailing_turns_then_shortens_the_answer() -> None:
    truncate = RULES.model_copy(update={"too_long": "truncate"})
    trailing = chat(
        "short question",
        "Billing: fine.",
        {"role": "user", "content": long_text(60)},
        {"role": "assistant", "content": "more"},
    )
    long_answer = chat("short question", long_text(80))
    long_prompt = chat(long_text(80), "ok")
    checked = validate.validate(frame_of(trailing, long_answer, long_prompt), CHAT_MODEL, truncate)
    assert reasons(checked) == [None, None, "too_long"]
    assert checked[validate.TRUNCATED].tolist() == [True, True, False]
    first, second = checked[records.EXAMPLE].iloc[0], checked[records.EXAMPLE].iloc[1]
    assert first == chat("short question", "Billing: fine.")
    assert "dropped 2 trailing message(s)" in checked[validate.TRUNCATION].iloc[0]
    answer = second["messages"][1]["content"]
    assert long_text(80).startswith(answer) and 0 < len(answer) < len(long_text(80))
    assert "shortened" in checked[validate.TRUNCATION].iloc[1]
    encoding = validate.encoding_for(CHAT_MODEL)
    for example, counted in zip([first, second], checked[validate.N_TOKENS].iloc[:2], strict=True):
        assert formats.check_example(example) is None
        assert tokens.count_tokens([example], encoding)[0] == counted <= 64
    assert "cannot be truncated" in checked[records.DETAIL].iloc[2]


def test_truncating_a_completion() -> None:
    truncate = RULES.model_copy(update={"too_long": "truncate", "context_limits": {"babbage-002": 40}})
    checked = validate.validate(
        frame_of({"prompt": "q", "completion": long_text(60)}), COMPLETION_MODEL, truncate
    )
    assert reasons(checked) == [None] and checked[validate.N_TOKENS].iloc[0] <= 40
    assert checked[validate.TRUNCATION].iloc[0].startswith("shortened the completion")


def good_batch(n: int) -> pd.DataFrame:
    return validate.validate(frame_of(*[chat(f"question {i}") for i in range(n)]), CHAT_MODEL, RULES)


def outcome(result: validate.GateResult, expectation: str, column_hint: str) -> validate.ExpectationOutcome:
    return next(o for o in result.outcomes if o.expectation == expectation and column_hint in o.description)


def test_gate_passes_a_clean_batch_and_reports_each_expectation() -> None:
    result = validate.gate(good_batch(4), CHAT_MODEL, RULES)
    assert result.success and result.failures == []
    assert len(result.outcomes) >= 10 and all(o.success for o in result.outcomes)
    assert outcome(result, "expect_column_sum_to_be_between", "examples kept").observed == "4"
    assert result.summary["kept"] == 4 and result.summary["context_limit"] == 64
    assert result.gx_result["success"] is True and len(result.gx_result["results"]) == len(result.outcomes)


def test_gate_fails_on_too_few_examples_and_too_much_quarantine() -> None:
    batch = validate.validate(frame_of(chat("one"), chat("two"), "{x", "{y", "{z"), CHAT_MODEL, RULES)
    result = validate.gate(batch, CHAT_MODEL, RULES)
    assert not result.success
    failed = {o.expectation for o in result.outcomes if not o.success}
    assert failed == {"expect_column_sum_to_be_between", "expect_column_mean_to_be_between"}
    assert any("at least 3 examples kept" in f and "observed 2" in f for f in result.failures)
    assert any("at most 50% of the records quarantined" in f and "observed 0.6" in f for f in result.failures)


def test_gate_names_the_records_that_break_row_expectations() -> None:
    batch = good_batch(4)
    batch.loc[1, records.RECORD_ID] = batch.loc[0, records.RECORD_ID]
    batch.loc[2, validate.N_TOKENS] = 10_000  # as if a stage had let an over-long example through
    records.quarantine(batch, np.array([False, False, False, True]), "made_up_reason", "x")
    result = validate.gate(batch, CHAT_MODEL, RULES)
    unique = outcome(result, "expect_column_values_to_be_unique", "record_id")
    within = outcome(result, "expect_column_values_to_be_between", "fits")
    known = outcome(result, "expect_column_values_to_be_in_set", "quarantine reason")
    assert not unique.success and unique.observed.startswith("2 of 4")
    assert not within.success and within.unexpected and "line 3" in within.unexpected[0]
    assert not known.success and "made_up_reason" in str(known)


def test_gate_on_an_empty_batch_fails_without_crashing() -> None:
    result = validate.gate(validate.validate(records.empty_frame(), CHAT_MODEL, RULES), CHAT_MODEL, RULES)
    assert not result.success
    assert any("examples kept" in f for f in result.failures)


def test_report_renders_every_expectation_escaped() -> None:
    batch = good_batch(2)  # one short of min_examples: exactly one expectation fails
    batch[records.SOURCE] = "<script>alert(1)</script>.jsonl"
    result = validate.gate(batch, CHAT_MODEL, RULES)
    page = validate.render_report(result)
    assert page.startswith("<!doctype html>") and "Gate FAILED" in page
    for o in result.outcomes:
        assert html.escape(o.description) in page and html.escape(o.observed) in page
        assert o.expectation in page
    assert page.count("<td class=status>FAIL</td>") == len(result.failures) == 1
    assert "<script>" not in page
    assert "Gate PASSED" in validate.render_report(validate.gate(good_batch(3), CHAT_MODEL, RULES))


@pytest.mark.parametrize(
    ("model", "completion"),
    [("babbage-002", True), ("ft:davinci-002:acme::x", True), ("gpt-4.1-mini", False)],
)
def test_completion_models(model: str, completion: bool) -> None:
    assert validate.is_completion_model(model) is completion
    assert validate.exported_kind(model) == ("completion" if completion else "chat")
