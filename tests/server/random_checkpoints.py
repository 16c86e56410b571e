"""Small random-weight checkpoints of real architectures, built locally (no hub), and encoded examples
for them: what the trainer's packing, loss and multi-process tests run on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tuneline.server.chat_template import IGNORE_INDEX, EncodedExample
from tuneline.server.modeling import load_causal_lm

VOCABULARY = 97


def llama_checkpoint(folder: Path) -> Path:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder


def gpt2_checkpoint(folder: Path) -> Path:
    """A 2-layer GPT-2 (learned absolute positions, tied embeddings), dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=VOCABULARY, n_positions=128, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    return folder


def load(folder: Path) -> Any:
    """The checkpoint as the trainer loads it (float32, CPU), in training mode."""
    model = load_causal_lm(folder, torch.device("cpu"), torch.float32)
    model.train()
    return model


def random_examples(lengths: list[int], seed: int = 0, vocabulary: int = VOCABULARY) -> list[EncodedExample]:
    """Examples of these lengths with random tokens (never the pad id 0), each trained on its second
    half, as an assistant turn after a prompt."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(2, vocabulary, (length,), generator=generator).tolist()
        prompt = length // 2
        examples.append(EncodedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples
