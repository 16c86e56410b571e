"""Direct preference optimisation (DPO) for `tuneline serve` jobs with `method.type` "dpo".

What a DPO job computes, per step of `batch_size` preference pairs (prompt, preferred answer y_w,
non-preferred answer y_l), with beta from the job:
- the log-probability of each answer given its prompt, summed over the answer's tokens (the final
  assistant turn, end-of-turn token included: tuneline/server/chat_template.py picks the same tokens a
  supervised job trains on), under the policy and under the reference;
- the sigmoid DPO loss, mean over the pairs: -log sigmoid(beta * ((pi(y_w) - ref(y_w)) - (pi(y_l) -
  ref(y_l)))), as TRL's DPOTrainer computes it with loss_type "sigmoid" (tests/server/test_preference.py
  checks the loss and its gradients against TRL's on the same batch);
- the reference is the base model: with LoRA, the same weights with the adapters disabled (peft's
  `disable_adapter()`), computed at every step, no second copy; for a full fine-tune, the reference
  log-probs of every training and validation pair are computed once, before the first step, and carried
  in the training state, so a resumed run keeps the base model's figures;
- the metrics TRL reports, per step: `train_loss` (TRL's `loss`), `rewards/chosen`, `rewards/rejected`
  (beta x the log-ratio to the reference), `rewards/accuracies` (the share of pairs whose preferred
  answer gets the larger reward), `rewards/margins`; the validation figures as `valid_...` (a batch
  every `validation_every` steps) and `full_valid_...` (the whole file at each epoch's end).

The loop, epochs, learning-rate schedule, checkpoints, resume, pause and cancel are the supervised
trainer's (tuneline/server/trainer.py, training.py): `PreferenceTrainer` is a Trainer whose examples are
the preferred chats (their order and batches) with the non-preferred ones beside them. One device per
job: the pairs are run through the model a few at a time (PAIRS_PER_FORWARD), with their gradients
accumulated, so memory holds one small padded batch of logits at a time.

Why by hand and not TRL's DPOTrainer: the server's trainer owns the job's life (checkpoints every
epoch, pause/resume with optimizer and RNG state, the job's events); TRL is the test oracle only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tuneline.server.chat_template import IGNORE_INDEX, EncodedExample
from tuneline.server.hyperparameters import Hyperparameters
from tuneline.server.method_files import preference_chats
from tuneline.server.modeling import context_length
from tuneline.server.trainer import GRADIENT_CLIP, Trainer, learning_rate_at
from tuneline.server.training_errors import TrainingDiverged
from tuneline.server.training_spec import TrainingReporter

PAIRS_PER_FORWARD = 4
FIGURES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def padded(examples: Sequence[EncodedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (IGNORE_INDEX on prompt and padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples]
    labels = [e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
        "labels": torch.tensor(labels, dtype=torch.long, device=device),
    }


def sequence_logps(
    model: Any, examples: Sequence[EncodedExample], pad_id: int, device: torch.device
) -> torch.Tensor:
    """Per example, the summed log-probability of its labelled tokens (float32), differentiable."""
    batch = padded(examples, pad_id, device)
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    trained = labels != IGNORE_INDEX
    token_logps = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * trained).sum(-1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair sigmoid DPO losses, chosen rewards, rejected rewards) from summed log-probs."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def figures(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Sums over pairs of FIGURES (loss, rewards/chosen, rewards/rejected, accuracies, margins)."""
    return torch.stack(
        [
            losses.detach().sum(),
            chosen.sum(),
            rejected.sum(),
            (chosen > rejected).float().sum(),
            (chosen - rejected).sum(),
        ]
    ).float()


class PreferenceTrainer(Trainer):
    """A Trainer for DPO: see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        train_examples: Sequence[dict[str, Any]],
        validation_examples: Sequence[dict[str, Any]],
        hyperparameters: Hyperparameters,
        seed: int,
        peak_learning_rate: float,
        device: torch.device,
        validation_every: int | None = None,
        *,
        beta: float,
        lora: bool,
        **options: Any,
    ) -> None:
        train_pairs = [preference_chats(e) for e in train_examples]
        validation_pairs = [preference_chats(e) for e in validation_examples]
        options["packing"] = False
        super().__init__(
            model,
            tokenizer,
            [chosen for chosen, _ in train_pairs],
            [chosen for chosen, _ in validation_pairs],
            hyperparameters,
            seed,
            peak_learning_rate,
            device,
            validation_every,
            **options,
        )
        limit = context_length(model.config)
        self.train_rejected = [self.format.encode_example(r, limit) for _, r in train_pairs]
        self.validation_rejected = [self.format.encode_example(r, limit) for _, r in validation_pairs]
        self.lengths = [
            len(c.input_ids) + len(r.input_ids)
            for c, r in zip(self.train_data, self.train_rejected, strict=True)
        ]
        self.tokens_per_epoch = sum(self.lengths)
        self.beta = float(beta)
        self.lora = lora
        # Full fine-tune: the base model's log-probs, (pairs, 2), computed before the first step.
        self.reference: dict[str, torch.Tensor] | None = None

    # -- the reference --

    def _pairs(self, split: str) -> tuple[list[EncodedExample], list[EncodedExample]]:
        if split == "train":
            return self.train_data, self.train_rejected
        return self.validation_data, self.validation_rejected

    @contextlib.contextmanager
    def _as_reference(self) -> Iterator[None]:
        """The model as the reference: adapters disabled (LoRA), without gradients."""
        adapters = self.model.disable_adapter() if self.lora else contextlib.nullcontext()
        with torch.no_grad(), adapters:
            yield

    def _logps(self, chosen: Sequence[EncodedExample], rejected: Sequence[EncodedExample]) -> torch.Tensor:
        """(pairs, 2) summed log-probs of the chosen and rejected answers, one forward for both."""
        values = sequence_logps(self.model, [*chosen, *rejected], self.pad_id, self.device)
        return torch.stack([values[: len(chosen)], values[len(chosen) :]], dim=1)

    def _reference_logps(self, split: str, indices: Sequence[int]) -> torch.Tensor:
        chosen, rejected = self._pairs(split)
        if self.lora:
            with self._as_reference(), self._precision():
                return self._logps([chosen[i] for i in indices], [rejected[i] for i in indices])
        if self.reference is None:
            self.reference = {}
            for name in ("train", "validation"):
                all_chosen, all_rejected = self._pairs(name)
                parts = [torch.zeros((0, 2), device=self.device)]
                for begin in range(0, len(all_chosen), PAIRS_PER_FORWARD):
                    end = begin + PAIRS_PER_FORWARD
                    with self._as_reference(), self._precision():
                        parts.append(self._logps(all_chosen[begin:end], all_rejected[begin:end]))
                self.reference[name] = torch.cat(parts).float()
        return self.reference[split][list(indices)]

    def _precision(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    # -- state --

    def state(self, fingerprint: str, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
        state = super().state(fingerprint, optimizer)
        if self.reference is not None:
            state["reference_logps"] = {k: v.cpu() for k, v in self.reference.items()}
        return state

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        saved = state.get("reference_logps")
        if saved is not None:
            self.reference = {k: v.to(self.device) for k, v in saved.items()}
        elif not self.lora:
            raise ValueError(
                "the training state has no reference log-probs: the DPO run cannot resume from it"
            )

    # -- the loop --

    def train_step(self, indices: list[int], end_of_epoch: bool = False) -> None:
        self.model.train()
        reference = self._reference_logps("train", indices)  # before the step: the base model's
        lr = learning_rate_at(self.step, self.total_steps, self.peak)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = torch.zeros(len(FIGURES), device=self.device)
        for begin in range(0, len(indices), PAIRS_PER_FORWARD):
            part = indices[begin : begin + PAIRS_PER_FORWARD]
            with self._precision():
                policy = self._logps(
                    [self.train_data[i] for i in part], [self.train_rejected[i] for i in part]
                )
            ref = reference[begin : begin + len(part)]
            losses, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta)
            (losses.sum() / len(indices)).backward()
            totals += figures(losses, chosen, rejected)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, GRADIENT_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batch_in_epoch += 1
        self.tokens_seen += sum(self.lengths[i] for i in indices)
        extra: dict[str, float] = {}
        if self.validation_data and self.step % self.validation_every == 0:
            extra = self.validation_batch()
        if end_of_epoch:
            extra.update(self.full_validation())
        self._metrics.pending.append((self.step, totals, len(indices), norm.detach(), extra))

    def flush(self, reporter: TrainingReporter | None) -> None:
        for step, totals, pairs, norm, extra in self._metrics.pending:
            means = [value / max(1, pairs) for value in totals.tolist()]
            if not (math.isfinite(means[0]) and math.isfinite(float(norm))):
                self._metrics.pending.clear()
                raise TrainingDiverged(self._divergence(step, means[0], float(norm)))
            data = {"train_loss": means[0], **dict(zip(FIGURES[1:], means[1:], strict=True)), **extra}
            self._metrics.last = {**self._metrics.last, "step": float(step), **data}
            if reporter is not None:
                reporter.metrics(step, self.total_steps, data)
        self._metrics.pending.clear()

    @torch.no_grad()
    def preference_figures(self, split: str, indices: Sequence[int]) -> dict[str, float]:
        """Mean FIGURES over the pairs `indices` of `split`, the model as it is now."""
        self.model.eval()
        chosen, rejected = self._pairs(split)
        totals = torch.zeros(len(FIGURES), device=self.device)
        for begin in range(0, len(indices), PAIRS_PER_FORWARD):
            part = list(indices[begin : begin + PAIRS_PER_FORWARD])
            reference = self._reference_logps(split, part)
            with self._precision():
                policy = self._logps([chosen[i] for i in part], [rejected[i] for i in part])
            losses, good, bad = dpo_loss(
                policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1], self.beta
            )
            totals += figures(losses, good, bad)
        return dict(zip(FIGURES, [value / max(1, len(indices)) for value in totals.tolist()], strict=True))

    def validation_batch(self) -> dict[str, float]:
        size = min(self.hyperparameters.batch_size, len(self.validation_data))
        picked = [(self._validation_cursor + i) % len(self.validation_data) for i in range(size)]
        self._validation_cursor = (self._validation_cursor + size) % len(self.validation_data)
        return {
            f"valid_{name}": value for name, value in self.preference_figures("validation", picked).items()
        }

    def full_validation(self) -> dict[str, float]:
        if not self.validation_data:
            return {}
        every = range(len(self.validation_data))
        return {
            f"full_valid_{name}": value
            for name, value in self.preference_figures("validation", every).items()
        }
