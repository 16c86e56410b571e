"""Reinforcement fine-tuning for `tuneline serve` jobs with `method.type` "reinforcement": group-relative
policy optimisation (GRPO, DeepSeekMath; the objective TRL's GRPOTrainer computes with one update per
generation, so the probability ratio is 1 and its clipping never binds).

What a step computes, for each of the batch's `batch_size` prompts (a training line's messages, which
end with the user's turn):
- G = samples_per_prompt(compute_multiplier) answers (4 x the multiplier, at least 2), sampled from
  the policy at temperature 1, each at most MAX_COMPLETION_TOKENS tokens, stopped at the model's end of
  turn;
- each answer's reward from the job's grader (`grader.grade({"output_text", "output_json"}, item)`,
  item = the line's fields other than `messages`), or any `reward(text, item) -> float`: the core takes a
  callable, the job passes its grader. A grade that fails scores 0 and is counted
  (`train_grader_errors`, and by the hosted error flag: `train_grader_errors/model_grader_parse_error`),
  as the hosted service scores a failed grade;
- advantages within the group: (reward - group mean) / (group std + 1e-4); a group whose answers all
  score the same teaches nothing;
- the loss per answer token: -(advantage x the token's probability ratio) + KL_COEF x the k3 estimate
  of the KL divergence to the reference (exp(ref - logp) - (ref - logp) - 1), averaged over the answer's
  tokens, then over the answers;
- the reference is the base model: with LoRA, the same weights with the adapters disabled (peft's
  `disable_adapter()`); for a full fine-tune a frozen copy of the base (the answers are sampled anew at
  every step, so their reference log-probs cannot be computed ahead).

Evaluation: before the first step (reported as step 0), every `eval_interval` steps and after the last one, `eval_samples` answers per prompt of the
validation file (every prompt) are sampled and graded: `valid_mean_reward`. Metrics per step:
`train_mean_reward`, `train_reward_std`, `train_loss`, `train_kl`, `train_completion_tokens`, and
`valid_mean_reward` when evaluated.

The loop, epochs (prompts in batches), learning-rate schedule, checkpoints, resume (the RNG state
included, so resumed sampling continues the same stream), pause and cancel are the supervised trainer's
(tuneline/server/trainer.py, training.py). One device per job.

Why by hand and not TRL's GRPOTrainer: as for DPO (tuneline/server/preference.py), the server's trainer
owns the job's life; the objective is a few lines over per-token log-probs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from tuneline.server.hyperparameters import Hyperparameters, samples_per_prompt
from tuneline.server.method_files import grader_item
from tuneline.server.trainer import GRADIENT_CLIP, Trainer, learning_rate_at
from tuneline.server.training_errors import TrainingDiverged
from tuneline.server.training_spec import TrainingReporter

# A reward function: (the answer's text, the line's item) -> reward.
Reward = Callable[[str, Mapping[str, Any]], float]

KL_COEF = 0.04  # TRL's and the GRPO paper's beta
MAX_COMPLETION_TOKENS = 48
ADVANTAGE_EPSILON = 1e-4
FIGURES = ("train_loss", "train_mean_reward", "train_reward_std", "train_kl", "train_completion_tokens")


def grader_reward(spec: Mapping[str, Any], settings: Any = None) -> tuple[Reward, dict[str, int]]:
    """A Reward from a grader spec (tuneline/server/graders, with the server's GraderSettings), and the
    running count of failed grades by the hosted error flag (`model_grader_server_error`, ...)."""
    from tuneline.server.graders import GraderError, parse_grader, sample_of

    grader = parse_grader(spec, "method.reinforcement.grader", settings)
    errors: dict[str, int] = {}

    def reward(text: str, item: Mapping[str, Any]) -> float:
        try:
            value = float(grader.grade(sample_of(text), item))
        except GraderError as exc:
            kind = exc.kind or "grader_error"
            errors[kind] = errors.get(kind, 0) + 1
            return 0.0
        return value if math.isfinite(value) else 0.0

    return reward, errors


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(groups, G) rewards -> advantages normalised within each group."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + ADVANTAGE_EPSILON)


def token_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Log-probabilities of tokens input_ids[:, start:] under `model` (float32), (rows, width - start)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, start - 1 : -1].float()
    return torch.gather(logits.log_softmax(-1), 2, input_ids[:, start:].unsqueeze(-1)).squeeze(-1)


def grpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-answer losses, per-answer mean KL) from per-token log-probs (answers, tokens), the answers'
    advantages and their token mask."""
    ratio = torch.exp(policy - policy.detach())
    delta = reference - policy
    kl = torch.exp(delta) - delta - 1
    per_token = -(ratio * advantages[:, None]) + kl_coef * kl
    count = mask.sum(dim=1).clamp(min=1)
    return (per_token * mask).sum(dim=1) / count, ((kl * mask).sum(dim=1) / count).detach()


class ReinforcementTrainer(Trainer):
    """A Trainer for GRPO: see the module docstring. `reward` overrides the job's grader."""

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
        settings: Mapping[str, Any],
        lora: bool,
        reference_model: Any = None,
        reward: Reward | None = None,
        grader_settings: Any = None,
        **options: Any,
    ) -> None:
        options["packing"] = False
        prompts = [{"messages": e["messages"]} for e in train_examples]
        super().__init__(
            model,
            tokenizer,
            prompts,
            [],
            hyperparameters,
            seed,
            peak_learning_rate,
            device,
            validation_every,
            **options,
        )
        self.prompts = [self.format.encode_prompt(e["messages"]) for e in train_examples]
        self.items = [grader_item(e) for e in train_examples]
        self.validation_prompts = [self.format.encode_prompt(e["messages"]) for e in validation_examples]
        self.validation_items = [grader_item(e) for e in validation_examples]
        self.lengths = [len(p) for p in self.prompts]
        self.tokens_per_epoch = sum(self.lengths)
        self.group = samples_per_prompt(float(settings.get("compute_multiplier", 1.0)))
        self.eval_interval = int(settings.get("eval_interval", max(1, self.total_steps // 10)))
        self.eval_samples = int(settings.get("eval_samples", 1))
        self.lora = lora
        if reward is not None:
            self.reward: Reward = reward
            self.grader_errors: dict[str, int] = {}
        else:
            self.reward, self.grader_errors = grader_reward(settings.get("grader") or {}, grader_settings)
        if not lora and reference_model is None:
            raise ValueError("a full fine-tune's reinforcement job needs the base model as its reference")
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.eval()
            reference_model.requires_grad_(False)
        self.stop_ids = sorted(self.format.stop_token_ids) or [tokenizer.eos_token_id]
        self.completion_tokens = 0

    # -- sampling and grading --

    @torch.no_grad()
    def sample(self, prompt: list[int], count: int) -> list[list[int]]:
        """`count` answers to one prompt (token ids, through the end-of-turn token when one was made)."""
        self.model.eval()
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=MAX_COMPLETION_TOKENS,
            num_return_sequences=count,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        answers = []
        for row in out[:, len(prompt) :].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in self.stop_ids), len(row))
            answers.append(row[:end])
        return answers

    def text(self, answer: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(answer), skip_special_tokens=True)).strip()

    def mean_reward(
        self, prompts: Sequence[list[int]], items: Sequence[Mapping[str, Any]], samples: int
    ) -> float:
        """The mean reward of `samples` sampled answers per prompt."""
        rewards = [
            self.reward(self.text(answer), item)
            for prompt, item in zip(prompts, items, strict=True)
            for answer in self.sample(prompt, samples)
        ]
        return sum(rewards) / max(1, len(rewards))

    def validation_reward(self) -> float:
        return self.mean_reward(self.validation_prompts, self.validation_items, self.eval_samples)

    # -- the loop --

    @contextlib.contextmanager
    def _as_reference(self) -> Iterator[Any]:
        with torch.no_grad():
            if self.lora:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.reference_model

    def train_step(self, indices: list[int], end_of_epoch: bool = False) -> None:
        if self.step == 0 and self.validation_prompts:  # the base model's figure, reported as step 0
            start = {"valid_mean_reward": self.validation_reward()}
            self._metrics.pending.append((0, None, 0, torch.zeros(()), start))  # type: ignore[arg-type]
        lr = learning_rate_at(self.step, self.total_steps, self.peak)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        answers = [self.sample(self.prompts[i], self.group) for i in indices]
        rewards = torch.tensor(
            [
                [self.reward(self.text(a), self.items[i]) for a in group]
                for i, group in zip(indices, answers, strict=True)
            ],
            dtype=torch.float32,
        )
        advantages = group_advantages(rewards).to(self.device)
        self.model.train()
        totals = torch.zeros(2, device=self.device)  # summed losses and KLs over answers
        tokens = 0
        count = rewards.numel()
        for row, (i, group) in enumerate(zip(indices, answers, strict=True)):
            prompt = self.prompts[i]
            width = max(len(a) for a in group) or 1
            ids = torch.full(
                (len(group), len(prompt) + width), self.pad_id, dtype=torch.long, device=self.device
            )
            mask = torch.zeros((len(group), width), dtype=torch.float32, device=self.device)
            for k, answer in enumerate(group):
                ids[k, : len(prompt)] = torch.tensor(prompt, device=self.device)
                ids[k, len(prompt) : len(prompt) + len(answer)] = torch.tensor(
                    answer, dtype=torch.long, device=self.device
                )
                mask[k, : len(answer)] = 1.0
                tokens += len(answer)
            attention = torch.cat(
                [torch.ones((len(group), len(prompt)), device=self.device), mask], dim=1
            ).long()
            with self._as_reference() as reference:
                reference_logps = token_logps(reference, ids, attention, len(prompt))
            policy = token_logps(self.model, ids, attention, len(prompt))
            losses, kls = grpo_loss(policy, reference_logps, advantages[row], mask, KL_COEF)
            (losses.sum() / count).backward()
            totals += torch.stack([losses.detach().sum(), kls.sum()])
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, GRADIENT_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batch_in_epoch += 1
        self.tokens_seen += sum(self.lengths[i] for i in indices) * self.group + tokens
        self.completion_tokens += tokens
        figures = [
            float(totals[0]) / count,
            float(rewards.mean()),
            float(rewards.std()) if count > 1 else 0.0,
            float(totals[1]) / count,
            tokens / count,
        ]
        extra: dict[str, float] = {"train_grader_errors": float(sum(self.grader_errors.values()))}
        extra.update({f"train_grader_errors/{kind}": float(n) for kind, n in self.grader_errors.items()})
        last = self.step == self.total_steps
        if self.validation_prompts and (self.step % self.eval_interval == 0 or last):
            extra["valid_mean_reward"] = self.validation_reward()
        self._metrics.pending.append((self.step, torch.tensor(figures), count, norm.detach(), extra))

    def flush(self, reporter: TrainingReporter | None) -> None:
        for step, figures, _, norm, extra in self._metrics.pending:
            if figures is None:  # the evaluation before the first step
                self._metrics.last = {**self._metrics.last, **extra}
                if reporter is not None:
                    reporter.metrics(step, self.total_steps, dict(extra))
                continue
            values = figures.tolist()
            if not (math.isfinite(values[0]) and math.isfinite(float(norm))):
                self._metrics.pending.clear()
                raise TrainingDiverged(self._divergence(step, values[0], float(norm)))
            data = {**dict(zip(FIGURES, values, strict=True)), **extra}
            self._metrics.last = {**self._metrics.last, "step": float(step), **data}
            if reporter is not None:
                reporter.metrics(step, self.total_steps, data)
        self._metrics.pending.clear()

    def validation_batch(self) -> dict[str, float]:
        return {}

    def full_validation(self) -> dict[str, float]:
        return {}
