"""Packed rows: every example whole in one row, positions restarting per example, the same loss and
gradients as the same examples unpacked, and no attention across two examples; on the built-in model
and on random-weight Llama- and GPT-2-shaped checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from random_checkpoints import gpt2_checkpoint, llama_checkpoint, load, random_examples

from tuneline.server.chat_template import IGNORE_INDEX, ChatFormat, EncodedExample
from tuneline.server.losses import CausalLMLoss
from tuneline.server.modeling import load_tokenizer
from tuneline.server.packing import collate, pack_rows, split_for_ranks, trained_targets

CPU = torch.device("cpu")


def test_pack_rows_is_first_fit_decreasing_and_keeps_every_index_once() -> None:
    assert pack_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    lengths = [((i * 37) % 50) + 1 for i in range(60)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(60))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == pack_rows(lengths, 64)
    assert pack_rows([9, 2], 4) == [[0], [1]]  # an item wider than the row gets a row of its own


def test_split_for_ranks_balances_tokens_and_covers_the_batch() -> None:
    shares = split_for_ranks([10, 9, 1, 1, 1], 2)
    assert sorted(i for share in shares for i in share) == [0, 1, 2, 3, 4]
    assert shares == [[0, 3], [1, 2, 4]]  # 11 tokens each
    assert split_for_ranks([5], 2) == [[0], []]


def test_collate_restarts_positions_and_trains_the_same_targets_as_the_padded_layout() -> None:
    examples = random_examples([7, 3, 5, 2, 6])
    packed = collate(examples, 0, CPU, width=12)
    padded = collate(examples, 0, CPU, packed=False)
    assert packed.shape[0] < len(examples) and packed.attention_mask is None
    assert packed.position_ids is not None
    # Each example starts at position 0; the rest of a row counts up by one.
    starts = int((packed.position_ids == 0).sum())
    assert starts == len(examples)
    assert packed.tokens == padded.tokens == 23
    assert packed.trained_tokens == padded.trained_tokens == sum(trained_targets(e) for e in examples)
    assert sorted(packed.targets.tolist()) == sorted(padded.targets.tolist())
    # The token at a trained position is followed, in its row, by its target: no target across examples.
    flat_ids = packed.input_ids.reshape(-1)
    flat_positions = packed.position_ids.reshape(-1)
    for position, target in zip(packed.trained_positions.tolist(), packed.targets.tolist(), strict=True):
        assert flat_ids[position + 1] == target
        assert flat_positions[position + 1] == flat_positions[position] + 1


def test_the_default_row_width_is_the_longest_example() -> None:
    examples = random_examples([8, 3, 4, 1])
    batch = collate(examples, 0, CPU)
    assert batch.shape == (2, 8)  # [8] and [4, 3, 1]
    assert collate([], 0, CPU).trained_tokens == 0


# -- the models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tuneline-tiny", "llama", "gpt2"])
def model_and_examples(
    request: pytest.FixtureRequest, builtin_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, list[EncodedExample]]:
    if request.param == "tuneline-tiny":
        from tuneline.paths import data_dir

        chat = ChatFormat(load_tokenizer(builtin_model))
        lines = (data_dir() / "general" / "general_chat.jsonl").read_text(encoding="utf-8").splitlines()
        examples = [chat.encode_example(json.loads(line), 512) for line in lines[:6]]
        return load(builtin_model), examples
    make = llama_checkpoint if request.param == "llama" else gpt2_checkpoint
    folder = make(tmp_path_factory.mktemp(request.param))
    return load(folder), random_examples([11, 4, 9, 6, 3, 7])


def reference_loss(model: Any, examples: list[EncodedExample]) -> torch.Tensor:
    """The library's own loss: one padded row per example, attention mask, full logits, HF labels."""
    batch = collate(examples, 0, CPU, packed=False)
    mean = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    return mean * sum(trained_targets(e) for e in examples)


def gradients(model: Any) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_a_packed_batch_has_the_loss_and_gradients_of_the_same_examples_unpacked(
    model_and_examples: tuple[Any, list[EncodedExample]],
) -> None:
    model, examples = model_and_examples
    longest = max(len(e.input_ids) for e in examples)
    packed = collate(examples, 0, CPU, width=2 * longest)
    assert packed.shape[0] < len(examples)  # the examples really share rows
    loss_function = CausalLMLoss(model)
    loss, _ = loss_function.batch_loss(packed)
    loss.backward()
    packed_grads = gradients(model)
    reference = reference_loss(model, examples)
    reference.backward()
    reference_grads = gradients(model)
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-4)
    assert packed_grads.keys() == reference_grads.keys()
    for name, grad in packed_grads.items():
        # float32 sums over the same tokens in another order: equal to a millionth of the tensor's scale
        # (seen here up to 2e-6 of it on a CPU without AVX-512); a token attending across examples
        # moves gradients by a good fraction of it.
        scale = float(reference_grads[name].abs().max())
        assert torch.allclose(grad, reference_grads[name], rtol=1e-4, atol=1e-5 * scale), name


def logits_by_example(model: Any, examples: list[EncodedExample], positions: bool) -> list[torch.Tensor]:
    """Each example's logits from one packed forward (with per-example positions, or as one plain
    causal row when `positions` is False)."""
    batch = collate(examples, 0, CPU, width=sum(len(e.input_ids) for e in examples))
    assert batch.shape[0] == 1 and batch.position_ids is not None
    with torch.no_grad():
        inputs = {"position_ids": batch.position_ids} if positions else {}
        logits = model(input_ids=batch.input_ids, use_cache=False, **inputs).logits[0]
    pieces, start = [], 0
    for example in examples:
        pieces.append(logits[start : start + len(example.input_ids)])
        start += len(example.input_ids)
    return pieces


def test_changing_one_example_changes_no_other_examples_logits(
    model_and_examples: tuple[Any, list[EncodedExample]],
) -> None:
    model, examples = model_and_examples
    model.eval()
    changed = list(examples)
    first = examples[0]
    changed[0] = EncodedExample([(t + 5) % 90 + 2 for t in first.input_ids], first.labels)
    before = logits_by_example(model, examples, positions=True)
    after = logits_by_example(model, changed, positions=True)
    assert not torch.allclose(before[0], after[0])
    for index in range(1, len(examples)):
        assert torch.allclose(before[index], after[index], atol=1e-5), f"example {index} saw example 0"
    # Without per-example positions the same row is one causal sequence: the change leaks (the check bites).
    plain_before = logits_by_example(model, examples, positions=False)
    plain_after = logits_by_example(model, changed, positions=False)
    assert not torch.allclose(plain_before[1], plain_after[1], atol=1e-5)
    model.train()


def test_the_padded_layout_keeps_a_mask_and_hf_labels() -> None:
    examples = random_examples([4, 6])
    padded = collate(examples, 0, CPU, packed=False)
    assert padded.labels is not None and padded.attention_mask is not None
    assert (padded.labels[0, 4:] == IGNORE_INDEX).all() and padded.position_ids is None
