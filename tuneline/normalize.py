"""The normalised forms the dedupe rules compare, and the word shingles near-duplicates are measured on.

Normalised text: NFKC, casefold, punctuation removed, whitespace collapsed. So case, whitespace and
punctuation variants of a text normalise to the same string. "Punctuation" is every
character of Unicode category P*; invisible format characters (category Cf: zero-width spaces, soft
hyphens, byte-order marks) and control characters that are not whitespace go too, since they are
invisible variants as well. Letters, marks, digits and symbols (S*: $, +, emoji) stay.

The normalised example is the normalised text of every message's role and text, tool calls included,
so two examples are exact duplicates only when they say the same things in the same roles.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from tuneline.formats import message_text, prompt_and_answer


def _removed(char: str) -> bool:
    category = unicodedata.category(char)
    return category[0] == "P" or (category in ("Cc", "Cf") and not char.isspace())


class _RemovalTable(dict[int, str | None]):
    """A str.translate table deleting every character `_removed` is true for; filled lazily, one
    code point at a time, as characters are met."""

    def __missing__(self, code: int) -> str | None:
        value = None if _removed(chr(code)) else chr(code)
        self[code] = value
        return value


_REMOVAL = _RemovalTable()


# ASCII text (almost all of it) takes a byte-level path, several times faster than the general route:
# one translate() lowercases (casefold and lower agree on ASCII), drops punctuation and controls, and
# maps the separators \x1c-\x1f (whitespace to str.split, not to bytes.split) to spaces.
_ASCII_DELETE = bytes(c for c in range(128) if _removed(chr(c)))
_ASCII_TABLE = bytes.maketrans(
    bytes(range(ord("A"), ord("Z") + 1)) + b"\x1c\x1d\x1e\x1f",
    bytes(range(ord("a"), ord("z") + 1)) + b"    ",
)


def normalize_text(text: str) -> str:
    """The normalised form: NFKC, casefold, punctuation removed, whitespace collapsed to single spaces.

    Idempotent: normalize_text(normalize_text(t)) == normalize_text(t).
    """
    if text.isascii():
        return b" ".join(text.encode("ascii").translate(_ASCII_TABLE, _ASCII_DELETE).split()).decode("ascii")
    return normalize_unicode_text(text)


def normalize_unicode_text(text: str) -> str:
    """normalize_text for any text, by the general route (NFKC, casefold, translate); the ASCII fast path
    of normalize_text must agree with it."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    stripped = folded.translate(_REMOVAL)
    # Removing a character can leave a base letter next to a combining mark it composes with.
    return " ".join(unicodedata.normalize("NFKC", stripped).split())


class Normalizer:
    """normalize_text with a memory: the system prompt and templated replies recur in most records, so
    each distinct text is normalised once per batch."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        normalized = self._seen.get(text)
        if normalized is None:
            normalized = self._seen[text] = normalize_text(text)
        return normalized


def example_turns(example: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) for every message of an example, in order; tool calls are texts of their turn.

    Preference (DPO) lines give their input turns, then the preferred and non-preferred answers under
    those names; legacy lines give `prompt` and `completion`.
    """
    if "messages" in example:
        return _turns(example["messages"], None)
    if "input" in example:
        turns = _turns(example["input"]["messages"], None)
        for key in ("preferred_output", "non_preferred_output"):
            turns.extend(_turns(example[key], key))
        return turns
    return [("prompt", str(example.get("prompt", ""))), ("completion", str(example.get("completion", "")))]


def turns_prompt_and_answer(example: dict[str, Any]) -> tuple[list[tuple[str, str]], str, str]:
    """(example_turns(example), *formats.prompt_and_answer(example)), in one pass over the messages of
    a plain chat example (string roles and contents, no tool calls): the dedupe stage asks this of
    every record."""
    if "messages" in example:
        turns: list[tuple[str, str]] = []
        last = -1
        for index, message in enumerate(example["messages"]):
            role = message.get("role", "")
            content = message.get("content")
            if role.__class__ is not str or content.__class__ is not str:
                break
            if "tool_calls" in message or "function_call" in message:
                break
            turns.append((role, content))
            if role == "assistant":
                last = index
        else:
            asked = turns if last < 0 else turns[:last]
            prompt = "\n".join([text for role, text in asked if role != "system"])
            return turns, prompt, turns[last][1] if last >= 0 else ""
    return (example_turns(example), *prompt_and_answer(example))


def _turns(messages: list[dict[str, Any]], role: str | None) -> list[tuple[str, str]]:
    """The turns of messages, under their own roles or under `role`."""
    turns: list[tuple[str, str]] = []
    for message in messages:
        name = role if role is not None else message.get("role", "")
        name = name if isinstance(name, str) else str(name)
        turns.append((name, message_text(message)))
        if "tool_calls" in message or "function_call" in message:
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                turns.append((name, f"{function.get('name', '')} {function.get('arguments', '')}"))
            if message.get("function_call"):
                turns.append((name, json.dumps(message["function_call"], sort_keys=True)))
    return turns


def normalized_example(example: dict[str, Any], normalize: Normalizer | None = None) -> str:
    """The normalised example: roles and texts of all its turns, normalised and joined by spaces."""
    normalize = normalize or Normalizer()
    parts: list[str] = []
    for turn in example_turns(example):
        for piece in turn:
            normalized = normalize(piece)
            if normalized:
                parts.append(normalized)
    return " ".join(parts)


def normalized_prompt_and_answer(
    example: dict[str, Any], normalize: Normalizer | None = None
) -> tuple[str, str]:
    """The normalised prompt (every turn before the last assistant turn, system left out) and answer."""
    normalize = normalize or Normalizer()
    prompt, answer = prompt_and_answer(example)
    return normalize(prompt), normalize(answer)


def word_shingles(normalized: str, size: int) -> frozenset[tuple[str, ...]]:
    """The set of runs of `size` consecutive words; a text shorter than that is one shingle of all its
    words; an empty text has none."""
    words = normalized.split()
    if len(words) <= size:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(zip(*(words[i:] for i in range(size)), strict=False))


def jaccard(a: frozenset[tuple[str, ...]], b: frozenset[tuple[str, ...]]) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


def shingle_jaccard(first: str, second: str, size: int) -> float:
    """Exact Jaccard similarity of the word shingles of two normalised texts."""
    return jaccard(word_shingles(first, size), word_shingles(second, size))
