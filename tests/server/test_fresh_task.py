"""The built-in model learns a task it was never pretrained for, with "auto" hyperparameters, as a new
user would ask for it: the unmodified `openai` SDK against a real `tuneline serve`, on a generated
4-label routing task (a building's maintenance requests -> the team; one keyword decides the label;
no overlap with the demo's support domain), judged on its training rows and on held-out rows."""

from __future__ import annotations

import io
import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tuneline.server.builtin import builtin_auto_rules
from tuneline.server.catalog import MODEL_CARD
from tuneline.server.hyperparameters import AutoRules, Hyperparameters, auto_rules, resolve_hyperparameters

SYSTEM = "Route the tenant's maintenance request to one team: plumbing, electrical, heating or locks."
KEYWORDS = {
    "plumbing": ["leak", "drain", "faucet", "toilet", "pipe", "sink"],
    "electrical": ["fuse", "socket", "breaker", "wiring", "outlet", "light switch"],
    "heating": ["radiator", "boiler", "thermostat", "furnace", "heater", "vent"],
    "locks": ["deadbolt", "lock", "door key", "keycard", "latch", "padlock"],
}
# Real traffic is skewed: answering the most frequent label is right 40% of the time, not 95%.
LABEL_WEIGHTS = {"plumbing": 4, "electrical": 3, "heating": 2, "locks": 1}
PLACES = ["kitchen", "bathroom", "hallway", "bedroom", "basement", "living room", "garage", "laundry room"]
TEMPLATES = [
    "The {kw} in the {place} is broken.",
    "Hi, our {kw} stopped working this morning.",
    "Can someone look at the {kw} in flat {n}?",
    "There is a problem with the {kw} near the {place}.",
    "Unit {n}: the {kw} is acting up again.",
    "Please send help, the {place} {kw} makes a strange noise.",
    "Since yesterday the {kw} in my {place} does nothing.",
    "Quick one: {kw} trouble in apartment {n}.",
    "Hello, is anyone free to fix a {kw} today?",
    "My {kw} has been faulty for a week, flat {n}.",
]


def routing_task(
    n_train: int, n_held_out: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, held-out rows) of the routing task: distinct messages, seeded."""
    rng = random.Random(seed)
    labels = list(LABEL_WEIGHTS)
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    while len(rows) < n_train + n_held_out:
        label = rng.choices(labels, [LABEL_WEIGHTS[name] for name in labels])[0]
        message = rng.choice(TEMPLATES).format(
            kw=rng.choice(KEYWORDS[label]), place=rng.choice(PLACES), n=rng.randint(1, 99)
        )
        if message in seen:
            continue
        seen.add(message)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": message},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    return rows[:n_train], rows[n_train:]


def test_the_routing_task_is_what_it_claims() -> None:
    train, held_out = routing_task(120, 40, seed=7)
    assert routing_task(120, 40, seed=7) == (train, held_out)
    messages = [row["messages"][1]["content"] for row in train + held_out]
    assert len(set(messages)) == len(messages) == 160
    for row in train + held_out:
        label = row["messages"][2]["content"]
        text = row["messages"][1]["content"]
        assert [name for name, words in KEYWORDS.items() if any(w in text for w in words)] == [label]
    counts = Counter(row["messages"][2]["content"] for row in train)
    assert set(counts) == set(KEYWORDS) and max(counts.values()) / len(train) < 0.5


def test_auto_hyperparameters_follow_the_base_model_s_card(builtin_model: Path) -> None:
    rules = auto_rules(builtin_model)
    assert rules == builtin_auto_rules() == AutoRules(learning_rate_batch_size=4, min_examples_seen=1000)
    card = json.loads((builtin_model / MODEL_CARD).read_text())
    assert (card["learning_rate"], card["learning_rate_batch_size"], card["min_examples_seen"]) == (
        2e-3,
        4,
        1000,
    )
    # Few examples: epochs until the job shows the model 1000 examples (at most 25), batch 1, a quarter
    # of the base rate; the demo's ~1000 examples: the hosted 3 epochs, batch 4, the base rate.
    assert resolve_hyperparameters(120, "auto", "auto", "auto", rules) == Hyperparameters(8, 1, 0.25)
    assert resolve_hyperparameters(30, "auto", "auto", "auto", rules) == Hyperparameters(25, 1, 0.25)
    assert resolve_hyperparameters(500, "auto", "auto", "auto", rules) == Hyperparameters(3, 2, 0.5)
    assert resolve_hyperparameters(1076, 5, "auto", "auto", rules) == Hyperparameters(5, 4, 1.0)
    assert resolve_hyperparameters(6400, "auto", "auto", "auto", rules) == Hyperparameters(3, 32, 1.0)
    # Explicit values are kept; an explicit batch still scales an "auto" rate.
    assert resolve_hyperparameters(120, 2, 2, "auto", rules) == Hyperparameters(2, 2, 0.5)
    assert resolve_hyperparameters(120, "auto", 1, 3.0, rules) == Hyperparameters(8, 1, 3.0)
    # A checkpoint without a card: the hosted rules, its base rate at every batch size.
    assert auto_rules(builtin_model.parent) == AutoRules()
    assert resolve_hyperparameters(120, "auto", "auto", "auto") == Hyperparameters(3, 1, 1.0)


def answers(client: Any, model: str, rows: list[dict[str, Any]]) -> list[str]:
    def ask(row: dict[str, Any]) -> str:
        reply = client.chat.completions.create(
            model=model, messages=row["messages"][:-1], temperature=0, max_tokens=8
        )
        return (reply.choices[0].message.content or "").strip()

    with ThreadPoolExecutor(max_workers=16) as pool:  # the server decodes them as one batch
        return list(pool.map(ask, rows))


def accuracy(client: Any, model: str, rows: list[dict[str, Any]]) -> float:
    expected = [row["messages"][-1]["content"] for row in rows]
    return sum(a == e for a, e in zip(answers(client, model, rows), expected, strict=True)) / len(rows)


def test_tuneline_tiny_learns_a_fresh_labelling_task_with_auto_hyperparameters(
    client: Any, wait_for: Any
) -> None:
    train, held_out = routing_task(120, 40, seed=7)
    upload = client.files.create(
        file=("routing.jsonl", io.BytesIO("".join(json.dumps(r) + "\n" for r in train).encode())),
        purpose="fine-tune",
    )
    started = time.monotonic()
    job = client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=upload.id, seed=42)

    def finished() -> Any:
        current = client.fine_tuning.jobs.retrieve(job.id)
        return current if current.status in {"succeeded", "failed", "cancelled"} else None

    done = wait_for(finished, timeout_s=300, what=f"{job.id} to finish")
    seconds = time.monotonic() - started
    assert done.status == "succeeded", done.error
    # "auto" as tuneline-tiny's model card states it: epochs until the job shows the model 1000
    # examples (1000 // 120 = 8), batch 1 below 400 examples, the base rate scaled from batch 4 to 1.
    hyperparameters = done.method.supervised.hyperparameters
    assert (hyperparameters.n_epochs, hyperparameters.batch_size) == (8, 1)
    assert hyperparameters.learning_rate_multiplier == 0.25
    assert seconds < 120, f"training took {seconds:.0f} s"

    on_training_rows = accuracy(client, done.fine_tuned_model, train)
    on_held_out_rows = accuracy(client, done.fine_tuned_model, held_out)
    assert on_training_rows >= 0.95 and on_held_out_rows >= 0.8, (
        f"training rows {on_training_rows:.2f}, held out {on_held_out_rows:.2f}, {seconds:.0f} s"
    )
