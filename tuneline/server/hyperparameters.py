"""A job's hyperparameters and the rules that resolve "auto" (torch-free: the scheduler resolves them
while it validates a job's files, and the trainer takes them as they are).

"auto" hyperparameters: n_epochs by the hosted service's rule (tuneline.tokens.default_epochs);
batch_size the largest power of two not above n_examples / 200, between 1 and 32 (at least 200 steps
per epoch: a small model needs several hundred steps to learn from a few hundred examples; on ~1000
demo examples, 3 epochs at batch 4 reach eval exact match 0.94 where batch 8 reaches 0.86, in the same
time; larger sets get the larger batches that keep a CPU or GPU busier);
learning_rate_multiplier 1.0 (each model's base rate is tuned for its auto batch sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tuneline.tokens import default_epochs


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


def auto_batch_size(n_examples: int) -> int:
    """The largest power of two not above n_examples / 200, between 1 and 32."""
    if n_examples < 400:
        return 1
    return int(min(32, 2 ** math.floor(math.log2(n_examples / 200))))


def resolve_hyperparameters(
    n_examples: int,
    n_epochs: int | str,
    batch_size: int | str,
    learning_rate_multiplier: float | str,
) -> Hyperparameters:
    """Every "auto" replaced by its rule (see the module docstring); explicit values kept."""
    epochs = default_epochs(n_examples) if n_epochs == "auto" else int(n_epochs)
    batch = auto_batch_size(n_examples) if batch_size == "auto" else int(batch_size)
    multiplier = 1.0 if learning_rate_multiplier == "auto" else float(learning_rate_multiplier)
    if epochs < 1 or batch < 1 or not multiplier > 0:
        raise ValueError(
            f"hyperparameters out of range: n_epochs={epochs}, batch_size={batch}, lr x{multiplier}"
        )
    return Hyperparameters(epochs, batch, multiplier)
