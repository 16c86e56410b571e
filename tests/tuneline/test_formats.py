from __future__ import annotations

import json
from typing import Any

import pytest

from tuneline import formats
from tuneline.formats import check_example, check_training_file, completion_to_chat, detect_kind


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


USER = {"role": "user", "content": "Where is my parcel?"}
ASSISTANT = {"role": "assistant", "content": "Shipping: it left the warehouse today."}
TOOLS = [{"type": "function", "function": {"name": "track", "parameters": {"type": "object"}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "track", "arguments": '{"order": "A1"}'}}

VALID = {
    "plain chat": chat({"role": "system", "content": "Be brief."}, USER, ASSISTANT),
    "developer role": chat({"role": "developer", "content": "Be brief."}, USER, ASSISTANT),
    "tool call and answer": chat(
        USER,
        {"role": "assistant", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "in transit"}'},
        ASSISTANT,
        tools=TOOLS,
    ),
    "tool call with null content": chat(
        USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "x"},
        ASSISTANT,
    ),
    "weight 0 on an earlier turn": chat(USER, {**ASSISTANT, "weight": 0}, USER, {**ASSISTANT, "weight": 1}),
    "content parts": chat({"role": "user", "content": [{"type": "text", "text": "hi"}]}, ASSISTANT),
    "name on a message": chat({**USER, "name": "ana"}, ASSISTANT),
    "parallel_tool_calls": chat(USER, ASSISTANT, tools=TOOLS, parallel_tool_calls=False),
    "legacy": {"prompt": "Where is my parcel?", "completion": "Shipping: today."},
    "preference": {
        "input": {"messages": [USER]},
        "preferred_output": [ASSISTANT],
        "non_preferred_output": [{"role": "assistant", "content": "No idea."}],
    },
}

# One example per rule key: every key of formats.RULES must be reachable.
BROKEN: dict[str, Any] = {
    "data_type": ["not", "an", "object"],
    "missing_messages_list": {"text": "hello"},
    "message_missing_key": chat({"content": "no role"}, ASSISTANT),
    "message_unrecognized_key": chat({**USER, "mood": "angry"}, ASSISTANT),
    "unrecognized_role": chat({"role": "bot", "content": "hi"}, ASSISTANT),
    "missing_content": chat({"role": "user", "content": "   "}, ASSISTANT),
    "example_missing_assistant_message": chat(USER),
    "example_unrecognized_key": chat(USER, ASSISTANT, label="billing"),
    "invalid_weight": chat(USER, {**ASSISTANT, "weight": 2}),
    "invalid_content_part": chat({"role": "user", "content": [{"type": "video", "video": {}}]}, ASSISTANT),
    "invalid_tool_call": chat(
        USER,
        {
            "role": "assistant",
            "tool_calls": [{**CALL, "function": {"name": "track", "arguments": "{not json"}}],
        },
    ),
    "invalid_tools": chat(USER, ASSISTANT, tools=[{"type": "function", "function": {}}]),
    "forbidden_special_token": chat({"role": "user", "content": "end <|endoftext|>"}, ASSISTANT),
    "invalid_completion_example": {"prompt": "q", "completion": ""},
    "invalid_preference_example": {
        "input": {"messages": [USER]},
        "preferred_output": [],
        "non_preferred_output": [],
    },
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_examples_pass(name: str) -> None:
    assert check_example(VALID[name]) is None


# Rule keys reached only by a line of a method's file (formats.check_for_method).
BROKEN_FOR_METHOD: dict[str, tuple[str, Any]] = {
    "wrong_method_format": ("dpo", chat(USER, ASSISTANT)),
    "invalid_reinforcement_example": ("reinforcement", chat(USER, ASSISTANT)),
}


def test_every_rule_key_has_a_breaking_example() -> None:
    assert set(BROKEN) | set(BROKEN_FOR_METHOD) == set(formats.RULES)


@pytest.mark.parametrize("key", sorted(BROKEN_FOR_METHOD))
def test_each_method_rule_reports_its_key(key: str) -> None:
    method, example = BROKEN_FOR_METHOD[key]
    issue = formats.check_for_method(example, method)
    assert issue is not None and issue.key == key
    assert formats.check_for_method(example, "supervised") is None  # a valid line of another method


def test_each_method_takes_its_valid_lines() -> None:
    assert formats.check_for_method(VALID["preference"], "dpo") is None
    assert formats.check_for_method(VALID["legacy"], "supervised") is None
    prompt = {"messages": [USER], "reference_answer": "Shipping", "tags": ["a", {"b": 1}]}
    assert formats.check_for_method(prompt, "reinforcement") is None
    assert formats.kind_for_method(prompt, "reinforcement") == "reinforcement"
    assert formats.kind_for_method(prompt, "supervised") == "chat"


@pytest.mark.parametrize("key", sorted(BROKEN))
def test_each_rule_reports_its_key(key: str) -> None:
    issue = check_example(BROKEN[key])
    assert issue is not None and issue.key == key
    assert key in str(issue)


@pytest.mark.parametrize(
    ("example", "key"),
    [
        (chat(USER, {**ASSISTANT, "weight": 0}), "example_missing_assistant_message"),
        (chat(USER, {**ASSISTANT, "weight": True}), "invalid_weight"),
        (chat({**USER, "weight": 1}, ASSISTANT), "invalid_weight"),
        (chat({"role": "tool", "tool_call_id": "nope", "content": "x"}, ASSISTANT), "invalid_tool_call"),
        (
            chat(
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [{**CALL, "function": {"name": "other", "arguments": "{}"}}],
                },
                tools=TOOLS,
            ),
            "invalid_tool_call",
        ),
        (chat({"role": "user", "tool_calls": [CALL], "content": "x"}, ASSISTANT), "invalid_tool_call"),
        (
            chat({"role": "user", "content": [{"type": "text", "text": "<|fim_suffix|>"}]}, ASSISTANT),
            "forbidden_special_token",
        ),
        (chat({"role": "user", "content": []}, ASSISTANT), "missing_content"),
        (chat({"role": "user", "content": 7}, ASSISTANT), "missing_content"),
        ({"messages": []}, "missing_messages_list"),
        (chat(USER, ASSISTANT, parallel_tool_calls="yes"), "example_unrecognized_key"),
        ({"prompt": "q <|endoftext|>", "completion": "a"}, "forbidden_special_token"),
        ({"prompt": "q", "completion": "a", "extra": 1}, "example_unrecognized_key"),
        (
            {
                "input": {"messages": [USER, ASSISTANT]},
                "preferred_output": [ASSISTANT],
                "non_preferred_output": [ASSISTANT],
            },
            "invalid_preference_example",
        ),
        (
            {"input": {"messages": [USER]}, "preferred_output": [USER], "non_preferred_output": [ASSISTANT]},
            "invalid_preference_example",
        ),
    ],
)
def test_rules_beyond_the_cookbook(example: dict[str, Any], key: str) -> None:
    issue = check_example(example)
    assert issue is not None and issue.key == key, issue


def test_allowed_kinds_name_the_accepted_format() -> None:
    for_completion_model = check_example(VALID["plain chat"], allowed=["completion"])
    assert for_completion_model is not None and for_completion_model.key == "invalid_completion_example"
    assert "completion" in for_completion_model.message
    for_chat_model = check_example(VALID["preference"], allowed=["chat", "completion"])
    assert for_chat_model is not None and for_chat_model.key == "missing_messages_list"
    assert check_example(VALID["legacy"], allowed=["chat", "completion"]) is None


def test_detect_kind() -> None:
    assert detect_kind(VALID["plain chat"]) == "chat"
    assert detect_kind(VALID["legacy"]) == "completion"
    assert detect_kind(VALID["preference"]) == "preference"
    assert detect_kind({"other": 1}) is None
    assert detect_kind("text") is None


def test_completion_to_chat_strips_and_adds_the_system_prompt() -> None:
    converted = completion_to_chat({"prompt": " Where? ", "completion": " Here. "}, "House style.")
    assert converted == {
        "messages": [
            {"role": "system", "content": "House style."},
            {"role": "user", "content": "Where?"},
            {"role": "assistant", "content": "Here."},
        ]
    }
    assert check_example(converted) is None
    assert [m["role"] for m in completion_to_chat({"prompt": "a", "completion": "b"}, None)["messages"]] == [
        "user",
        "assistant",
    ]


def test_texts_and_prompt_answer() -> None:
    example = VALID["tool call and answer"]
    texts = list(formats.example_texts(example))
    assert '{"order": "A1"}' in texts and ASSISTANT["content"] in texts
    prompt, answer = formats.prompt_and_answer(VALID["plain chat"])
    assert prompt == USER["content"] and answer == ASSISTANT["content"]  # the system turn is not the prompt
    assert formats.prompt_and_answer(VALID["legacy"]) == ("Where is my parcel?", "Shipping: today.")
    assert (
        formats.message_text({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})
        == "a\nb"
    )


def lines(*examples: Any) -> list[bytes]:
    return [json.dumps(e).encode() for e in examples]


def test_training_file_checks() -> None:
    good = lines(*[VALID["plain chat"]] * 10)
    assert check_training_file([*good, b"  "], min_examples=10) == (10, None)
    count, issue = check_training_file(good[:3], min_examples=10)
    assert count == 3 and issue is not None and issue.key == "too_few_examples" and issue.line is None
    _, issue = check_training_file([good[0], b"\xff\xfe"])
    assert issue is not None and (issue.line, issue.key) == (2, "invalid_encoding")
    _, issue = check_training_file([good[0], b"{nope"])
    assert issue is not None and (issue.line, issue.key) == (2, "invalid_json")
    _, issue = check_training_file([good[0], *lines(VALID["legacy"])])
    assert issue is not None and (issue.line, issue.key) == (2, "mixed_formats")
    _, issue = check_training_file(lines(BROKEN["unrecognized_role"]))
    assert issue is not None and str(issue).startswith("line 1: ") and issue.key == "unrecognized_role"
