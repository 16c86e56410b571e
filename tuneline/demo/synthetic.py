"""Synthetic support-style chat lines with a little dirt, fast, for the data-plane benchmark
(benchmarks/data_plane.py): any number of lines, deterministic for a seed, drawn from the demo's
content (content/support.yaml) but not checked like the demo data.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from tuneline.demo.content import INTENTS, SUPPORT, SYSTEM_PROMPT, TRAIN_BOOK


def _json_fragment(text: str) -> str:
    """`text` as it stands between the quotes of a JSON string."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


SYNTHETIC_SLOTS = ("order", "product", "amount", "date", "platform", "version")


def synthetic_chat_lines(n: int, seed: int = 0, dirt_fraction: float = 0.05) -> Iterator[str]:
    """n JSONL chat lines (each ending in a newline) in the support style, deterministic for a seed.

    About `dirt_fraction` of them are dirt, in equal parts: exact duplicates of a recent line,
    near-duplicates (a recent line with one word, the sign-off name, changed), malformed JSON (a line
    cut short) and format errors (an unknown role, no assistant turn, or empty content). Clean lines
    draw every part of the message independently, so two of them are rarely near each other. The
    random draws are vectorised, slot values come from tables and the JSON is assembled from
    pre-escaped pieces: a million lines take seconds.
    """
    rng = np.random.default_rng(seed)
    prefix = (
        '{"messages": [{"role": "system", "content": '
        + json.dumps(SYSTEM_PROMPT)
        + '}, {"role": "user", "content": "'
    )
    suffixes = [
        '"}, {"role": "assistant", "content": ' + json.dumps(i.answer, ensure_ascii=False) + "}]}\n"
        for i in INTENTS
    ]
    # Every core sentence with every detail, its {slots} made positional for one str.format call.
    positional = {name: f"{{{k}}}" for k, name in enumerate(SYNTHETIC_SLOTS)}
    bodies = [
        [_json_fragment(f"{c} {d}").format_map(positional) for c in i.train for d in i.details]
        for i in INTENTS
    ]
    greetings, contexts, asks, signoffs, names, products = (
        [_json_fragment(t) for t in texts]
        for texts in (
            TRAIN_BOOK.greetings,
            TRAIN_BOOK.contexts,
            TRAIN_BOOK.asks,
            TRAIN_BOOK.signoffs,
            SUPPORT.names,
            SUPPORT.products,
        )
    )
    tables = (
        [f"#{k}" for k in range(10000, 100000)],
        products,
        [f"${d}.{c:02d}" for d in range(12, 480) for c in range(100)],
        [f"Oct {d}" for d in range(1, 32)],
        list(SUPPORT.platforms),
        [f"{a}.{b}.{c}" for a in range(3, 6) for b in range(13) for c in range(10)],
    )
    orders, _, amounts, dates, platforms, versions = tables
    sizes = [
        len(bodies[0]),
        len(greetings),
        len(contexts),
        len(contexts),
        len(asks),
        len(products),
        len(dates),
    ]
    sizes += [len(signoffs), len(names), *(len(t) for t in tables), 4, 1 << 30, len(names) - 1]
    history: list[
        tuple[str, str, int, int]
    ] = []  # recent clean lines: (line, message before the name, intent, name)
    remaining = n
    while remaining > 0:
        # Whole chunks whatever n is, so that the first k lines are the same for every n >= k.
        size = 65536
        intents = rng.integers(0, len(INTENTS), size).tolist()
        dirty = (rng.random(size) < dirt_fraction).tolist()
        columns = [rng.integers(0, k, size).tolist() for k in sizes]
        for intent, is_dirty, draw in zip(
            intents[:remaining], dirty, zip(*columns, strict=True), strict=False
        ):
            (body, greet, ctx1, ctx2, ask, ps_product, ps_date, signoff, name,
             order, product, amount, date, platform, version, dirt, pick, rename) = draw  # fmt: skip
            if is_dirty and history and dirt < 2:
                line, stem, old_intent, old_name = history[pick % len(history)]
                if dirt == 0:  # an exact duplicate
                    yield line
                else:  # a near-duplicate: the same message signed with another name
                    yield prefix + stem + names[(old_name + 1 + rename) % len(names)] + suffixes[old_intent]
                continue
            text = bodies[intent][body].format(
                orders[order],
                products[product],
                amounts[amount],
                dates[date],
                platforms[platform],
                versions[version],
            )
            stem = (
                f"{greetings[greet]} {text} {contexts[ctx1]} {contexts[ctx2]} {asks[ask]} P.S. The "
                f"{products[ps_product]} I got on {dates[ps_date]} is great. {signoffs[signoff]}, "
            )
            user = stem + names[name]
            if not is_dirty:
                line = prefix + user + suffixes[intent]
                if len(history) < 4096:
                    history.append((line, stem, intent, name))
                else:
                    history[pick % 4096] = (line, stem, intent, name)
                yield line
            elif dirt == 2:  # malformed JSON: the line cut short
                line = prefix + user + suffixes[intent]
                yield line[: len(line) // 2] + "\n"
            elif pick % 3 == 0:  # format errors
                yield prefix.replace('"role": "user"', '"role": "customer"') + user + suffixes[intent]
            elif pick % 3 == 1:
                yield prefix + user + '"}]}\n'
            else:
                yield prefix + user + '"}, {"role": "assistant", "content": ""}]}\n'
        remaining -= size
