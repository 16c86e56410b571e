from __future__ import annotations

import json
import uuid
from typing import Any

import fsspec
import pandas as pd
import pytest

from tuneline import formats, records, tokens
from tuneline.config import ModelConfig, ValidationConfig
from tuneline.tasks import ingest, validate

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
    assert checked[records.KIND].tolist()[:3] == ["chat", "chat", "chat"]


def test_token_columns_are_exact_and_null_where_not_countable() -> None:
    examples = [chat("where is my parcel"), chat("refund", "Billing: refunded.")]
    checked = validate.validate(frame_of(*examples, "{bad"), CHAT_MODEL, RULES)
    vocabulary = validate.vocabulary_for(CHAT_MODEL)
    assert checked[records.N_TOKENS].tolist()[:2] == tokens.count_tokens(examples, vocabulary)
    assert checked[records.N_ASSISTANT_TOKENS].tolist()[:2] == tokens.count_assistant_tokens(
        examples, vocabulary
    )
    assert checked[records.N_TOKENS].isna().tolist() == [False, False, True]
    assert str(checked[records.N_TOKENS].dtype) == "Int64"


def test_legacy_lines_become_chat_for_chat_models_only() -> None:
    legacy = {"prompt": " Where is it? ", "completion": " Shipping: today. "}
    for_chat = validate.validate(frame_of(legacy), CHAT_MODEL, RULES)
    assert for_chat[records.EXAMPLE].iloc[0] == formats.completion_to_chat(legacy, "House style.")
    assert for_chat[records.KIND].iloc[0] == "chat"
    for_babbage = validate.validate(frame_of(legacy, chat("a chat line")), COMPLETION_MODEL, RULES)
    assert for_babbage[records.EXAMPLE].iloc[0] == legacy
    assert for_babbage[records.KIND].iloc[0] == "completion"
    assert reasons(for_babbage) == [None, "invalid_completion_example"]
    preference = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    }
    # A preference line is a line of a dpo file: in a supervised batch it has the wrong format.
    assert reasons(validate.validate(frame_of(preference), CHAT_MODEL, RULES)) == ["wrong_method_format"]
    assert reasons(validate.validate(frame_of(preference), CHAT_MODEL, RULES, "dpo")) == [None]


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
    assert checked[records.TRUNCATED].tolist() == [True, True, False]
    first, second = checked[records.EXAMPLE].iloc[0], checked[records.EXAMPLE].iloc[1]
    assert first == chat("short question", "Billing: fine.")
    assert "dropped 2 trailing message(s)" in checked[records.TRUNCATION].iloc[0]
    answer = second["messages"][1]["content"]
    assert long_text(80).startswith(answer) and 0 < len(answer) < len(long_text(80))
    assert "shortened" in checked[records.TRUNCATION].iloc[1]
    vocabulary = validate.vocabulary_for(CHAT_MODEL)
    for example, counted in zip([first, second], checked[records.N_TOKENS].iloc[:2], strict=True):
        assert formats.check_example(example) is None
        assert tokens.count_tokens([example], vocabulary)[0] == counted <= 64
    assert "cannot be truncated" in checked[records.DETAIL].iloc[2]


def test_truncating_a_completion() -> None:
    truncate = RULES.model_copy(update={"too_long": "truncate", "context_limits": {"babbage-002": 40}})
    checked = validate.validate(
        frame_of({"prompt": "q", "completion": long_text(60)}), COMPLETION_MODEL, truncate
    )
    assert reasons(checked) == [None] and checked[records.N_TOKENS].iloc[0] <= 40
    assert checked[records.TRUNCATION].iloc[0].startswith("shortened the completion")


@pytest.mark.parametrize(
    ("model", "completion"),
    [("babbage-002", True), ("ft:davinci-002:acme::x", True), ("gpt-4.1-mini", False)],
)
def test_completion_models(model: str, completion: bool) -> None:
    assert validate.is_completion_model(model) is completion
    assert validate.exported_kind(model) == ("completion" if completion else "chat")
