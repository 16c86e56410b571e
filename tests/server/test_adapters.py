"""Many LoRA fine-tunes of one base, the base in memory once (tuneline/server/adapters.py): three
adapters of one base hold less than the base plus three adapters plus a small margin (a merged copy
each would hold three bases), requests for different adapters decode together in one batch and switch
between adapters without reloading the base, and every adapter answers as peft loading it alone does.

The base is a random-weight Llama (large next to its rank-16 adapters, as real bases are); the adapters
are peft LoRA adapters with random weights, saved as the trainer saves a fine-tune."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.server.test_hub import checkpoint_files  # noqa: F401 (a fixture: a tokenizer with a template)
from tuneline.server.adapters import held_bytes
from tuneline.server.modeling import ChatModel, load_causal_lm

MESSAGES = [{"role": "user", "content": "Where is my parcel?"}]


@pytest.fixture(scope="module")
def base_and_adapters(
    tmp_path_factory: pytest.TempPathFactory,
    checkpoint_files: dict[str, bytes],  # noqa: F811
) -> tuple[Path, list[Path]]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("shared-base")
    base = root / "base"
    base.mkdir()
    for name, data in checkpoint_files.items():
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (base / name).write_bytes(data)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(base))
    adapters = []
    for index in range(3):
        torch.manual_seed(10 + index)
        model = LlamaForCausalLM.from_pretrained(str(base))
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.peft_config["default"].base_model_name_or_path = str(base)
        folder = root / f"adapter-{index}"
        peft_model.save_pretrained(str(folder))
        adapters.append(folder)
    return base, adapters


def first_token_logprobs(model: ChatModel) -> list[float]:
    return [
        entry["logprob"]
        for entry in model.generate(MESSAGES, temperature=0, max_tokens=1, top_logprobs=5).logprobs[0][
            "top_logprobs"
        ]
    ]  # type: ignore[index]


def test_three_adapters_hold_the_base_once(base_and_adapters: tuple[Path, list[Path]]) -> None:
    base, adapters = base_and_adapters
    cpu = torch.device("cpu")
    base_bytes = held_bytes([load_causal_lm(base, cpu, torch.float32)])
    adapter_bytes = sum(p.stat().st_size for p in adapters[0].glob("*.safetensors"))
    loaded = [ChatModel.load(folder, dtype="float32") for folder in adapters]
    held = held_bytes([m.model for m in loaded])
    margin = base_bytes // 20
    assert held < base_bytes + 3 * adapter_bytes + margin, (held, base_bytes, adapter_bytes)
    assert adapter_bytes * 8 < base_bytes  # the bound is tight: a second base would break it
    # One base, one decoder: every fine-tune answers through the same model.
    assert len({id(m.model) for m in loaded}) == 1 and len({id(m.decoder) for m in loaded}) == 1
    merged = [load_causal_lm(folder, cpu, torch.float32) for folder in adapters]
    assert held_bytes(merged) > 2.9 * base_bytes  # what serving them merged would hold


def test_each_adapter_answers_as_peft_alone_together_or_switching(
    base_and_adapters: tuple[Path, list[Path]],
) -> None:
    from peft import PeftModel

    from tuneline.server.modeling import load_tokenizer

    base, adapters = base_and_adapters
    cpu = torch.device("cpu")
    shared = [ChatModel.load(folder, dtype="float32") for folder in adapters]
    alone = []
    for folder in adapters:
        reference = PeftModel.from_pretrained(load_causal_lm(base, cpu, torch.float32), str(folder)).eval()
        alone.append(ChatModel(reference, load_tokenizer(folder), cpu))
    plain = ChatModel.load(base, dtype="float32")
    for own, reference in zip(shared, alone, strict=True):
        assert first_token_logprobs(own) == pytest.approx(first_token_logprobs(reference), abs=1e-5)
    expected = [m.generate(MESSAGES, temperature=0, max_tokens=8).text for m in alone]
    assert len(set(expected)) == 3  # the adapters differ, so a mix-up would show

    # Switching back and forth, one request at a time.
    for index in (0, 2, 1, 0, 2):
        assert shared[index].generate(MESSAGES, temperature=0, max_tokens=8).text == expected[index]

    # All at once, with the base itself: one batch of rows with different adapters.
    async def together() -> list[str]:
        answers = await asyncio.gather(
            *(m.generate_async(MESSAGES, temperature=0, max_tokens=8) for m in [*shared, *shared])
        )
        return [a.text for a in answers]

    assert asyncio.run(together()) == expected + expected
    assert shared[0].model.peft_config.keys() == {m.adapter for m in shared}
    base_text = plain.generate(MESSAGES, temperature=0, max_tokens=8).text
    assert base_text not in expected
    held: Any = shared[0].model
    with held.disable_adapter():
        assert (
            ChatModel(held, load_tokenizer(base), cpu).generate(MESSAGES, temperature=0, max_tokens=8).text
            == base_text
        )
