"""How a batch of encoded examples becomes the tensors one forward pass takes: packed rows.

What `collate` guarantees:
- every example of the batch appears whole in exactly one row; a row holds several examples when
  they fit its width (first-fit decreasing, deterministic: the same examples give the same rows);
- position ids restart at 0 for every example, so a model that is given `position_ids` and no
  attention mask (transformers' padding-free path) attends only within each example: its mask code
  turns restarting positions into a block-diagonal causal mask for SDPA and eager attention
  (`transformers.masking_utils.find_packed_sequence_indices`), and flash-attention's varlen kernels
  take the example boundaries from the same positions (`cu_seqlens`; one row per batch there);
- the padding at a row's end continues the positions of the row's last example: it comes after every
  real token, so causal attention keeps it out of their results, and a row holding a single example
  stays an ordinary causal row (SDPA's fast `is_causal` path, no mask built);
- the next-token target of an example's last token is never trained (the next token in the row
  belongs to another example), and no target is read across two examples;
- `trained_positions` index the flattened (rows x width) positions whose next token is trained, and
  `targets` are those next tokens: the loss is taken there only (tuneline/server/losses.py).

The padded layout (one example per row, attention mask, HF `labels`) is kept for models whose forward
takes no `position_ids`, for the benchmark's plain loop and as the reference the tests compare with.

Why by hand: transformers' `DataCollatorWithFlattening` packs a whole batch into one row (the
flash-attention layout) and knows no row width; rows of a bounded width are what SDPA needs, whose
attention cost grows with the square of the row width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tuneline.server.chat_template import IGNORE_INDEX, EncodedExample


def trained_targets(example: EncodedExample) -> int:
    """How many next-token targets of this example are trained (its labels after the first token)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most `width` tokens (an item longer than `width`
    gets a row of its own), by first-fit decreasing; ties keep index order, so the result depends
    only on the lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = lengths[index]
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(width - length)
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor
    # Packed layout: per-example positions and no mask. Padded layout: a 0/1 mask, positions None.
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    # HF-style labels (IGNORE_INDEX where untrained); the padded layout's, for `model(labels=...)`.
    labels: torch.Tensor | None
    # Flat indices into the rows x width positions whose next token is trained, and those tokens.
    # Built on the CPU, so picking them never waits on a GPU.
    trained_positions: torch.Tensor
    targets: torch.Tensor
    tokens: int  # non-padding tokens
    trained_tokens: int

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.input_ids.shape[0]), int(self.input_ids.shape[1])


def collate(
    examples: Sequence[EncodedExample],
    pad_id: int,
    device: torch.device,
    width: int | None = None,
    packed: bool = True,
) -> Batch:
    """The batch's tensors. Packed (default): rows of `width` tokens (default: the longest example, so
    never wider than the padded layout), examples packed into them. `packed=False`: the padded layout.
    An empty `examples` gives one row of a single pad token with nothing trained (a data-parallel
    rank whose share of a small batch is empty still runs the forward and backward the others wait on)."""
    if not examples:
        return _tensors(
            [[pad_id]], [[0]], None, None, [], [], 0, device
        )  # fmt: skip
    longest = max(len(e.input_ids) for e in examples)
    if not packed:
        return _padded(examples, pad_id, device, longest)
    row_width = max(longest, width or 0)
    rows = pack_rows([len(e.input_ids) for e in examples], row_width)
    row_ids: list[list[int]] = []
    row_positions: list[list[int]] = []
    trained: list[int] = []
    targets: list[int] = []
    widest = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    for row_index, row in enumerate(rows):
        ids: list[int] = []
        positions: list[int] = []
        for i in sorted(row):  # examples in batch order within a row
            example = examples[i]
            offset = row_index * widest + len(ids)
            for j, label in enumerate(example.labels[1:]):
                if label != IGNORE_INDEX:
                    trained.append(offset + j)
                    targets.append(label)
            ids.extend(example.input_ids)
            positions.extend(range(len(example.input_ids)))
        last = positions[-1]
        padding = widest - len(ids)
        ids.extend([pad_id] * padding)
        positions.extend(range(last + 1, last + 1 + padding))
        row_ids.append(ids)
        row_positions.append(positions)
    tokens = sum(len(e.input_ids) for e in examples)
    return _tensors(row_ids, row_positions, None, None, trained, targets, tokens, device)


def _padded(examples: Sequence[EncodedExample], pad_id: int, device: torch.device, width: int) -> Batch:
    row_ids, masks, labels = [], [], []
    trained: list[int] = []
    targets: list[int] = []
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        row_ids.append([*example.input_ids, *([pad_id] * (width - n))])
        masks.append([1] * n + [0] * (width - n))
        labels.append([*example.labels, *([IGNORE_INDEX] * (width - n))])
        for j, label in enumerate(example.labels[1:]):
            if label != IGNORE_INDEX:
                trained.append(row * width + j)
                targets.append(label)
    tokens = sum(len(e.input_ids) for e in examples)
    return _tensors(row_ids, None, masks, labels, trained, targets, tokens, device)


def _tensors(
    ids: list[list[int]],
    positions: list[list[int]] | None,
    mask: list[list[int]] | None,
    labels: list[list[int]] | None,
    trained: list[int],
    targets: list[int],
    tokens: int,
    device: torch.device,
) -> Batch:
    pin = device.type == "cuda"

    def moved(values: list[list[int]] | list[int] | None) -> torch.Tensor | None:
        if values is None:
            return None
        tensor = torch.tensor(values, dtype=torch.long)
        return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=pin)

    input_ids = moved(ids)
    trained_positions = moved(trained)
    target_ids = moved(targets)
    assert input_ids is not None and trained_positions is not None and target_ids is not None
    return Batch(
        input_ids=input_ids,
        position_ids=moved(positions),
        attention_mask=moved(mask),
        labels=moved(labels),
        trained_positions=trained_positions,
        targets=target_ids,
        tokens=tokens,
        trained_tokens=len(trained),
    )


def split_for_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices into `lengths` shared out to `world_size` data-parallel ranks, balanced by tokens
    (longest first, each to the least loaded rank; ties to the lowest rank): every rank computes the
    same split from the same batch, with no communication. A rank may get nothing when the batch
    has fewer examples than there are ranks."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(index)
        load[rank] += lengths[index]
    return [sorted(share) for share in shares]
