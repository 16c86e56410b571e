from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tuneline import tokens

ENCODING = tokens.get_encoding("o200k_base")


def n(text: str) -> int:
    return len(ENCODING.encode_ordinary(text))


def test_vocabulary_is_installed_offline_and_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    tokens.get_encoding.cache_clear()
    try:
        url, expected = tokens.VOCABULARIES["cl100k_base"]
        cached = tmp_path / hashlib.sha1(url.encode()).hexdigest()
        cached.write_bytes(b"tampered")  # a bad cache file is replaced by the verified vocabulary
        encoding = tokens.get_encoding("cl100k_base")
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == expected
        assert encoding.decode(encoding.encode_ordinary("refund my order")) == "refund my order"
    finally:
        tokens.get_encoding.cache_clear()
    with pytest.raises(tokens.TokenizerUnavailable, match="unknown tokenizer"):
        tokens.get_encoding("p50k_base")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4.1-nano-2025-04-14", "o200k_base"),
        ("ft:gpt-4.1-mini:acme:support:abc", "o200k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("davinci-002", "cl100k_base"),
        ("babbage-002", "cl100k_base"),
        ("gpt-4", "cl100k_base"),
        ("tuneline-tiny", "o200k_base"),
    ],
)
def test_encoding_by_model(model: str, expected: str) -> None:
    assert tokens.encoding_name_for_model(model) == expected
    assert tokens.encoding_name_for_model(model, "cl100k_base") == "cl100k_base"


def test_count_follows_the_cookbook() -> None:
    example = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is my parcel?", "name": "ana"},
            {"role": "assistant", "content": "Shipping: today.", "weight": 1},
        ]
    }
    expected = 3  # per example
    expected += 3 + n("system") + n("Be brief.")
    expected += 3 + n("user") + n("Where is my parcel?") + n("ana") + 1  # name costs one more
    expected += 3 + n("assistant") + n("Shipping: today.")  # weight is not text
    legacy = {"prompt": "Where?", "completion": "Here."}
    assert tokens.count_tokens([example, legacy], ENCODING) == [expected, n("Where?") + n("Here.")]


def test_tools_and_tool_calls_are_counted() -> None:
    call = [{"id": "c1", "type": "function", "function": {"name": "track", "arguments": "{}"}}]
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    with_call = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": call}],
        "tools": [{"type": "function", "function": {"name": "track"}}],
    }
    plain_count, call_count = tokens.count_tokens([plain, with_call], ENCODING)
    assert call_count > plain_count


def test_assistant_tokens_are_what_is_trained_on() -> None:
    example = {
        "messages": [
            {"role": "user", "content": "a b c"},
            {"role": "assistant", "content": "first answer", "weight": 0},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "second answer"},
        ]
    }
    legacy = {"prompt": "a long prompt here", "completion": "short"}
    preference = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad one"}],
    }
    assert tokens.count_assistant_tokens([example, legacy, preference], ENCODING) == [
        n("second answer"),
        n("short"),
        n("good") + n("bad one"),
    ]


def test_counts_shared_between_calls_are_the_same_counts() -> None:
    examples = [
        {
            "messages": [
                {"role": "user", "content": f"order {i} is late"},
                {"role": "assistant", "content": "Sorry!"},
            ]
        }
        for i in range(30)
    ] + [{"messages": []}, {"prompt": "Where?", "completion": "Here."}]
    known: dict[str, int] = {}
    counts = tokens.count_tokens(examples, ENCODING, known)
    assert known["Sorry!"] == n("Sorry!") and known["order 7 is late"] == n("order 7 is late")
    assert counts == tokens.count_tokens(examples, ENCODING)
    assistant = tokens.count_assistant_tokens(examples, ENCODING, known)
    assert (
        assistant == tokens.count_assistant_tokens(examples, ENCODING) == [n("Sorry!")] * 30 + [0, n("Here.")]
    )
    assert counts[30] == tokens.TOKENS_PER_EXAMPLE  # no messages: the example's overhead alone
    assert tokens.count_tokens([], ENCODING, known) == [] == tokens.count_assistant_tokens([], ENCODING)


# Pieces the fuzzed texts are made of: what tiktoken's pre-tokenizer splits on (letters of several
# scripts and cases, digits, contractions, punctuation, whitespace runs, marks, emoji, controls).
_PIECES = [
    *"abcXYZ019 \t\n\r.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
    *["'s", "'T", "'re", "'ve", "'M", "'ll", "'d", "\u2019s", "\u00a0", "\u200b", "\u3000", "\ufeff"],
    *["\u00e9", "\u00df", "\u01c5", "\u0130", "\ufb01", "\u216b", "\u0661\u0662", "\u0301", "\U0010ffff"],
    *[
        "\u4f60\u597d",
        "\u3053\u3093\u306b\u3061\u306f",
        "\ud55c\uad6d\uc5b4",
        "\u041f\u0440\u0438",
        "\u05e9\u05dc\u05d5\u05dd",
        "\u0645\u0631\u062d\u0628\u0627",
    ],
    *[
        "\U0001f600",
        "\U0001f44d\U0001f3fd",
        "\U0001f468\u200d\U0001f469\u200d\U0001f467",
        "\U0001f1e9\U0001f1ea",
    ],
    *["\x00", "\x7f", "<|endoftext|>", "   ", "\n\n", "1234567", "3.14", "http://x.y/z?q=1"],
]


@pytest.mark.parametrize("name", sorted(tokens.VOCABULARIES))
def test_counts_are_tiktokens_on_any_text(name: str) -> None:
    """The Rust counter token_lengths uses gives tiktoken's encode_ordinary length on fuzzed text of
    every script, on long pieces, and (through tiktoken) on text with unpaired surrogates."""
    encoding = tokens.get_encoding(name)
    assert tokens._fast_counter(name) is not None  # the fast route is the one under test
    rng = random.Random(20)
    texts = ["".join(rng.choices(_PIECES, k=rng.randint(0, 40))) for _ in range(3000)]
    texts += ["x" * 20000, "word " * 5000, "\ud800 lone surrogate", "ends \udfff", ""]
    assert tokens.token_lengths(texts, encoding) == [len(encoding.encode_ordinary(t)) for t in texts]


@pytest.mark.parametrize("name", sorted(tokens.VOCABULARIES))
def test_a_counter_is_used_only_where_it_gives_tiktokens_probe_counts(name: str) -> None:
    encoding = tokens.get_encoding(name)
    expected = tokens.PROBE_COUNTS[name]
    assert tuple(len(encoding.encode_ordinary(text)) for text in tokens._PROBE) == expected
    fast = tokens._fast_counter(name)
    assert fast is not None and tokens.counter_agrees(fast, expected)
    assert not tokens.counter_agrees(lambda text: len(text.split()), expected)
    assert not tokens.counter_agrees(lambda text: len(encoding.encode_ordinary(text[:-1])), expected)
    assert tokens._fast_counter("p50k_base") is None  # no probe counts: tiktoken counts


COUNTS_WITHOUT_TIKTOKEN = """
import tiktoken.registry
from tuneline import tokens
vocabulary = tokens.Vocabulary("o200k_base")
example = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
print(tokens.count_tokens([example], vocabulary), sorted(tiktoken.registry.ENCODINGS))
lone = {"messages": [{"role": "assistant", "content": "a \\ud800 lone surrogate"}]}
print(tokens.count_tokens([lone], vocabulary), sorted(tiktoken.registry.ENCODINGS))
"""


def test_counting_by_vocabulary_loads_tiktoken_only_for_what_only_it_counts() -> None:
    """A block's task counts through a Vocabulary: tiktoken's encoding (0.8 s, 71 MB) is loaded only
    for a text the Rust counter refuses."""
    done = subprocess.run([sys.executable, "-c", COUNTS_WITHOUT_TIKTOKEN], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lone = "a \ud800 lone surrogate"
    assert done.stdout.splitlines() == [
        f"[{3 + 2 * 3 + n('user') + n('hi') + n('assistant') + n('hello')}] []",
        f"[{3 + 3 + n('assistant') + n(lone)}] ['o200k_base']",
    ]


@pytest.mark.parametrize(
    ("examples", "epochs"),
    [(0, 3), (1, 25), (5, 20), (10, 10), (33, 3), (34, 3), (100, 3), (8333, 3), (8334, 2), (30000, 1)],
)
def test_default_epochs(examples: int, epochs: int) -> None:
    assert tokens.default_epochs(examples) == epochs


def test_context_limit_takes_the_longest_family() -> None:
    limits = {"gpt-4o": 65536, "gpt-4o-mini": 1000, "gpt-4.1-nano": 32768}
    assert tokens.context_limit("gpt-4o-mini-2024-07-18", limits, 9) == 1000
    assert tokens.context_limit("gpt-4o-2024-08-06", limits, 9) == 65536
    assert tokens.context_limit("ft:gpt-4.1-nano:acme::x", limits, 9) == 32768
    assert tokens.context_limit("gpt-4ox", limits, 9) == 9  # a prefix is not a family
    assert tokens.context_limit("llama", limits, 9) == 9


def test_cost_estimate() -> None:
    prices = {"gpt-4.1-mini": 5.0}
    estimate = tokens.estimate_cost(
        [100, 200, 5000],
        model="gpt-4.1-mini-2025-04-14",
        limit=1000,
        prices=prices,
        prices_as_of="2025-07-01",
    )
    assert estimate.n_epochs == tokens.default_epochs(3) == 25  # min(25, 100 // 3)
    assert estimate.billed_tokens_per_epoch == 100 + 200 + 1000  # capped at the context limit
    assert estimate.billed_tokens == 25 * 1300
    assert estimate.estimated_cost_usd == pytest.approx(25 * 1300 * 5.0 / 1e6)
    fixed = tokens.estimate_cost(
        [10] * 4, model="gpt-4.1-mini", limit=100, prices=prices, prices_as_of="x", n_epochs=2
    )
    assert (fixed.n_epochs, fixed.billed_tokens) == (2, 80)
    unknown = tokens.estimate_cost([10], model="llama", limit=100, prices=prices, prices_as_of="x")
    assert unknown.price_per_1m_tokens is None and unknown.estimated_cost_usd is None
    assert unknown.as_dict()["model"] == "llama"
