"""How a conversation becomes tokens, for training (with the loss mask) and for generation.

One renderer serves both, so a model is trained on exactly the text it is later prompted with:
- the built-in model's tokenizer carries its own Jinja chat template with its special tokens
  (`<|system|>content<|end|><|user|>content<|end|><|assistant|>content<|end|>`);
- a Hugging Face checkpoint uses `tokenizer.apply_chat_template` when its tokenizer has a template;
- a tokenizer without one gets the documented plain fallback (PLAIN_TEMPLATE below): `System: ...`,
  `User: ...`, `Assistant: ...` lines, each assistant turn closed by the tokenizer's EOS token.

Templates are rendered as their models' own code does (`tokenizer.apply_chat_template`), with two
accommodations, both tried only when the template refuses a conversation: a template that rejects a
system message (Gemma 2: "System role not supported") gets it prepended to the first user message, as
Gemma 3's official template does itself; one that still refuses gets the plain form. Templates with a
thinking switch (Qwen 3) are rendered with `enable_thinking=False`: fine-tuning data holds answers,
not reasoning, and the prompt then carries the empty thinking block the model was trained to skip.

The end-of-turn token is read off the template, not listed by hand: a probe conversation is rendered
and the first token after the assistant's text is taken when it is a special token (`<|eot_id|>`,
`<|im_end|>`, `<end_of_turn>`, `</s>`, `<|end|>`...). Generation stops on it, on the EOS token and on
the ids the model's generation config lists (ChatModel adds those).

The loss mask comes from character offsets: each trained assistant turn is located in the rendered
text (the difference between the conversation rendered up to that turn, with the generation prompt,
and rendered through it), cut right after its end-of-turn token, and a token is trained when it
starts inside such a span. So the span holds exactly the assistant's text and its end-of-turn token:
never the role header, the whitespace a template writes after the turn, or the other turns.
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


def _system_folded(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The conversation with its system messages prepended to the first user message (blank line
    between), for templates without a system role; None when there is no system message to fold."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    if not system:
        return None
    rest = [dict(m) for m in messages if m["role"] != "system"]
    prefix = "\n\n".join(system)
    for message in rest:
        if message["role"] == "user":
            message["content"] = f"{prefix}\n\n{message['content']}" if message["content"] else prefix
            return rest
    return [{"role": "user", "content": prefix}, *rest]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and their labels (IGNORE_INDEX where no loss is taken), truncated to the context."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


# A probe conversation whose assistant text the end-of-turn token follows (see ChatFormat.end_of_turn).
_PROBE = ({"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong-7f3a."})


class ChatFormat:
    """Renders conversations for one tokenizer and knows which token ids end an assistant turn."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))
        eos = getattr(tokenizer, "eos_token", None)
        self.eos_text: str = eos if isinstance(eos, str) else ""
        self.end_of_turn: str | None = self._template_end_of_turn() if self.uses_template else None
        self.end_of_turn_texts: list[str] = [t for t in dict.fromkeys([self.end_of_turn, self.eos_text]) if t]
        self.stop_token_ids: set[int] = set()
        # The template's end of turn and EOS, and the end-of-turn tokens of well-known templates that a
        # tokenizer may carry without a template of its own.
        for token in (
            *self.end_of_turn_texts,
            BUILTIN_END,
            "<|im_end|>",
            "<|eot_id|>",
            "<|end_of_turn|>",
            "<end_of_turn>",
        ):
            token_id = self._special_id(token)
            if token_id is not None:
                self.stop_token_ids.add(token_id)
        # Without an end-of-turn token the plain fallback stops on the next turn's header instead.
        self.stop_strings: list[str] = [] if self.stop_token_ids else ["\nUser:"]

    def _special_id(self, token: str) -> int | None:
        """The id of `token` when the tokenizer holds it as one token (not the unknown token)."""
        if not token:
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if (
            isinstance(token_id, int)
            and token_id >= 0
            and token_id != getattr(self.tokenizer, "unk_token_id", None)
        ):
            return token_id
        return None

    def _template_end_of_turn(self) -> str | None:
        """The special token the template writes right after an assistant's text, if any."""
        try:
            before = self.render(_PROBE[:1], add_generation_prompt=True)
            through = self.render(_PROBE, add_generation_prompt=False)
        except Exception:
            return None
        content = str(_PROBE[1]["content"])
        at = through.find(content, len(before) if through.startswith(before) else 0)
        if at < 0:
            return None
        after = through[at + len(content) :]
        ids = self._ids(after)
        if not ids:
            return None
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        added = set(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
        if ids[0] not in special | added:
            return None
        token = self.tokenizer.convert_ids_to_tokens(ids[0])
        return token if isinstance(token, str) and after.startswith(token) else None

    # -- rendering --

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        normalized = [_normalized(m) for m in messages]
        if self.uses_template:
            for attempt in (normalized, _system_folded(normalized)):
                if attempt is None:
                    continue
                try:
                    text = self.tokenizer.apply_chat_template(
                        attempt,
                        tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                        enable_thinking=False,
                    )
                    return str(text)
                except Exception:  # a template that refuses a role (e.g. `system`, `tool`)
                    continue
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

    def training_text(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The conversation as it is trained on: the template's rendering, except where that rendering
        does not begin with the prompt the final answer will be asked with. Some templates move context
        when the conversation ends with an answer (Mistral's writes the system message into the last
        user turn only while a user turn is last, so a rendered training line has no system message at
        all): the final turn is then trained on that prompt followed by its answer and end-of-turn token,
        exactly the text it is later asked with and answers."""
        text = self.render(messages, add_generation_prompt=False)
        if not messages or messages[-1].get("role") != "assistant":
            return text
        prompt = self.render(messages[:-1], add_generation_prompt=True)
        if text.startswith(prompt):
            return text
        closer = self.end_of_turn or self.eos_text
        return f"{prompt}{_normalized(messages[-1])['content']}{closer}"

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
                start, end = len(before), self._turn_end(text, len(before), len(through))
                spans.append((start, end))
                cursor = end
                continue
            # A template that rewrites earlier turns (a system message moved into the last user turn,
            # thinking blocks dropped from past turns): the turn's own text after the last span.
            content = _normalized(message)["content"]
            start = text.find(content, cursor) if content else -1
            if start < 0:
                continue
            end = start + len(content)
            for closer in sorted(self._closers(), key=len, reverse=True):
                if text.startswith(closer, end):
                    end += len(closer)
                    break
            spans.append((start, end))
            cursor = end
        return spans

    def _turn_end(self, text: str, start: int, end: int) -> int:
        """Where the turn in text[start:end] ends: right after its first end-of-turn token (what a
        template writes after that token, a newline or the next turn's opener, is not the turn's)."""
        found = [at + len(t) for t in self.end_of_turn_texts if (at := text.find(t, start, end)) >= 0]
        return min(found) if found else end

    def _closers(self) -> list[str]:
        names = [self.tokenizer.convert_ids_to_tokens(i) for i in sorted(self.stop_token_ids)]
        return [n for n in dict.fromkeys([*self.end_of_turn_texts, *names]) if isinstance(n, str) and n]

    def encode_example(self, example: Mapping[str, Any], max_length: int) -> EncodedExample:
        """A training line as ids + labels: labels only on trained assistant turns; over-long
        examples are truncated from the end, as the hosted service does."""
        messages = chat_messages(example)
        text = self.training_text(messages)
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
