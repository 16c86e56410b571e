"""How a conversation becomes tokens, for training (with the loss mask) and for generation.

One renderer serves both, so a model is trained on exactly the text it is later prompted with:
- the built-in model's tokenizer carries its own Jinja chat template with its special tokens
  (`<|system|>content<|end|><|user|>content<|end|><|assistant|>content<|end|>`);
- a Hugging Face checkpoint uses `tokenizer.apply_chat_template` when its tokenizer has a template;
- a tokenizer without one gets the documented plain fallback (PLAIN_TEMPLATE below): `System: ...`,
  `User: ...`, `Assistant: ...` lines, each assistant turn closed by the tokenizer's EOS token.

The loss mask comes from character offsets: each trained assistant turn is located in the rendered
text (the difference between the conversation rendered up to that turn, with the generation prompt,
and rendered through it), and a token is trained when it starts inside such a span. So the span holds
the assistant's text and the end-of-turn token, and never the role header or the other turns.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuneline.formats import completion_to_chat, message_text

IGNORE_INDEX = -100

# The role header of the built-in model's template for each role a training line may carry.
BUILTIN_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
BUILTIN_END = "<|end|>"
BUILTIN_PAD = "<|pad|>"
BUILTIN_SPECIAL_TOKENS = (BUILTIN_PAD, BUILTIN_END, "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
BUILTIN_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The fallback for tokenizers without a chat template: plain role-prefixed lines.
PLAIN_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: ", "tool": "Tool: "}
PLAIN_TEMPLATE = "System: {system}\nUser: {user}\nAssistant: {assistant}<eos>\n ... then `Assistant:`"


def chat_messages(example: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of a training line; a legacy prompt/completion line becomes a chat of two turns."""
    if "messages" in example:
        return list(example["messages"])
    return completion_to_chat(dict(example), None)["messages"]


def _normalized(message: Mapping[str, Any]) -> dict[str, str]:
    """A message as role + plain text: content parts joined, tool calls written as JSON after it."""
    role = str(message.get("role", "user"))
    role = {"developer": "system", "function": "tool"}.get(role, role)
    text = message_text(dict(message))
    calls = message.get("tool_calls")
    if calls:
        text = (
            f"{text}\n{json.dumps(calls, ensure_ascii=False)}"
            if text
            else json.dumps(calls, ensure_ascii=False)
        )
    elif message.get("function_call"):
        text = (
            f"{text}\n{json.dumps(message['function_call'], ensure_ascii=False)}"
            if text
            else json.dumps(message["function_call"], ensure_ascii=False)
        )
    return {"role": role, "content": text}


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and their labels (IGNORE_INDEX where no loss is taken), truncated to the context."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class ChatFormat:
    """Renders conversations for one tokenizer and knows which token ids end an assistant turn."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))
        eos = getattr(tokenizer, "eos_token", None)
        self.eos_text: str = eos if isinstance(eos, str) else ""
        self.stop_token_ids: set[int] = set()
        for token in (
            BUILTIN_END,
            self.eos_text,
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_turn|>",
            "<end_of_turn>",
        ):
            if not token:
                continue
            token_id = tokenizer.convert_tokens_to_ids(token)
            if (
                isinstance(token_id, int)
                and token_id >= 0
                and token_id != getattr(tokenizer, "unk_token_id", None)
            ):
                self.stop_token_ids.add(token_id)
        # Without an end-of-turn token the plain fallback stops on the next turn's header instead.
        self.stop_strings: list[str] = [] if self.stop_token_ids else ["\nUser:"]

    # -- rendering --

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        normalized = [_normalized(m) for m in messages]
        if self.uses_template:
            try:
                text = self.tokenizer.apply_chat_template(
                    normalized, tokenize=False, add_generation_prompt=add_generation_prompt
                )
                return str(text)
            except Exception:  # a template that refuses a role (e.g. `tool`) gets the plain form
                pass
        return self._render_plain(normalized, add_generation_prompt)

    def _render_plain(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        parts = []
        for message in messages:
            prefix = PLAIN_PREFIX.get(message["role"], f"{message['role'].capitalize()}: ")
            end = self.eos_text if message["role"] == "assistant" else ""
            parts.append(f"{prefix}{message['content']}{end}\n")
        if add_generation_prompt:
            parts.append("Assistant:")
        return "".join(parts)

    # -- encoding --

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The token ids of a conversation followed by the assistant's turn header."""
        return self._ids(self.render(messages, add_generation_prompt=True))

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def trained_spans(self, messages: Sequence[Mapping[str, Any]], text: str) -> list[tuple[int, int]]:
        """Character spans of `text` (the whole conversation rendered) that the loss is taken on."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for index, message in enumerate(messages):
            if message.get("role") != "assistant" or message.get("weight", 1) == 0:
                continue
            before = self.render(messages[:index], add_generation_prompt=True)
            through = self.render(messages[: index + 1], add_generation_prompt=False)
            if through.startswith(before) and text.startswith(through) and len(through) > len(before):
                spans.append((len(before), len(through)))
                cursor = len(through)
                continue
            # A template that rewrites earlier turns: find the turn's own text after the last span.
            content = _normalized(message)["content"]
            start = text.find(content, cursor) if content else -1
            if start < 0:
                continue
            end = start + len(content)
            for closer in sorted(self._closers(), key=len, reverse=True):
                if closer and text.startswith(closer, end):
                    end += len(closer)
                    break
            spans.append((start, end))
            cursor = end
        return spans

    def _closers(self) -> list[str]:
        names = [self.tokenizer.convert_ids_to_tokens(i) for i in sorted(self.stop_token_ids)]
        return [n for n in names if isinstance(n, str)]

    def encode_example(self, example: Mapping[str, Any], max_length: int) -> EncodedExample:
        """A training line as ids + labels: labels only on trained assistant turns; over-long
        examples are truncated from the end, as the hosted service does."""
        messages = chat_messages(example)
        text = self.render(messages, add_generation_prompt=False)
        spans = self.trained_spans(messages, text)
        ids, starts = self._ids_and_starts(text, spans)
        labels = [IGNORE_INDEX] * len(ids)
        span_index = 0
        for position, start in enumerate(starts):
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
                labels[position] = ids[position]
        return EncodedExample(ids[:max_length], labels[:max_length])

    def _ids_and_starts(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Token ids of `text` and the character offset where each token starts."""
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
            return list(encoded["input_ids"]), [start for start, _ in encoded["offset_mapping"]]
        # Slow tokenizers have no offsets: encode the text piecewise at the span boundaries.
        cuts = sorted({0, len(text), *(p for span in spans for p in span)})
        ids: list[int] = []
        starts: list[int] = []
        for left, right in itertools.pairwise(cuts):
            piece = self._ids(text[left:right])
            ids.extend(piece)
            starts.extend([left] * len(piece))
        return ids, starts
