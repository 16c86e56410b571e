"""The loss without full-vocabulary logits: the chunked linear cross-entropy equals the full one, values
and gradients, and keeps nothing of vocabulary size for the backward pass; models with scaled logits
take their own head on the trained columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from random_checkpoints import VOCABULARY, llama_checkpoint, load, random_examples

from tuneline.server.losses import CausalLMLoss, linear_cross_entropy
from tuneline.server.packing import collate, trained_targets

CPU = torch.device("cpu")


def inputs(rows: int = 10, width: int = 8, vocabulary: int = 50, bias: bool = True) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(3)
    return {
        "hidden": torch.randn(rows, width, generator=generator, requires_grad=True),
        "weight": torch.randn(vocabulary, width, generator=generator, requires_grad=True),
        "bias": torch.randn(vocabulary, generator=generator, requires_grad=True) if bias else None,
        "targets": torch.randint(0, vocabulary, (rows,), generator=generator),
    }


def leaves(values: dict[str, Any]) -> list[torch.Tensor]:
    return [values[k] for k in ("hidden", "weight", "bias") if values[k] is not None]


@pytest.mark.parametrize("bias", [True, False])
def test_the_chunked_loss_equals_the_full_loss_values_and_gradients(bias: bool) -> None:
    values = inputs(bias=bias)
    loss, correct = linear_cross_entropy(
        values["hidden"], values["weight"], values["bias"], values["targets"], chunk_tokens=3
    )
    (2.5 * loss).backward()
    chunked = [t.grad.clone() for t in leaves(values)]
    for tensor in leaves(values):
        tensor.grad = None
    logits = F.linear(values["hidden"], values["weight"], values["bias"])
    reference = F.cross_entropy(logits, values["targets"], reduction="sum")
    (2.5 * reference).backward()
    assert torch.allclose(loss, reference, rtol=1e-6, atol=1e-5)
    assert int(correct) == int((logits.argmax(dim=-1) == values["targets"]).sum())
    for mine, theirs in zip(chunked, [t.grad for t in leaves(values)], strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def test_without_gradients_the_chunked_loss_keeps_the_value_and_computes_none() -> None:
    values = inputs()
    with torch.no_grad():
        loss, _ = linear_cross_entropy(
            values["hidden"], values["weight"], values["bias"], values["targets"], 4
        )
    reference = F.cross_entropy(
        F.linear(values["hidden"], values["weight"], values["bias"]), values["targets"], reduction="sum"
    )
    assert not loss.requires_grad and torch.allclose(loss, reference.detach(), atol=1e-5)


def largest_saved_for_backward(compute: Any) -> int:
    """The largest tensor (elements) autograd keeps for the backward pass while `compute` runs."""
    sizes = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute()
    return max(sizes)


def test_no_tensor_of_trained_tokens_x_vocabulary_is_kept_for_backward() -> None:
    values = inputs(rows=64, width=16, vocabulary=1000, bias=False)
    full_logits = 64 * 1000
    chunked = largest_saved_for_backward(
        lambda: linear_cross_entropy(values["hidden"], values["weight"], None, values["targets"], 16)
    )
    library = largest_saved_for_backward(
        lambda: F.cross_entropy(values["hidden"] @ values["weight"].T, values["targets"], reduction="sum")
    )
    assert library >= full_logits  # the check bites: the plain loss keeps the logits
    assert chunked < full_logits / 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load(llama_checkpoint(tmp_path_factory.mktemp("llama")))


def test_the_model_loss_sums_the_trained_tokens_and_counts_right_predictions(llama: Any) -> None:
    examples = random_examples([9, 5, 12])
    batch = collate(examples, 0, CPU)
    loss_function = CausalLMLoss(llama)
    assert loss_function.fused and loss_function.takes_positions
    loss, correct = loss_function.batch_loss(batch)
    padded = collate(examples, 0, CPU, packed=False)
    output = llama(input_ids=padded.input_ids, attention_mask=padded.attention_mask, labels=padded.labels)
    count = sum(trained_targets(e) for e in examples)
    assert torch.allclose(loss, output.loss * count, rtol=1e-5)
    logits = output.logits[:, :-1].reshape(-1, VOCABULARY)
    picked = logits.index_select(
        0,
        torch.tensor(
            [
                p // padded.shape[1] * (padded.shape[1] - 1) + p % padded.shape[1]
                for p in padded.trained_positions.tolist()
            ]
        ),
    )
    assert int(correct) == int((picked.argmax(dim=-1) == padded.targets).sum())


def test_a_model_with_scaled_logits_uses_its_own_head_on_the_trained_columns(tmp_path: Path) -> None:
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(4)
    config = GraniteConfig(
        vocab_size=VOCABULARY, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, logits_scaling=4.0,
        bos_token_id=None, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    GraniteForCausalLM(config).save_pretrained(str(tmp_path))
    model = load(tmp_path)
    loss_function = CausalLMLoss(model)
    assert not loss_function.fused
    examples = random_examples([9, 5, 12])
    loss, _ = loss_function.batch_loss(collate(examples, 0, CPU, width=30))
    padded = collate(examples, 0, CPU, packed=False)
    reference = model(
        input_ids=padded.input_ids, attention_mask=padded.attention_mask, labels=padded.labels
    ).loss
    assert torch.allclose(loss, reference * sum(trained_targets(e) for e in examples), rtol=1e-5)
