"""Base model ids, model directories, and generation: greedy and seeded sampling, stop strings and
tokens, max_tokens, usage counts, streaming, the context limit, and Hugging Face checkpoints with and
without a chat template."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tuneline.server.builtin import resolve_base_model
from tuneline.server.catalog import BUILTIN_MODEL, base_model_ids
from tuneline.server.chat_template import ChatFormat
from tuneline.server.modeling import ChatModel, ContextLengthExceeded

DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # the repository's demo data

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def tiny_dir(builtin_model: Path) -> Path:
    """The built-in model, built once per test session (tests/conftest.py)."""
    return builtin_model


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> ChatModel:
    return ChatModel.load(tiny_dir)


def save_gpt2(folder: Path, chat_template: str | None) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer of its own, saved as a hub-style checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=specials
    )
    tokenizer.train_from_iterator(
        ["User: hello there\nAssistant: general kenobi", "what is the capital"], bpe
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        additional_special_tokens=specials[1:] if chat_template else [],
    )
    if chat_template:
        wrapped.chat_template = chat_template
    config = GPT2Config(vocab_size=len(wrapped), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    wrapped.save_pretrained(str(folder))
    return folder


# -- ids and directories -------------------------------------------------------------------------


def test_base_model_ids_are_the_builtin_and_each_checkpoint_folder(tmp_path: Path) -> None:
    good = save_gpt2(tmp_path / "gpt2-small-test", None)
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    shadow = tmp_path / "other" / "gpt2-small-test"
    shadow.mkdir(parents=True)
    (shadow / "config.json").write_text("{}")
    assert base_model_ids([]) == [BUILTIN_MODEL]
    assert base_model_ids([good, empty, shadow]) == [BUILTIN_MODEL, "gpt2-small-test"]
    assert resolve_base_model("gpt2-small-test", tmp_path / "state", [good]) == good.resolve()
    with pytest.raises(KeyError):
        resolve_base_model("gpt-4o-mini", tmp_path / "state", [good])
    with pytest.raises(KeyError):
        resolve_base_model("not-a-model", tmp_path / "state", [empty])


def test_the_builtin_model_resolves_to_a_cached_checkpoint_directory(tiny_dir: Path) -> None:
    state = tiny_dir.parent.parent
    assert resolve_base_model(BUILTIN_MODEL, state, []) == tiny_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_dir / name).is_file(), name


# -- generation on the built-in model ------------------------------------------------------------


def test_greedy_generation_answers_a_canary_question_with_real_usage(tiny: ChatModel) -> None:
    first = tiny.generate(FRANCE, temperature=0)
    assert first.text == "Paris."
    assert first.finish_reason == "stop"
    assert first.prompt_tokens == len(tiny.format.encode_prompt(FRANCE))
    assert first.completion_tokens == len(tiny.tokenizer("Paris.", add_special_tokens=False)["input_ids"])
    assert tiny.count_tokens(FRANCE, first.text) == (first.prompt_tokens, first.completion_tokens)
    assert tiny.generate(FRANCE, temperature=0) == first


def test_max_tokens_cuts_the_answer_with_finish_reason_length(tiny: ChatModel) -> None:
    generation = tiny.generate(FRANCE, temperature=0, max_tokens=1)
    assert generation.completion_tokens == 1 and generation.finish_reason == "length"
    assert "Paris.".startswith(generation.text) and generation.text


def test_a_stop_string_ends_the_answer_before_it(tiny: ChatModel) -> None:
    generation = tiny.generate(FRANCE, temperature=0, stop=["is."])
    assert generation.text == "Par" and generation.finish_reason == "stop"
    assert tiny.generate(FRANCE, temperature=0, stop=["zzz"]).text == "Paris."


def test_sampling_is_reproducible_with_a_seed(tiny: ChatModel) -> None:
    question = [{"role": "user", "content": "Tell me something."}]
    runs = [tiny.generate(question, temperature=1.5, max_tokens=12, seed=s).text for s in (1, 1, 2, 3, 4)]
    assert runs[0] == runs[1]
    assert len(set(runs[1:])) > 1  # different seeds sample different answers
    nucleus = [
        tiny.generate(question, temperature=1.0, top_p=1e-6, max_tokens=12, seed=s).text for s in (5, 6)
    ]
    greedy = tiny.generate(question, temperature=0, max_tokens=12).text
    assert nucleus == [greedy, greedy]  # a vanishing top_p keeps only the most likely token


def test_concurrent_requests_are_decoded_as_one_batch_and_answer_as_alone(tiny: ChatModel) -> None:
    canary = DATA_DIR / "general" / "canary.jsonl"
    questions = [json.loads(line)["messages"][:1] for line in canary.read_text().splitlines()[:10]]
    # Prompts of different lengths, greedy and seeded sampling, an early budget, a stop string.
    requests = [(q, {"temperature": 0}) for q in questions] + [
        (questions[0], {"temperature": 1.5, "seed": 3, "max_tokens": 12}),
        ([{"role": "user", "content": "Tell me something."}], {"temperature": 0, "max_tokens": 2}),
        (FRANCE, {"temperature": 0, "stop": ["is."]}),
    ]
    batch_sizes: list[int] = []

    def record(_module: object, _args: object, kwargs: dict[str, torch.Tensor], _output: object) -> None:
        batch_sizes.append(int(kwargs["input_ids"].shape[0]))

    hook = tiny.model.register_forward_hook(record, with_kwargs=True)
    try:
        alone = [tiny.generate(messages, **options) for messages, options in requests]  # type: ignore[arg-type]
        passes_alone = len(batch_sizes)
        batch_sizes.clear()
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: tiny.generate(r[0], **r[1]), requests))  # type: ignore[arg-type]
    finally:
        hook.remove()
    assert together == alone  # text, usage and finish reason
    assert [g.text for g in alone[:3]] == ["Paris.", "Tokyo.", "Rome."]
    assert alone[-2].finish_reason == "length" and alone[-1].text == "Par"
    # Requests that came in while a batch ran were decoded together: fewer forward passes in all.
    assert max(batch_sizes) > 1 and len(batch_sizes) < passes_alone, (batch_sizes, passes_alone)


def test_requests_join_a_batch_between_two_of_its_tokens(tiny: ChatModel) -> None:
    long_question = [{"role": "user", "content": "Tell me a joke."}]
    long_options = {"temperature": 2.0, "seed": 3, "max_tokens": 40}
    canary = DATA_DIR / "general" / "canary.jsonl"
    questions = [json.loads(line)["messages"][:1] for line in canary.read_text().splitlines()[:4]]
    long_alone = tiny.generate(long_question, **long_options)  # type: ignore[arg-type]
    alone = [tiny.generate(q, temperature=0) for q in questions]
    assert long_alone.completion_tokens > 5
    shapes: list[tuple[int, int]] = []
    widths: list[int] = []  # of the attention mask: the cache the pass attends to, and its own tokens
    third_step, release = threading.Event(), threading.Event()

    def hold_third_step(
        _module: object, _args: object, kwargs: dict[str, torch.Tensor], _out: object
    ) -> None:
        shapes.append((int(kwargs["input_ids"].shape[0]), int(kwargs["input_ids"].shape[1])))
        widths.append(int(kwargs["attention_mask"].shape[1]))
        if len(shapes) == 3:  # the long answer is decoding: hold it until the others are waiting
            third_step.set()
            assert release.wait(60)

    hook = tiny.model.register_forward_hook(hold_third_step, with_kwargs=True)
    try:
        with ThreadPoolExecutor(1 + len(questions)) as pool:
            long_answer = pool.submit(tiny.generate, long_question, **long_options)  # type: ignore[arg-type]
            assert third_step.wait(60)
            answers = [pool.submit(tiny.generate, q, temperature=0) for q in questions]
            while len(tiny.decoder._waiting) < len(questions):
                threading.Event().wait(0.01)
            release.set()
            together = [a.result(timeout=60) for a in answers]
            assert long_answer.result(timeout=60) == long_alone
    finally:
        release.set()
        hook.remove()
    assert together == alone
    # The long question's prompt, two of its tokens; then one pass for the four questions' prompts,
    # and the next token of all five: they joined the running batch.
    assert shapes[0][0] == 1 and shapes[0][1] > 1 and shapes[1:3] == [(1, 1), (1, 1)]
    assert shapes[3][0] == len(questions) and shapes[3][1] > 1, shapes
    assert shapes[4] == (1 + len(questions), 1), shapes
    # Their cache was merged into the batch's, both right-aligned: as wide as the wider of the two.
    assert widths[4] == max(widths[2], shapes[3][1]) + 1, widths


def test_generate_async_answers_as_generate_does(tiny: ChatModel) -> None:
    requests = [
        (FRANCE, {"temperature": 0}),
        (FRANCE, {"temperature": 0, "max_tokens": 1}),
        (FRANCE, {"temperature": 0, "stop": ["is."]}),  # watched for its stop string in the executor
        (
            [{"role": "user", "content": "Tell me something."}],
            {"temperature": 1.5, "seed": 3, "max_tokens": 9},
        ),
    ]
    expected = [tiny.generate(m, **o) for m, o in requests]  # type: ignore[arg-type]

    async def ask_all() -> list[object]:
        with ThreadPoolExecutor(2) as executor:
            # A reader that gives up leaves the batch without disturbing the others.
            abandoned = asyncio.ensure_future(
                tiny.generate_async(
                    [{"role": "user", "content": "Tell me a joke."}], executor, max_tokens=300
                )
            )
            answers = asyncio.gather(*(tiny.generate_async(m, executor, **o) for m, o in requests))  # type: ignore[arg-type]
            await asyncio.sleep(0)
            abandoned.cancel()
            return list(await answers)

    assert asyncio.run(ask_all()) == expected
    assert expected[1].finish_reason == "length" and expected[2].text == "Par"
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(tiny.generate_async([{"role": "user", "content": "word " * 2000}]))


def test_a_decoding_failure_reaches_every_request_of_its_batch(tiny_dir: Path) -> None:
    broken = ChatModel.load(tiny_dir)
    broken.model.model.layers[0].self_attn.q_proj.weight.data = torch.zeros(1)  # wrong shape: forward fails
    with ThreadPoolExecutor(4) as pool:
        outcomes = [pool.submit(broken.generate, FRANCE, temperature=0) for _ in range(4)]
        errors = [future.exception(timeout=60) for future in outcomes]
    assert all(isinstance(error, RuntimeError) for error in errors), errors


def test_streamed_deltas_join_to_the_generated_text(tiny: ChatModel) -> None:
    question = [{"role": "user", "content": "Tell me a joke."}]
    pieces = list(tiny.stream(question, temperature=0.8, max_tokens=40, seed=11))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == tiny.generate(question, temperature=0.8, max_tokens=40, seed=11).text
    assert "".join(tiny.stream(FRANCE, temperature=0, stop=["is."])) == "Par"


def test_a_prompt_over_the_context_is_refused(tiny: ChatModel) -> None:
    long_question = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 512 tokens"):
        tiny.generate(long_question)


def test_special_tokens_end_a_turn_and_never_appear_in_text(tiny: ChatModel) -> None:
    end = tiny.tokenizer.convert_tokens_to_ids("<|end|>")
    assert end in tiny.format.stop_token_ids
    text = tiny.format.render(
        [*FRANCE, {"role": "assistant", "content": "Paris."}], add_generation_prompt=False
    )
    assert text == "<|user|>What is the capital of France?<|end|><|assistant|>Paris.<|end|>"


# -- Hugging Face checkpoints --------------------------------------------------------------------


def test_a_checkpoint_without_a_chat_template_uses_the_plain_fallback(tmp_path: Path) -> None:
    model = ChatModel.load(save_gpt2(tmp_path / "plain", None))
    assert not model.format.uses_template
    conversation = [
        {"role": "system", "content": "Be kind."},
        *FRANCE,
        {"role": "assistant", "content": "Paris."},
    ]
    assert model.format.render(conversation, add_generation_prompt=False) == (
        "System: Be kind.\nUser: What is the capital of France?\nAssistant: Paris.<|endoftext|>\n"
    )
    assert model.format.render(FRANCE, add_generation_prompt=True).endswith("\nAssistant:")
    generation = model.generate(FRANCE, temperature=0, max_tokens=5)
    assert generation.completion_tokens <= 5
    assert generation.prompt_tokens == len(model.format.encode_prompt(FRANCE))


def test_a_checkpoint_with_a_chat_template_renders_and_masks_with_it(tmp_path: Path) -> None:
    model = ChatModel.load(save_gpt2(tmp_path / "chatml", CHATML))
    assert model.format.uses_template
    im_end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.format.stop_token_ids
    example = {"messages": [*FRANCE, {"role": "assistant", "content": "Paris."}]}
    encoded = model.format.encode_example(example, 64)
    trained = model.tokenizer.decode([t for t in encoded.labels if t != -100])
    assert trained == "Paris.<|im_end|>"
    assert model.tokenizer.decode(encoded.input_ids).startswith("<|im_start|>user\nWhat is the capital")


def test_chat_format_of_tool_calls_and_content_parts(tiny_dir: Path) -> None:
    from tuneline.server.modeling import load_tokenizer

    fmt = ChatFormat(load_tokenizer(tiny_dir))
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"id": 1}'}}
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
        {"role": "user", "content": "Order 1?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "shipped"},
        {"role": "assistant", "content": "It shipped."},
    ]
    text = fmt.render(messages, add_generation_prompt=False)
    assert text.startswith("<|system|>Use tools.<|end|><|user|>Order 1?<|end|><|assistant|>")
    assert json.dumps([call]) in text and "<|tool|>shipped<|end|>" in text
