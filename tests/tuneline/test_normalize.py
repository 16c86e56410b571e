from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tuneline.formats import prompt_and_answer
from tuneline.normalize import (
    Normalizer,
    example_turns,
    jaccard,
    normalize_text,
    normalize_unicode_text,
    normalized_example,
    normalized_prompt_and_answer,
    shingle_jaccard,
    turns_prompt_and_answer,
    word_shingles,
)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def test_case_whitespace_and_punctuation_variants_normalise_equal() -> None:
    base = "My order #48213 hasn't arrived, can you check?"
    variants = [
        "MY ORDER #48213 HASN'T ARRIVED, CAN YOU CHECK?",
        "  my order   48213 hasnt arrived\n can you check ",
        "My order #48213 hasn’t arrived… can you check‽",  # typographic apostrophe and ellipsis
        "Ｍｙ ｏｒｄｅｒ #48213 hasn't arrived, can you check?",  # full-width letters (NFKC)
        "My order #48213 hasn't arri\u00adved, can you check?",  # soft hyphen (invisible)
    ]
    assert normalize_text(base) == "my order 48213 hasnt arrived can you check"
    for variant in variants:
        assert normalize_text(variant) == normalize_text(base), variant


def test_symbols_digits_and_letters_of_every_script_stay() -> None:
    assert normalize_text("Refund $12.50 + tax") == "refund $1250 + tax"
    assert normalize_text("Straße GRÜSSE") == "strasse grüsse"  # casefold, not lower
    assert normalize_text("हिन्दी में जवाब") == "हिन्दी में जवाब"  # combining vowel signs are kept


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_ascii_fast_path_agrees_with_the_general_route(text: str) -> None:
    assert normalize_text(text) == normalize_unicode_text(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalisation_is_idempotent_and_collapses_whitespace(text: str) -> None:
    once = normalize_text(text)
    assert normalize_text(once) == once
    assert once == " ".join(once.split())


def test_normalized_example_covers_roles_texts_and_tool_calls() -> None:
    example = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Where is order 7?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"id": "7"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "shipped"},
            {"role": "assistant", "content": "It shipped."},
        ]
    }
    assert normalized_example(example) == (
        "system be brief user where is order 7 assistant assistant lookup id 7 tool shipped assistant it shipped"
    )
    swapped = chat(("user", "Be brief."), ("assistant", "Where is order 7?"))
    assert normalized_example(swapped) != normalized_example(
        chat(("assistant", "Be brief."), ("user", "Where is order 7?"))
    )


def test_turns_of_legacy_and_preference_lines() -> None:
    assert example_turns({"prompt": "Q?", "completion": "A."}) == [("prompt", "Q?"), ("completion", "A.")]
    preference = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello!"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    assert example_turns(preference) == [
        ("user", "Hi"),
        ("preferred_output", "Hello!"),
        ("non_preferred_output", "Go away."),
    ]


def test_prompt_and_answer_leave_the_system_prompt_out() -> None:
    example = chat(("system", "House style."), ("user", "Can I PAY by card?"), ("assistant", "Billing: yes."))
    assert normalized_prompt_and_answer(example) == ("can i pay by card", "billing yes")


def test_normalizer_remembers_each_text() -> None:
    normalize = Normalizer()
    assert normalize("Hello, World") == "hello world"
    assert normalize("Hello, World") is normalize("Hello, World")


def test_word_shingles_of_short_and_empty_texts() -> None:
    assert word_shingles("a b c d", 3) == {("a", "b", "c"), ("b", "c", "d")}
    assert word_shingles("a b", 3) == {("a", "b")}
    assert word_shingles("", 3) == frozenset()
    assert jaccard(frozenset(), frozenset()) == 1.0
    # 4 shingles each, 3 shared: 3 / 5
    assert shingle_jaccard("a b c d e f", "a b c d e g", 3) == 3 / 5


_CALL = {"id": "c1", "type": "function", "function": {"name": "track", "arguments": '{"order": 1}'}}
_MESSAGES = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "", "developer"])},
    optional={
        "content": st.one_of(
            st.text(max_size=12),
            st.none(),
            st.just([{"type": "text", "text": "part one"}, {"type": "image_url", "image_url": {}}]),
        ),
        "tool_calls": st.just([_CALL]),
        "function_call": st.just({"name": "track", "arguments": "{}"}),
        "weight": st.sampled_from([0, 1]),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_MESSAGES, max_size=6), st.booleans())
def test_turns_prompt_and_answer_equal_their_two_definitions(messages: list[Any], roleless: bool) -> None:
    if roleless and messages:
        del messages[0]["role"]  # a missing role is the empty role
    example = {"messages": messages}
    assert turns_prompt_and_answer(example) == (example_turns(example), *prompt_and_answer(example))


def test_turns_prompt_and_answer_of_legacy_and_preference_lines() -> None:
    legacy = {"prompt": "Where?", "completion": "Here."}
    preference = {
        "input": {"messages": [{"role": "user", "content": "Hi"}]},
        "preferred_output": [{"role": "assistant", "content": "Hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "Go away"}],
    }
    for example in (legacy, preference):
        assert turns_prompt_and_answer(example) == (example_turns(example), *prompt_and_answer(example))
