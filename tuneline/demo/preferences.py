"""Preference (DPO) and reinforcement partitions of the demo data: `tuneline demo-data --preferences`
writes `raw/support_preferences/dt=YYYY-MM-DD/part-0000.jsonl` and `raw/support_prompts/dt=.../`
beside the support partitions (the default data/ is unchanged without the option, so `make demo`
decides as before).

Reinforcement prompts: each clean chat ticket's input, with the grader fields `category` (the intent,
`billing/refund`) and `reference_answer` (the house answer), for a grader such as
`{type: string_check, input: '{{sample.output_text}}', reference: '{{item.reference_answer}}', operation: eq}`.

Each clean chat ticket of a support partition becomes a preference line: its input (system prompt and
the customer's message), the house answer of its intent as the preferred output, and, as the
non-preferred output, a plausible wrong one: the house answer of another intent, from the same
category when there is one (the mistake a half-trained model makes), chosen by a seeded generator.
A little dirt the preference rules exist for is planted on each day, and listed in PLANTED:
the same input and preferred answer again with another wrong answer (`exact_duplicate`), and a pair
with its two answers swapped (`contradiction`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from typing import Any

from tuneline.demo.content import INTENTS, SYSTEM_PROMPT
from tuneline.demo.planting import DemoRecord, to_line

PREFERENCES_DIR = "raw/support_preferences"
PROMPTS_DIR = "raw/support_prompts"
# Planted per day, with the reason the data plane gives them.
PLANTED = {"duplicate": "exact_duplicate", "swapped": "contradiction"}


def _wrong_answer(answer: str, rng: random.Random) -> str:
    intent = next(i for i in INTENTS if i.answer == answer)
    same_category = [i for i in INTENTS if i.category == intent.category and i.name != intent.name]
    others = same_category or [i for i in INTENTS if i.name != intent.name]
    return rng.choice(others).answer


def preference_line(user: str, preferred: str, non_preferred: str) -> dict[str, Any]:
    return {
        "input": {
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
        },
        "preferred_output": [{"role": "assistant", "content": preferred}],
        "non_preferred_output": [{"role": "assistant", "content": non_preferred}],
    }


def preference_files(records: Iterable[DemoRecord], seed: int) -> dict[str, bytes]:
    """The preference partition files (path relative to the data folder -> bytes) made from the kept
    chat records of the support partitions."""
    rng = random.Random(f"{seed}/preferences")
    answers = {i.answer for i in INTENTS}
    by_day: dict[str, list[dict[str, Any]]] = {}
    prompts: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.reason is not None or record.raw is None or not record.path.endswith("part-0000.jsonl"):
            continue
        example = json.loads(record.raw)
        messages = example.get("messages") or []
        turns = [m for m in messages if m.get("role") != "system"]
        if [m.get("role") for m in turns] != ["user", "assistant"] or turns[1]["content"] not in answers:
            continue
        user, answer = turns[0]["content"], turns[1]["content"]
        by_day.setdefault(record.partition, []).append(
            preference_line(user, answer, _wrong_answer(answer, rng))
        )
        intent = next(i for i in INTENTS if i.answer == answer)
        prompts.setdefault(record.partition, []).append(
            {
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}],
                "category": intent.name,
                "reference_answer": answer,
            }
        )
    files: dict[str, bytes] = {
        f"{PROMPTS_DIR}/dt={day}/part-0000.jsonl": b"".join(to_line(line) + b"\n" for line in lines)
        for day, lines in sorted(prompts.items())
    }
    for day, lines in sorted(by_day.items()):
        if len(lines) >= 2:
            first, second = lines[0], lines[1]
            good = first["preferred_output"][0]["content"]
            others = [
                i.answer
                for i in INTENTS
                if i.answer not in (good, first["non_preferred_output"][0]["content"])
            ]
            duplicate = preference_line(first["input"]["messages"][1]["content"], good, rng.choice(others))
            swapped = {
                **second,
                "preferred_output": second["non_preferred_output"],
                "non_preferred_output": second["preferred_output"],
            }
            lines = [*lines, duplicate, swapped]
        files[f"{PREFERENCES_DIR}/dt={day}/part-0000.jsonl"] = b"".join(
            to_line(line) + b"\n" for line in lines
        )
    return files
