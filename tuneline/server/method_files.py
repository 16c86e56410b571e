"""What each fine-tuning method takes as a training line, checked before a job is queued.

- supervised: chat or prompt/completion lines (tuneline.formats.check_training_file, the pipeline's
  rules); a preference line there is refused.
- dpo: preference lines (`input`, `preferred_output`, `non_preferred_output`), by the same rules the
  pipeline's validate stage applies (tuneline.formats.check_preference through check_training_file).
- reinforcement: chat lines whose last message is the user's (the prompt the model answers while it
  trains); every other top-level field of the line is kept as the grader's `item` ({{item.x}}).

`check_method_file` never raises for any content: it returns the count of examples and the first issue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from tuneline.formats import (
    MAX_EXAMPLE_BYTES,
    MAX_JSON_DEPTH,
    FileIssue,
    _check_message,
    _check_tools,
    check_training_file,
    detect_kind,
    json_depth_exceeds,
    jsonl_line,
)

KIND_NAMES = {
    "chat": "a chat line",
    "completion": "a prompt/completion line",
    "preference": "a preference (DPO) line",
}


def check_method_file(
    lines: Iterable[bytes],
    method: str,
    min_examples: int = 10,
    max_line_bytes: int = MAX_EXAMPLE_BYTES,
) -> tuple[int, FileIssue | None]:
    """(examples, first issue or None) of a training file for a job of `method`."""
    if method == "reinforcement":
        return _check_reinforcement_file(lines, min_examples, max_line_bytes)
    kinds: list[str | None] = []

    def remember(items: Iterable[bytes]) -> Iterable[bytes]:
        for number, raw in enumerate(items, start=1):
            if not kinds:
                line = jsonl_line(raw, number)
                if line.strip():
                    try:
                        kinds.append(detect_kind(orjson.loads(line)))
                    except orjson.JSONDecodeError:
                        kinds.append(None)
            yield raw

    count, issue = check_training_file(
        remember(lines), min_examples=min_examples, max_line_bytes=max_line_bytes
    )
    first = kinds[0] if kinds else None
    if first is None:  # no line, or a first line that is not JSON: the file's own issue
        return count, issue
    if method == "dpo" and first != "preference":
        return count, FileIssue(
            1,
            "invalid_preference_example",
            f"method 'dpo' takes preference lines (input, preferred_output, non_preferred_output), "
            f"not {KIND_NAMES.get(str(first), 'this line')}",
        )
    if method == "supervised" and first == "preference":
        return count, FileIssue(
            1,
            "preference_example_in_supervised_job",
            "preference (DPO) examples need method 'dpo'; supervised jobs take chat examples",
        )
    return count, issue


def check_reinforcement_example(example: Any) -> tuple[str, str] | None:
    """(rule key, message) of the first rule a reinforcement line breaks, or None."""
    if not isinstance(example, dict):
        return "data_type", f"expected a JSON object, got {type(example).__name__}"
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return "missing_messages_list", "a reinforcement line needs a non-empty `messages` list"
    tool_names: set[str] | None = None
    if "tools" in example:
        tool_names, issue = _check_tools(example["tools"])
        if issue:
            return issue.key, issue.message
    call_ids: set[str] = set()
    for index, message in enumerate(messages):
        issue = _check_message(index, message, tool_names, call_ids)
        if issue:
            return issue.key, issue.message
    if messages[-1].get("role") != "user":
        return (
            "invalid_reinforcement_example",
            "the last message must be the user's: a reinforcement line is the prompt the model answers "
            "(its reference answer goes in another field, which the grader reads as {{item.<field>}})",
        )
    return None


def _check_reinforcement_file(
    lines: Iterable[bytes], min_examples: int, max_line_bytes: int
) -> tuple[int, FileIssue | None]:
    count = 0
    for number, raw in enumerate(lines, start=1):
        line = jsonl_line(raw, number)
        if not line.strip():
            continue
        if len(line) > max_line_bytes:
            return count, FileIssue(
                number,
                "too_large",
                f"the line is longer than {max_line_bytes} bytes, the most one example may take",
            )
        try:
            example = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if "depth" in exc.msg:
                return count, FileIssue(
                    number, "too_deep", f"the line's JSON nests deeper than {MAX_JSON_DEPTH} levels"
                )
            if "utf-8" in exc.msg.lower() or "utf8" in exc.msg.lower():
                return count, FileIssue(number, "invalid_encoding", "the line is not valid UTF-8")
            return count, FileIssue(number, "invalid_json", "the line is not valid JSON")
        if json_depth_exceeds(example, MAX_JSON_DEPTH):
            return count, FileIssue(
                number, "too_deep", f"the line's JSON nests deeper than {MAX_JSON_DEPTH} levels"
            )
        issue = check_reinforcement_example(example)
        if issue is not None:
            return count, FileIssue(number, issue[0], issue[1])
        count += 1
    if count < min_examples:
        return count, FileIssue(
            None,
            "too_few_examples",
            f"Training file has {count} example(s), but must have at least {min_examples} examples",
        )
    return count, None


def grader_item(example: dict[str, Any]) -> dict[str, Any]:
    """The fields of a reinforcement line a grader reads as `item`: all but its `messages`."""
    return {key: value for key, value in example.items() if key != "messages"}


def preference_chats(example: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preference line as two chat examples (prompt + preferred answer, prompt + non-preferred):
    what the DPO trainer encodes, each trained on its final answer only."""
    prompt = list(example["input"]["messages"])
    extra = {k: v for k, v in example["input"].items() if k in ("tools", "parallel_tool_calls")}
    return (
        {**extra, "messages": prompt + list(example["preferred_output"])},
        {**extra, "messages": prompt + list(example["non_preferred_output"])},
    )


def method_chats(example: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The chat examples one training line of a `method` job is encoded as."""
    if method == "dpo":
        return list(preference_chats(example))
    if method == "reinforcement":
        return [{"messages": example["messages"]}]
    return [example]
