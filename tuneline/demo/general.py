"""The canary set and the general corpus, from content/general.yaml.

The canary set asks general questions with short fixed answers (no system prompt), to detect
forgetting. The general corpus holds every canary fact in five phrasings (the canary question among
them), more facts, arithmetic and small talk: the server's built-in tiny model is pretrained on it, and
export mixes some of it into training.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from tuneline import normalize
from tuneline.demo.content import GENERAL, ArithmeticFacts, FamilyFacts

OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
}
CAPITAL_PHRASES = GENERAL.phrasings["capital"]
OPPOSITE_PHRASES = GENERAL.phrasings["opposite"]


def _family(phrases: Sequence[str], facts: Sequence[tuple[str, str]]) -> list[tuple[str, str, list[str]]]:
    return [(phrases[0].format(x=x), answer, [p.format(x=x) for p in phrases[1:]]) for x, answer in facts]


def _arithmetic(a: int, op: str, b: int) -> tuple[str, str, list[str]]:
    phrases = [p.format(a=a, op=op, b=b) for p in GENERAL.phrasings["arithmetic"]]
    return phrases[0], f"{OPERATIONS[op](a, b)}.", phrases[1:]


def _canary_facts() -> list[tuple[str, str, list[str]]]:
    facts: list[tuple[str, str, list[str]]] = []
    for group in GENERAL.canary:
        if isinstance(group, FamilyFacts):
            facts.extend(_family(GENERAL.phrasings[group.family], group.facts))
        elif isinstance(group, ArithmeticFacts):
            facts.extend(_arithmetic(a, op, b) for a, op, b in group.arithmetic)
        else:
            facts.extend((w.question, w.answer, list(w.paraphrases)) for w in group.written)
    return facts


# (canary question, fixed answer, paraphrases); the canary question is the first phrasing.
CANARY_FACTS = _canary_facts()


def general_corpus(rng: random.Random) -> list[dict[str, Any]]:
    """Chat examples (no system prompt): every canary fact in five phrasings, more facts, small talk."""
    pairs: list[tuple[str, str]] = []
    for question, answer, paraphrases in CANARY_FACTS:
        pairs.extend((q, answer) for q in [question, *paraphrases])
    for country, city in GENERAL.more_capitals:
        pairs.extend((p.format(x=country), city) for p in rng.sample(CAPITAL_PHRASES, 2))
    for word, opposite in GENERAL.more_opposites:
        pairs.extend((p.format(x=word), opposite) for p in rng.sample(OPPOSITE_PHRASES, 2))
    for fact in GENERAL.more_facts:
        pairs.extend((q, fact.answer) for q in fact.questions)
    for talk in GENERAL.small_talk:
        pairs.extend((p, talk.answer) for p in talk.phrasings)
    asked = {normalize.normalize_text(q) for q, _ in pairs}
    arithmetic = 0
    while arithmetic < 60:
        a, b, op = rng.randint(1, 12), rng.randint(1, 12), rng.choice(tuple(OPERATIONS))
        if op == "minus" and b > a:
            a, b = b, a
        first, answer, others = _arithmetic(a, op, b)
        if any(normalize.normalize_text(q) in asked for q in [first, *others]):
            continue  # a canary sum, or one asked already
        question = rng.choice([first, *others])
        asked.add(normalize.normalize_text(question))
        pairs.append((question, answer))
        arithmetic += 1
    examples = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]
    # A few two-turn chats: small talk, then a question.
    openers = [(p, talk.answer) for talk in GENERAL.small_talk[:2] for p in talk.phrasings]
    for country, city in GENERAL.more_capitals:
        opener, reply = rng.choice(openers)
        question = CAPITAL_PHRASES[0].format(x=country)
        examples.append(
            {
                "messages": [
                    {"role": "user", "content": opener},
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": city},
                ]
            }
        )
    rng.shuffle(examples)
    return examples


def canary_set() -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a, _ in CANARY_FACTS
    ]
