"""User messages of the demo task, and the registry that keeps every kept message distinct.

A message is one of an intent's core sentences with its {slots} filled, framed by a phrasebook's
greeting, details, contexts, ask and sign-off, sometimes with a typo or in lower case.

Distinctness is measured with tuneline/normalize.py (the data contract's normalised forms and word
shingles) in several readings of "normalised" (`READINGS`: punctuation removed or replaced by a space,
system prompt included or not), so that the demo data does not depend on which one a dedupe stage
implements.
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from tuneline import formats, normalize
from tuneline.config import DedupeConfig
from tuneline.demo.content import (
    EVAL_BOOK,
    INTENTS,
    STREAM,
    SUPPORT,
    SYSTEM_PROMPT,
    TRAIN_BOOK,
    Intent,
    Phrasebook,
)

SHINGLE_SIZE = DedupeConfig().shingle_size
# A new clean message is refused at or above these: its prompt against an eval prompt, and its whole
# example against the examples of the same intent (only those share the system prompt and answer).
# Stricter than the final check (guarantees.DISTINCT_BELOW, in every reading), so it rarely fails.
ADMIT_EVAL_BELOW = 0.6
ADMIT_SAME_INTENT_BELOW = 0.7

SLOT = re.compile(r"\{(\w+)\}")


def _past_date(rng: random.Random) -> str:
    """A day in October or early November: before the first partition, as users write about the past."""
    month = rng.choice(SUPPORT.months)
    return f"{month} {rng.randint(1, 31 if month.startswith('Oct') else 15)}"


SLOT_FILLERS: dict[str, Callable[[random.Random], str]] = {
    "order": lambda rng: f"#{rng.randint(10000, 99999)}",
    "product": lambda rng: rng.choice(SUPPORT.products),
    "amount": lambda rng: (
        f"{rng.choice('$$$£€')}{rng.randint(12, 480)}.{rng.choice(('00', '49', '95', '99'))}"
    ),
    "date": lambda rng: _past_date(rng),
    "platform": lambda rng: rng.choice(SUPPORT.platforms),
    "version": lambda rng: f"{rng.randint(3, 5)}.{rng.randint(0, 12)}.{rng.randint(0, 9)}",
}


def fill(template: str, rng: random.Random, values: dict[str, str] | None = None) -> str:
    """The template with each {slot} replaced by a drawn value; one message passes one `values` dict,
    so that its sentences agree (one order number, one product, ...)."""
    values = {} if values is None else values

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            values[name] = SLOT_FILLERS[name](rng)
        return values[name]

    return SLOT.sub(value, template)


def add_typo(text: str, rng: random.Random) -> str:
    """Swap two inner letters of one longer word, as a hurried typist does."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    w = words[i]
    j = rng.randrange(1, len(w) - 2)
    if w[j] == w[j + 1]:
        return text
    words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    return " ".join(words)


def compose_message(
    intent: Intent, rng: random.Random, book: Phrasebook, *, long: bool = False, short: bool = False
) -> str:
    """One user message for `intent`: 10-60 words (50-60 when `long`, at most 25 when `short`)."""
    low, high = (50, 60) if long else (10, 25 if short else 60)
    while True:
        parts: list[str] = []
        values: dict[str, str] = {}
        if long or rng.random() < 0.55:
            parts.append(rng.choice(book.greetings))
        parts.append(fill(rng.choice(book.cores(intent)), rng, values))
        details = book.details(intent)
        n_details = min(len(details), 2 if long else int(rng.random() < 0.6) * (0 if short else 1))
        parts.extend(fill(d, rng, values) for d in rng.sample(details, n_details))
        n_contexts = min(len(book.contexts), 3 if long else int(not short and rng.random() < 0.3))
        parts.extend(rng.sample(book.contexts, n_contexts))
        if long or rng.random() < 0.6:
            parts.append(rng.choice(book.asks))
        if long or rng.random() < 0.5:
            signoff = rng.choice(book.signoffs)
            # The condition draws first, the name only when it is used (the draws make the bytes).
            parts.append(
                f"{signoff}, {rng.choice(SUPPORT.names)}" if long or rng.random() < 0.5 else f"{signoff}."
            )
        separator = "\n" if rng.random() < 0.15 else " "
        text = parts[0] + separator + " ".join(parts[1:]) if len(parts) > 1 else parts[0]
        if rng.random() < 0.1:
            text = add_typo(text, rng)
        if rng.random() < 0.07:
            text = text.lower()
        if low <= len(text.split()) <= high:
            return text


def chat_example(user: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def example_text(example: dict[str, Any]) -> str:
    return "\n".join(formats.example_texts(example))


# --------------------------------------------------------------------------------------------------
# Normalised forms, in each reasonable reading of the contract's.


class _PunctuationToSpace(dict[int, str]):
    """A `str.translate` table that turns every Unicode punctuation character (category P*) into a
    space, filled lazily as characters are met."""

    def __missing__(self, codepoint: int) -> str:
        char = chr(codepoint)
        self[codepoint] = " " if unicodedata.category(char).startswith("P") else char
        return self[codepoint]


_PUNCTUATION_TO_SPACE = _PunctuationToSpace()


@dataclass(frozen=True)
class Reading:
    """One reading of the contract's normalised form. The canonical one is tuneline/normalize.py's
    (punctuation removed, system prompt included); the others are what a dedupe stage might
    reasonably do instead, and the data must not depend on which."""

    punctuation_as_space: bool
    with_system: bool

    def text(self, text: str) -> str:
        return text.translate(_PUNCTUATION_TO_SPACE) if self.punctuation_as_space else text

    def view(self, example: dict[str, Any]) -> dict[str, Any]:
        """The example as this reading sees it, ready for tuneline/normalize.py."""
        if not self.punctuation_as_space and self.with_system:
            return example
        messages = []
        for message in example["messages"]:
            if not self.with_system and message.get("role") == "system":
                continue
            seen = dict(message)
            if isinstance(seen.get("content"), str):
                seen["content"] = self.text(seen["content"])
            if seen.get("tool_calls"):
                seen["tool_calls"] = [
                    {**call, "function": {k: self.text(str(v)) for k, v in call.get("function", {}).items()}}
                    for call in seen["tool_calls"]
                ]
            messages.append(seen)
        return {**example, "messages": messages}


CANONICAL = Reading(punctuation_as_space=False, with_system=True)
READINGS = (CANONICAL, Reading(True, True), Reading(False, False), Reading(True, False))


def normalized_example(example: dict[str, Any], reading: Reading = CANONICAL) -> str:
    return normalize.normalized_example(reading.view(example))


def normalized_prompt_answer(example: dict[str, Any], reading: Reading = CANONICAL) -> tuple[str, str]:
    return normalize.normalized_prompt_and_answer(reading.view(example))


def shingles(normalized: str) -> frozenset[tuple[str, ...]]:
    return normalize.word_shingles(normalized, SHINGLE_SIZE)


jaccard = normalize.jaccard


def jaccard_matrix(sets: Sequence[frozenset[Any]]) -> np.ndarray:
    """Exact pairwise Jaccard of many shingle sets, by one sparse product."""
    vocabulary: dict[Any, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    for row, items in enumerate(sets):
        for item in items:
            rows.append(row)
            cols.append(vocabulary.setdefault(item, len(vocabulary)))
    incidence = sparse.csr_matrix(
        (np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(sets), max(1, len(vocabulary)))
    )
    inter = (incidence @ incidence.T).toarray().astype(np.float64)
    sizes = np.array([len(s) for s in sets], dtype=np.float64)
    union = sizes[:, None] + sizes[None, :] - inter
    return np.divide(inter, union, out=np.ones_like(inter), where=union > 0)


class PromptRegistry:
    """Every prompt a kept record uses, so that a new clean record can be checked against all of them.

    A clean message is admitted only when its normalised prompt is new in both punctuation readings
    (no exact duplicate, no contradiction), it is far from every eval prompt (no leak), and its whole
    example is far from every kept example of the same intent (no near-duplicate).
    """

    def __init__(self) -> None:
        self.prompts: set[tuple[bool, str]] = set()
        self.eval_shingles: list[frozenset[tuple[str, ...]]] = []
        self.by_intent: dict[str, list[frozenset[tuple[str, ...]]]] = {}

    def _prompt_keys(self, user: str) -> list[tuple[bool, str]]:
        return [(r.punctuation_as_space, normalize.normalize_text(r.text(user))) for r in READINGS[:2]]

    def admits(self, intent: Intent, user: str, *, against_eval: bool = True) -> bool:
        if any(key in self.prompts for key in self._prompt_keys(user)):
            return False
        prompt = shingles(normalize.normalize_text(user))
        if against_eval and any(jaccard(prompt, e) >= ADMIT_EVAL_BELOW for e in self.eval_shingles):
            return False
        whole = shingles(normalized_example(chat_example(user, intent.answer)))
        return all(
            jaccard(whole, other) < ADMIT_SAME_INTENT_BELOW for other in self.by_intent.get(intent.name, ())
        )

    def claim(self, intent: Intent | None, user: str) -> None:
        self.prompts.update(self._prompt_keys(user))
        if intent is not None:
            whole = shingles(normalized_example(chat_example(user, intent.answer)))
            self.by_intent.setdefault(intent.name, []).append(whole)

    def add_eval(self, user: str) -> None:
        self.claim(None, user)
        self.eval_shingles.append(shingles(normalize.normalize_text(user)))

    def new_message(
        self,
        intent: Intent,
        rng: random.Random,
        book: Phrasebook = TRAIN_BOOK,
        *,
        long: bool = False,
        short: bool = False,
    ) -> str:
        """A fresh message for `intent` that no kept record and no eval example comes close to."""
        for _ in range(2000):
            user = compose_message(intent, rng, book, long=long, short=short)
            if self.admits(intent, user, against_eval=not book.held_out):
                self.claim(intent, user)
                return user
        raise RuntimeError(f"no distinct message left for {intent.name}: add phrases to its templates")


# --------------------------------------------------------------------------------------------------
# The eval sets.


def make_eval_set(
    rng: random.Random, registry: PromptRegistry, book: Phrasebook = EVAL_BOOK
) -> list[tuple[Intent, str]]:
    """`stream.eval_examples` held-out tickets over every intent. With EVAL_BOOK they are what a team
    holds out of its ticket stream: the intents' usual sentences with fresh values, framed by
    greetings, contexts and sign-offs no training message uses, and far from every training message.
    With PARAPHRASE_BOOK they say the same things in sentences training never shows (a stress test of
    language knowledge)."""
    examples = []
    for index in range(STREAM.eval_examples):
        intent = INTENTS[index % len(INTENTS)]
        user = registry.new_message(intent, rng, book)
        registry.add_eval(user)
        examples.append((intent, user))
    return examples
