"""Validate: format rules and exact token counts become columns of the record frame.

Guarantees of `validate`:
- every still-kept row is checked against tuneline/formats.py as a line of the configured method's
  file (training.method): a row that breaks a rule is quarantined with the rule's error key, and
  `detail` says what broke and what the rule asks for; a line of another method's format (a chat
  line in a dpo batch, a preference line in a supervised one) is `wrong_method_format`;
- legacy prompt/completion rows become chat (with config.model.system_prompt) for chat models and stay
  as they are for babbage-002/davinci-002, so `example` holds the line exactly as it will be exported;
- columns `kind`, `n_tokens`, `n_assistant_tokens` (exact, tuneline/tokens.py; null on rows that were
  never countable), `truncated` and `truncation`;
- an example over the model's training context is quarantined `too_long`, or cut to fit when
  validation.too_long is `truncate` (trailing turns dropped first, then the assistant turn shortened).

The whole batch is checked later, after dedupe, by the data-quality stage (tasks/quality.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import tiktoken

from tuneline import formats, records, tokens
from tuneline.config import ModelConfig, ValidationConfig

COMPLETION_MODELS = ("babbage-002", "davinci-002")

# Examples counted at once, which share one memory of the texts counted (`known`): bounds its size.
TOKEN_BATCH = 20_000


def is_completion_model(model: str) -> bool:
    """babbage-002 and davinci-002 train on prompt/completion lines; every other model on chat lines."""
    base = model.removeprefix("ft:").split(":")[0]
    return base.startswith(COMPLETION_MODELS)


def allowed_kinds(model: str, method: str = "supervised") -> tuple[formats.ExampleKind, ...]:
    """Line formats accepted in a batch for this model and method (completion lines are converted for
    chat models)."""
    if method != "supervised":
        return formats.METHOD_KINDS[method]
    return ("completion",) if is_completion_model(model) else ("chat", "completion")


def exported_kind(model: str, method: str = "supervised") -> formats.ExampleKind:
    if method != "supervised":
        return formats.METHOD_KINDS[method][0]
    return "completion" if is_completion_model(model) else "chat"


def vocabulary_for(model: ModelConfig) -> tokens.Vocabulary:
    """The model's vocabulary: counts without loading tiktoken's encoding (tuneline/tokens.py)."""
    return tokens.Vocabulary(tokens.encoding_name_for_model(model.base, model.tokenizer))


def context_limit(model: ModelConfig, validation: ValidationConfig) -> int:
    return tokens.context_limit(model.base, validation.context_limits, validation.default_context_limit)


def validate(
    frame: pd.DataFrame, model: ModelConfig, validation: ValidationConfig, method: str = "supervised"
) -> pd.DataFrame:
    """The frame with format rules applied (as lines of a `method` training file), legacy lines
    converted, and token columns added."""
    frame = frame.copy()
    n = len(frame)
    examples = frame[records.EXAMPLE].to_numpy(dtype=object, copy=True)
    kinds = np.full(n, None, dtype=object)
    completion_model = is_completion_model(model.base)
    allowed = allowed_kinds(model.base, method)
    issues: dict[str, tuple[list[int], list[str]]] = {}
    for position in np.flatnonzero(records.kept_mask(frame).to_numpy()):
        example = examples[position]
        kind = formats.kind_for_method(example, method)
        kinds[position] = kind
        issue = formats.check_for_method(example, method, allowed)
        if issue is not None:
            rows, details = issues.setdefault(issue.key, ([], []))
            rows.append(int(position))
            details.append(f"{issue.message}: {formats.RULES[issue.key]}")
        elif kind == "completion" and not completion_model:
            examples[position] = formats.completion_to_chat(example, model.system_prompt)
            kinds[position] = "chat"
    frame[records.EXAMPLE] = pd.Series(examples, index=frame.index, dtype=object)
    frame[records.KIND] = pd.Series(records.labels(kinds), index=frame.index)
    for key, (rows, details) in issues.items():
        records.quarantine_at(frame, rows, key, details)

    vocabulary = vocabulary_for(model)
    limit = context_limit(model, validation)
    counted = np.flatnonzero(records.kept_mask(frame).to_numpy())
    n_tokens = np.zeros(n, dtype=np.int64)
    n_assistant = np.zeros(n, dtype=np.int64)
    for start in range(0, len(counted), TOKEN_BATCH):
        chunk = counted[start : start + TOKEN_BATCH]
        batch = [examples[i] for i in chunk]
        known: dict[str, int] = {}  # texts of this batch already counted: the assistant turns among them
        n_tokens[chunk] = tokens.count_tokens(batch, vocabulary, known)
        n_assistant[chunk] = tokens.count_assistant_tokens(batch, vocabulary, known)

    truncated = np.zeros(n, dtype=bool)
    truncation = np.full(n, None, dtype=object)
    too_long: list[int] = []
    too_long_details: list[str] = []
    for position in counted[n_tokens[counted] > limit]:
        before = int(n_tokens[position])
        shortened, how = (
            (None, "")
            if validation.too_long == "quarantine"
            else _truncate(examples[position], limit, vocabulary)
        )
        if shortened is None:
            too_long.append(position)
            fix = (
                "shorten it"
                if validation.too_long == "truncate"
                else "shorten it, or set validation.too_long: truncate"
            )
            why = f"; it cannot be truncated: {how}" if how else ""
            too_long_details.append(
                f"{before} tokens, over the {limit}-token training context of {model.base}{why} ({fix})"
            )
            continue
        examples[position] = shortened
        n_tokens[position] = tokens.count_tokens([shortened], vocabulary)[0]
        n_assistant[position] = tokens.count_assistant_tokens([shortened], vocabulary)[0]
        truncated[position] = True
        truncation[position] = f"{how} ({before} -> {n_tokens[position]} tokens, limit {limit})"
    frame[records.EXAMPLE] = pd.Series(examples, index=frame.index, dtype=object)
    has_counts = np.zeros(n, dtype=bool)
    has_counts[counted] = True
    frame[records.N_TOKENS] = pd.arrays.IntegerArray(n_tokens, ~has_counts)
    frame[records.N_ASSISTANT_TOKENS] = pd.arrays.IntegerArray(n_assistant, ~has_counts)
    frame[records.TRUNCATED] = truncated
    frame[records.TRUNCATION] = pd.Series(truncation, index=frame.index, dtype=object)
    records.quarantine_at(frame, too_long, records.TOO_LONG, too_long_details)
    return frame


def _truncate(
    example: dict[str, Any], limit: int, vocabulary: tokens.Vocabulary
) -> tuple[dict[str, Any] | None, str]:
    """The example cut to `limit` tokens and how, or None and why it cannot be cut."""

    def fits(candidate: dict[str, Any]) -> bool:
        return tokens.count_tokens([candidate], vocabulary)[0] <= limit

    if "messages" in example:
        messages = example["messages"]
        learnable = [
            i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("weight", 1) == 1
        ]
        if not learnable:
            return None, "reinforcement prompts are not truncated"
        # Dropping trailing turns keeps every kept turn whole: try the longest prefix first.
        for index in reversed(learnable):
            candidate = {**example, "messages": messages[: index + 1]}
            if fits(candidate):
                return candidate, f"dropped {len(messages) - index - 1} trailing message(s)"
        first = learnable[0]
        turn = messages[first]
        if not isinstance(turn.get("content"), str) or turn.get("tool_calls"):
            return None, "the first assistant turn is a tool call, which cannot be shortened"
        dropped = len(messages) - first - 1

        def build(text: str) -> dict[str, Any]:
            return {**example, "messages": [*messages[:first], {**turn, "content": text}]}

        shortened = _shorten(turn["content"], build, fits, vocabulary.encoding)
        if shortened is None:
            return None, "the turns before the first assistant answer alone fill the context"
        return shortened, f"dropped {dropped} trailing message(s) and shortened the assistant turn {first}"
    if "prompt" in example:

        def build_completion(text: str) -> dict[str, Any]:
            return {**example, "completion": text}

        shortened = _shorten(example["completion"], build_completion, fits, vocabulary.encoding)
        if shortened is None:
            return None, "the prompt alone fills the context"
        return shortened, "shortened the completion"
    return None, "preference examples are not truncated"


def _shorten(text: str, build: Any, fits: Any, encoding: tiktoken.Encoding) -> dict[str, Any] | None:
    """`build(prefix)` for the longest prefix of `text` (whole tokens) that still fits, or None."""
    ids = encoding.encode_ordinary(text)

    def prefix(length: int) -> str:
        # Bytes of a token cut mid-character are dropped rather than shown as U+FFFD.
        return encoding.decode_bytes(ids[:length]).decode("utf-8", "ignore").rstrip()

    low, high = 0, len(ids)
    while low < high:  # binary search: the count grows with the prefix
        middle = (low + high + 1) // 2
        if fits(build(prefix(middle))):
            low = middle
        else:
            high = middle - 1
    # A decoded prefix can re-encode differently at its edge, so confirm and step down if needed.
    for length in range(low, 0, -1):
        text_prefix = prefix(length)
        if text_prefix.strip() and fits(candidate := build(text_prefix)):
            return candidate
    return None
