"""What each fine-tuning method takes as a training line, checked before a job is queued, by the rules
the pipeline's validate stage applies (tuneline.formats, one source for both sides):

- supervised: chat or prompt/completion lines; a preference line there is `wrong_method_format`.
- dpo: preference lines (`input`, `preferred_output`, `non_preferred_output`).
- reinforcement: chat lines whose last message is the user's (the prompt the model answers while it
  trains); every other top-level field of the line is the grader's `item` ({{item.x}},
  tuneline.formats.grader_fields).

`check_method_file` never raises for any content: it returns the count of examples and the first issue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from tuneline.formats import MAX_EXAMPLE_BYTES, FileIssue, TrainingMethod, check_training_file


def check_method_file(
    lines: Iterable[bytes],
    method: str,
    min_examples: int = 10,
    max_line_bytes: int = MAX_EXAMPLE_BYTES,
) -> tuple[int, FileIssue | None]:
    """(examples, first issue or None) of a training file for a job of `method`."""
    return check_training_file(lines, min_examples, max_line_bytes, method=cast(TrainingMethod, method))


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
