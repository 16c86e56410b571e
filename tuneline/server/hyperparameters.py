"""A job's hyperparameters and the rules that resolve "auto" (torch-free: the scheduler resolves them
while it validates a job's files, and the trainer takes them as they are).

"auto" hyperparameters (resolve_hyperparameters, with the base model's AutoRules from its model card
`tuneline_model.json`; a checkpoint without one gets the plain rules):
- n_epochs by the hosted service's rule (tuneline.tokens.default_epochs: 3, raised for small sets until
  the job shows the model 100 examples), with the model's own floor `min_examples_seen` in place of
  100 (1000 for tuneline-tiny: a 0.8M-parameter model pretrained on a few hundred lines needs about a
  thousand updates to pick up a new task, a large pretrained model far fewer);
- batch_size the largest power of two not above n_examples / 200, between 1 and 32 (at least 200 steps
  per epoch: a small model needs several hundred steps to learn from a few hundred examples; on ~1000
  demo examples, 3 epochs at batch 4 reach eval exact match 0.94 where batch 8 reaches 0.86, in the same
  time; larger sets get the larger batches that keep a CPU or GPU busier);
- learning_rate_multiplier: batch_size / `learning_rate_batch_size` (the batch size the model's base
  rate is tuned at; 4 for tuneline-tiny), at most 1.0 - smaller batches, noisier gradients, a
  proportionally smaller step (the linear scaling rule, never extrapolated above the tuned batch);
  1.0 for a model that states no tuned batch size.
Base rates: the model card's (2e-3 for tuneline-tiny), else 5e-5 for full fine-tuning and 2e-4 for LoRA.

The methods' own "auto" values (resolve_method_hyperparameters):
- dpo: beta 0.1 (the DPO paper's and TRL's default);
- reinforcement: compute_multiplier 1.0 (SAMPLES_PER_PROMPT samples per prompt, times the multiplier,
  at least 2: advantages are taken within the group); eval_interval so that a job evaluates about
  EVALUATIONS_PER_JOB times; eval_samples 1 sample per validation prompt.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.server.catalog import MODEL_CARD
from tuneline.tokens import default_epochs

DEFAULT_BETA = 0.1
SAMPLES_PER_PROMPT = 4
EVALUATIONS_PER_JOB = 10


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


@dataclass(frozen=True)
class AutoRules:
    """What "auto" hyperparameters mean for one base model (its model card's figures; the defaults
    for a checkpoint without one): the batch size its base learning rate is tuned at (None: the rate
    holds at every batch size) and the fewest examples (examples x epochs) a job shows it."""

    learning_rate_batch_size: int | None = None
    min_examples_seen: int = 100

    def learning_rate_multiplier(self, batch_size: int) -> float:
        if not self.learning_rate_batch_size:
            return 1.0
        return min(1.0, batch_size / self.learning_rate_batch_size)


def auto_rules(model_dir: Path) -> AutoRules:
    """The AutoRules stated by a model directory's card (tuneline_model.json), else the defaults."""
    card = Path(model_dir) / MODEL_CARD
    if not card.is_file():
        return AutoRules()
    values = json.loads(card.read_text(encoding="utf-8"))
    batch = values.get("learning_rate_batch_size")
    seen = values.get("min_examples_seen")
    return AutoRules(
        batch if isinstance(batch, int) and batch > 0 else None,
        seen if isinstance(seen, int) and seen > 0 else AutoRules.min_examples_seen,
    )


def resolve_hyperparameters(
    n_examples: int,
    n_epochs: int | str,
    batch_size: int | str,
    learning_rate_multiplier: float | str,
    rules: AutoRules = AutoRules(),
) -> Hyperparameters:
    """Every "auto" replaced by its rule (see the module docstring); explicit values kept."""
    epochs = default_epochs(n_examples, rules.min_examples_seen) if n_epochs == "auto" else int(n_epochs)
    batch = auto_batch_size(n_examples) if batch_size == "auto" else int(batch_size)
    multiplier = (
        rules.learning_rate_multiplier(batch)
        if learning_rate_multiplier == "auto"
        else float(learning_rate_multiplier)
    )
    if epochs < 1 or batch < 1 or not multiplier > 0:
        raise ValueError(
            f"hyperparameters out of range: n_epochs={epochs}, batch_size={batch}, lr x{multiplier}"
        )
    return Hyperparameters(epochs, batch, multiplier)


def samples_per_prompt(compute_multiplier: float) -> int:
    """How many answers a reinforcement step samples for each prompt: SAMPLES_PER_PROMPT times the
    compute_multiplier, at least 2 (a group of one has no advantage)."""
    return max(2, round(SAMPLES_PER_PROMPT * compute_multiplier))


def resolve_method_hyperparameters(
    n_examples: int, requested: Mapping[str, Any], rules: AutoRules = AutoRules()
) -> dict[str, Any]:
    """A job's requested hyperparameters (any method's) with every "auto" resolved."""
    resolved = resolve_hyperparameters(
        n_examples,
        requested["n_epochs"],
        requested["batch_size"],
        requested["learning_rate_multiplier"],
        rules,
    )
    values: dict[str, Any] = {
        "n_epochs": int(resolved.n_epochs),
        "batch_size": int(resolved.batch_size),
        "learning_rate_multiplier": float(resolved.learning_rate_multiplier),
    }
    if "beta" in requested:
        values["beta"] = DEFAULT_BETA if requested["beta"] == "auto" else float(requested["beta"])
    if "compute_multiplier" in requested:
        steps = math.ceil(n_examples / resolved.batch_size) * resolved.n_epochs
        multiplier = requested["compute_multiplier"]
        interval = requested.get("eval_interval", "auto")
        samples = requested.get("eval_samples", "auto")
        values.update(
            reasoning_effort=str(requested.get("reasoning_effort", "default")),
            compute_multiplier=1.0 if multiplier == "auto" else float(multiplier),
            eval_interval=max(1, math.ceil(steps / EVALUATIONS_PER_JOB))
            if interval == "auto"
            else int(interval),
            eval_samples=1 if samples == "auto" else int(samples),
        )
    return values
