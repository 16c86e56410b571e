"""The built-in model's build: deterministic, answers the canary set, cached by corpus fingerprint,
one build when many ask at once, clear errors for a missing or broken corpus."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from tuneline.server.builtin import (
    DEFAULT_RECIPE,
    MODEL_CACHE_ENV,
    BuiltinRecipe,
    build_builtin_model,
    canary_exact_match,
    default_canary_set,
    default_general_corpus,
    ensure_builtin_model,
    read_chat_lines,
)
from tuneline.server.catalog import BUILTIN_MODEL, MODEL_CARD
from tuneline.server.modeling import ChatModel

# A recipe that trains two epochs only: the build's machinery without its minutes.
QUICK = replace(DEFAULT_RECIPE, min_epochs=2, max_epochs=2)


@pytest.fixture(autouse=True)
def no_model_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests build into their own state directories, as without a cache (tests/conftest.py sets
    one for the run); the cache's own test sets it again."""
    monkeypatch.delenv(MODEL_CACHE_ENV, raising=False)


@pytest.fixture(scope="session")
def tiny_dir(builtin_model: Path) -> Path:
    """The built-in model, built once per test session (tests/conftest.py)."""
    return builtin_model


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == MODEL_CARD:  # holds the build's duration
            continue
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def small_corpus(folder: Path, facts: int = 12) -> tuple[Path, Path]:
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"{2 * i}."},
            ]
        }
        for i in range(facts)
    ]
    corpus = folder / "general.jsonl"
    canary = folder / "canary.jsonl"
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    canary.write_text("".join(json.dumps(line) + "\n" for line in lines[:3]))
    return corpus, canary


def test_the_builtin_model_answers_the_whole_canary_set(tiny_dir: Path) -> None:
    card = json.loads((tiny_dir / MODEL_CARD).read_text())
    assert card["model"] == BUILTIN_MODEL and card["general_corpus"] == str(default_general_corpus())
    assert card["canary_exact_match"] == 1.0
    canary = read_chat_lines(default_canary_set())
    assert canary_exact_match(ChatModel.load(tiny_dir), canary) == 1.0
    assert card["parameters"] < 2_000_000 and card["vocabulary"] <= DEFAULT_RECIPE.vocab_size


def test_the_build_is_deterministic(tmp_path: Path) -> None:
    first = build_builtin_model(tmp_path / "a", recipe=QUICK)
    second = build_builtin_model(tmp_path / "b", recipe=QUICK)
    assert first.epochs == second.epochs == 2
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_the_tokenizer_round_trips_any_text(tiny_dir: Path) -> None:
    model = ChatModel.load(tiny_dir)
    text = "Ünïcödé ☃ — naïve café, 東京, emoji 🙂 and tabs\tand\nnewlines"
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert model.tokenizer.decode(ids) == text
    assert max(ids) < len(model.tokenizer)


def test_concurrent_callers_get_one_build_and_a_rebuild_follows_the_corpus(tmp_path: Path) -> None:
    corpus, canary = small_corpus(tmp_path)
    state = tmp_path / "state"
    results: list[Path] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(ensure_builtin_model(state, corpus, canary, recipe=QUICK))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    target = results[0]
    assert target == state / "models" / BUILTIN_MODEL
    card = json.loads((target / MODEL_CARD).read_text())
    built_once = (target / MODEL_CARD).stat().st_ino
    assert sorted(p.name for p in (state / "models").iterdir()) == [f".{BUILTIN_MODEL}.lock", BUILTIN_MODEL]

    assert ensure_builtin_model(state, corpus, canary, recipe=QUICK) == target
    assert (target / MODEL_CARD).stat().st_ino == built_once  # cached: not rebuilt

    corpus.write_text(corpus.read_text() + json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    ) + "\n")  # fmt: skip
    assert ensure_builtin_model(state, corpus, canary, recipe=QUICK) == target
    rebuilt = json.loads((target / MODEL_CARD).read_text())
    assert rebuilt["fingerprint"] != card["fingerprint"] and rebuilt["examples"] == card["examples"] + 1
    assert sorted(p.name for p in (state / "models").iterdir()) == [f".{BUILTIN_MODEL}.lock", BUILTIN_MODEL]


def test_a_missing_corpus_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"general corpus .*missing.*tuneline demo-data"):
        ensure_builtin_model(tmp_path / "state", tmp_path / "nope.jsonl", tmp_path / "canary.jsonl")


def test_a_broken_corpus_line_names_the_line_and_the_rule(tmp_path: Path) -> None:
    corpus, canary = small_corpus(tmp_path)
    corpus.write_text(
        corpus.read_text() + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n"
    )
    with pytest.raises(ValueError, match=r"line 13 of .*example_missing_assistant_message"):
        build_builtin_model(tmp_path / "out", corpus, canary, recipe=QUICK)


def test_recipes_are_part_of_the_cache_key(tmp_path: Path) -> None:
    corpus, canary = small_corpus(tmp_path)
    state = tmp_path / "state"
    ensure_builtin_model(state, corpus, canary, recipe=QUICK)
    first = json.loads((state / "models" / BUILTIN_MODEL / MODEL_CARD).read_text())
    other: BuiltinRecipe = replace(QUICK, hidden_size=64)
    ensure_builtin_model(state, corpus, canary, recipe=other)
    second = json.loads((state / "models" / BUILTIN_MODEL / MODEL_CARD).read_text())
    assert first["fingerprint"] != second["fingerprint"] and second["recipe"]["hidden_size"] == 64


def test_a_model_cache_shares_one_build_between_state_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus, canary = small_corpus(tmp_path)
    monkeypatch.setenv(MODEL_CACHE_ENV, str(tmp_path / "cache"))
    first = ensure_builtin_model(tmp_path / "one", corpus, canary, recipe=QUICK)
    second = ensure_builtin_model(tmp_path / "two", corpus, canary, recipe=QUICK)
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].name.startswith(f"{BUILTIN_MODEL}-")
    assert (
        (first / MODEL_CARD).read_bytes()
        == (second / MODEL_CARD).read_bytes()
        == (entries[0] / MODEL_CARD).read_bytes()
    )
    assert tree_digest(first) == tree_digest(second)
