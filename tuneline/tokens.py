"""Exact token counts, context limits and the training cost estimate.

The tokenizer vocabularies come from an installed package (bpe-openai ships the .tiktoken files),
verified against the sha256 that tiktoken itself pins, and are placed in tiktoken's cache so that
tiktoken never reaches the network. Counting follows the OpenAI cookbook: 3 tokens per message plus
the tokens of every value (+1 for `name`), plus 3 per example.

Counts come from the same package's Rust tokenizer (GitHub's `bpe` crate: `count` gives the length
of tiktoken's `encode_ordinary` without building the token list), which counts a chat turn in about
60% of tiktoken's time (5.9 against 9.7 us a distinct text of the synthetic chats; 17 times less for
100,000 letters without a space, a piece tiktoken's merge loop is slow on). tiktoken stays the
reference: a counter is used only after it gives tiktoken's counts on a probe of scripts, digits,
contractions, whitespace runs and emoji (`_fast_counter`; the counts are pinned here, and a test
checks them against tiktoken), and tiktoken counts the texts the Rust side refuses (those with
unpaired surrogates, which tiktoken replaces). So a process that only counts (a block's task) never
loads tiktoken's encoding, which takes 0.8 s and 71 MB a process (the Rust one: 0.05 s and 63 MB):
`Vocabulary` names a vocabulary and loads tiktoken's encoding the first time it is asked for.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

try:  # the package's Rust bindings (with the .pyi types it ships): its tiktoken-like API has no count
    from bpe_openai import _bindings as bpe_bindings
except ImportError:  # bindings missing or moved: tiktoken counts
    bpe_bindings = None  # type: ignore[assignment]

from tuneline.paths import project_root

# name -> (URL tiktoken would download, sha256 tiktoken pins for it)
VOCABULARIES: dict[str, tuple[str, str]] = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_EXAMPLE = 3


class TokenizerUnavailable(RuntimeError):
    pass


def encoding_name_for_model(model: str, configured: str = "auto") -> str:
    """o200k_base for the 4o/4.1/o-series families, cl100k_base for 3.5, davinci and babbage."""
    if configured != "auto":
        return configured
    base = model.removeprefix("ft:").split(":")[0]
    if base.startswith(("gpt-3.5", "gpt-4-", "davinci", "babbage")) or base == "gpt-4":
        return "cl100k_base"
    return "o200k_base"


def _cache_dir() -> Path:
    return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or project_root() / ".tuneline" / "tiktoken")


@cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken encoding whose vocabulary came from disk, checked against its pinned hash."""
    if name not in VOCABULARIES:
        raise TokenizerUnavailable(f"unknown tokenizer {name!r} (use one of {sorted(VOCABULARIES)})")
    url, expected = VOCABULARIES[name]
    cache_dir = _cache_dir()
    cached = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    if not (cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == expected):
        try:
            packed = resources.files("bpe_openai.data").joinpath(f"{name}.tiktoken.gz").read_bytes()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise TokenizerUnavailable(
                f"the {name} vocabulary is not installed (pip install bpe-openai): {exc}"
            ) from None
        data = gzip.decompress(packed)
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise TokenizerUnavailable(
                f"the installed {name} vocabulary has sha256 {digest}, expected {expected}"
            )
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(cached)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)  # tiktoken re-checks the hash when it reads it
    return tiktoken.get_encoding(name)


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _example_pieces(example: Mapping[str, Any]) -> tuple[list[str], int]:
    """The strings whose tokens count, and the fixed overhead of the example, as the cookbook counts."""
    if "messages" in example:
        messages = list(example["messages"])
    elif "input" in example:
        messages = [
            *example["input"]["messages"],
            *example["preferred_output"],
            *example["non_preferred_output"],
        ]
    else:
        return [str(example.get("prompt", "")), str(example.get("completion", ""))], 0
    pieces: list[str] = []
    overhead = TOKENS_PER_EXAMPLE
    for message in messages:
        overhead += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "weight" or value is None:
                continue
            pieces.append(_value_text(value))
            if key == "name":
                overhead += TOKENS_PER_NAME
    if example.get("tools"):
        pieces.append(_value_text(example["tools"]))
    return pieces, overhead


def count_tokens(
    examples: Sequence[Mapping[str, Any]],
    encoding: tiktoken.Encoding | Vocabulary,
    known: dict[str, int] | None = None,
) -> list[int]:
    """Exact token count of each example. `known`: token counts of texts already counted (see
    token_lengths), shared with count_assistant_tokens."""
    texts: list[str] = []
    pieces_per_example: list[int] = []
    totals: list[int] = []
    for example in examples:
        pieces, overhead = _example_pieces(example)
        texts.extend(pieces)
        pieces_per_example.append(len(pieces))
        totals.append(overhead)
    return _sums(token_lengths(texts, encoding, known), pieces_per_example, totals)


def _sums(lengths: Sequence[int], counts: Sequence[int], start: Sequence[int]) -> list[int]:
    """start[i] + the sum of example i's lengths (counts[i] of them, examples in order)."""
    owners = np.repeat(np.arange(len(counts)), np.asarray(counts, dtype=np.int64))
    sums = np.bincount(owners, weights=np.asarray(lengths, dtype=np.float64), minlength=len(counts))
    return (sums.astype(np.int64) + np.asarray(start, dtype=np.int64)).tolist()  # exact below 2**53


def token_lengths(
    texts: Sequence[str], encoding: tiktoken.Encoding | Vocabulary, known: dict[str, int] | None = None
) -> list[int]:
    """The token count of each text. Each distinct text is counted once (roles, system prompts and
    templated replies recur in most examples). `known` (text -> count) is read, and extended with the
    texts counted here."""
    known = {} if known is None else known
    count = text_counter(encoding)
    for text in dict.fromkeys(texts):
        if text not in known:
            known[text] = count(text)
    return [known[text] for text in texts]


@dataclass(frozen=True)
class Vocabulary:
    """A vocabulary by name (see VOCABULARIES): what count_tokens needs, with tiktoken's encoding
    loaded only when something asks for it (encoding and decoding: validate's truncation)."""

    name: str

    @property
    def encoding(self) -> tiktoken.Encoding:
        return get_encoding(self.name)


def text_counter(vocabulary: tiktoken.Encoding | Vocabulary) -> Callable[[str], int]:
    """len(encode_ordinary(text)) in `vocabulary`, by the Rust counter where it agrees with
    tiktoken."""
    fast = _fast_counter(vocabulary.name)

    def by_tiktoken(text: str) -> int:
        encoding = vocabulary if isinstance(vocabulary, tiktoken.Encoding) else vocabulary.encoding
        return len(encoding.encode_ordinary(text))

    if fast is None:
        return by_tiktoken

    def count(text: str) -> int:
        try:
            return fast(text)
        except UnicodeEncodeError:  # unpaired surrogates: tiktoken replaces them, as it encodes
            return by_tiktoken(text)

    return count


# Texts on which a counter must give tiktoken's counts before it counts in its place (ASCII prose,
# contractions, digits, whitespace runs, CJK, Arabic, Cyrillic, combining marks, emoji sequences), and
# those counts in each vocabulary (tests/tuneline/test_tokens.py checks them against tiktoken).
_PROBE = (
    "Hello Acme, I get error 403 every time I try to log in. I'm on version 4.1.2!",
    "  we'll  see\n\n\tthey've   DONE it's 1234567890 $3.14 http://x.y/z?q=1&r=2  ",
    "你好，世界。こんにちは 한국어 Привет мир مرحبا שלום e\u0301te\u0301 ﬁ Ⅻ",
    "👨‍👩‍👧 👍🏽 🇩🇪 <|endoftext|> \x00\x7f\u200b\ufeff" + "x" * 300,
)
PROBE_COUNTS = {"o200k_base": (27, 32, 21, 65), "cl100k_base": (28, 34, 35, 73)}


@cache
def _fast_counter(name: str) -> Callable[[str], int] | None:
    """The Rust tokenizer's count for the vocabulary `name`, or None where it is not installed or
    does not give PROBE_COUNTS[name]."""
    if name not in PROBE_COUNTS or bpe_bindings is None:
        return None
    try:
        count: Callable[[str], int] = bpe_bindings.tokenizer_for_encoding(name).count
    except (ValueError, RuntimeError, KeyError, AttributeError):
        return None
    return count if counter_agrees(count, PROBE_COUNTS[name]) else None


def counter_agrees(count: Callable[[str], int], expected: Sequence[int]) -> bool:
    """Whether `count` gives the `expected` count of every probe text."""
    return tuple(count(text) for text in _PROBE) == tuple(expected)


def count_assistant_tokens(
    examples: Sequence[Mapping[str, Any]],
    encoding: tiktoken.Encoding | Vocabulary,
    known: dict[str, int] | None = None,
) -> list[int]:
    """Tokens the model is trained on: assistant turns whose weight is not 0 (chat), the completion
    (legacy prompt/completion), both outputs (preference). `known`: as for count_tokens."""
    texts: list[str] = []
    pieces_per_example: list[int] = []
    for example in examples:
        before = len(texts)
        if "messages" in example:
            trained = example["messages"]
        elif "input" in example:
            trained = [*(example.get("preferred_output") or ()), *(example.get("non_preferred_output") or ())]
        else:
            texts.append(str(example.get("completion", "")))
            pieces_per_example.append(1)
            continue
        for message in trained:
            if message.get("role") == "assistant" and message.get("weight", 1) != 0:
                for key in ("content", "tool_calls"):
                    if message.get(key) is not None:
                        texts.append(_value_text(message[key]))
        pieces_per_example.append(len(texts) - before)
    return _sums(token_lengths(texts, encoding, known), pieces_per_example, [0] * len(examples))


def default_epochs(n_examples: int, min_examples_seen: int = 100) -> int:
    """The hosted service's "auto" epoch rule (cookbook): 3, raised for tiny sets (until the job shows
    the model `min_examples_seen` examples, 100 there, at most 25 epochs), lowered for huge ones."""
    epochs = 3
    if n_examples == 0:
        return epochs
    if n_examples * epochs < min_examples_seen:
        return min(25, min_examples_seen // n_examples)
    if n_examples * epochs > 25000:
        return max(1, 25000 // n_examples)
    return epochs


def context_limit(model: str, limits: Mapping[str, int], default: int) -> int:
    """The training context of a model: the longest configured family name the model id starts with."""
    base = model.removeprefix("ft:").split(":")[0]
    matches = [name for name in limits if base == name or base.startswith(name + "-")]
    return limits[max(matches, key=len)] if matches else default


def price_per_1m(model: str, prices: Mapping[str, float]) -> float | None:
    base = model.removeprefix("ft:").split(":")[0]
    matches = [name for name in prices if base == name or base.startswith(name + "-")]
    return prices[max(matches, key=len)] if matches else None


@dataclass(frozen=True)
class CostEstimate:
    model: str
    n_examples: int
    n_epochs: int
    billed_tokens_per_epoch: int
    billed_tokens: int
    price_per_1m_tokens: float | None
    prices_as_of: str
    estimated_cost_usd: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def estimate_cost(
    token_counts: Sequence[int],
    *,
    model: str,
    limit: int,
    prices: Mapping[str, float],
    prices_as_of: str,
    n_epochs: int | str = "auto",
) -> CostEstimate:
    """Billed tokens = epochs x sum(min(limit, tokens per example)); validation tokens are free."""
    epochs = default_epochs(len(token_counts)) if n_epochs == "auto" else int(n_epochs)
    per_epoch = (
        int(np.minimum(np.asarray(token_counts, dtype=np.int64), limit).sum()) if len(token_counts) else 0
    )
    price = price_per_1m(model, prices)
    billed = epochs * per_epoch
    cost = None if price is None else round(billed * price / 1_000_000, 6)
    return CostEstimate(model, len(token_counts), epochs, per_epoch, billed, price, prices_as_of, cost)
