"""Reinforcement fine-tuning (tuneline/server/reinforcement.py): group advantages, the GRPO loss, and the
proof: tuneline-tiny, given a string_check grader on a toy task it fails at first, raises its mean
validation reward by a clear margin in well under 3 minutes, through the job's own training path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tuneline.server.hyperparameters import Hyperparameters, samples_per_prompt
from tuneline.server.reinforcement import group_advantages, grpo_loss
from tuneline.server.training import TrainingSpec, train

GRADER = {
    "type": "string_check",
    "name": "ten in digits",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}


def test_advantages_are_normalised_within_each_group() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 3.0]])
    advantages = group_advantages(rewards)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(3), atol=1e-6)
    assert torch.allclose(advantages[0], torch.tensor([0.866, -0.866, -0.866, 0.866]), atol=1e-3)
    assert torch.equal(advantages[1], torch.zeros(4))  # all alike: nothing to learn from this group
    assert advantages[2, 3] > 0 > advantages[2, 0]


def test_compute_multiplier_scales_the_samples_per_prompt() -> None:
    assert [samples_per_prompt(m) for m in (0.1, 1.0, 2.0, 2.5)] == [2, 4, 8, 10]


def test_grpo_loss_is_the_policy_gradient_plus_a_kl_penalty() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, requires_grad=True)
    policy = torch.log_softmax(logits, dim=-1)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 4 + [0.0]])
    advantages = torch.tensor([1.0, -0.5, 0.0])
    # At the reference, the KL term and its gradient are 0: the loss is -A x mean token log-prob's gradient.
    losses, kl = grpo_loss(policy, policy.detach(), advantages, mask, 0.04)
    assert torch.allclose(kl, torch.zeros(3)) and torch.allclose(losses, -advantages)
    losses.sum().backward()
    expected_logits = logits.detach().clone().requires_grad_(True)
    expected = -(torch.log_softmax(expected_logits, -1) * mask).sum(1) / mask.sum(1) * advantages
    expected.sum().backward()
    assert logits.grad is not None and expected_logits.grad is not None
    assert torch.allclose(logits.grad, expected_logits.grad, atol=1e-6)
    # Away from the reference the penalty is positive.
    _, kl = grpo_loss(policy, policy.detach() - 0.3, torch.zeros(3), mask, 0.04)
    assert bool((kl > 0).all())


def prompts(numbers: range) -> list[dict[str, Any]]:
    """The toy task: answer a ticket asking for ten in digits with exactly "10."."""
    return [
        {
            "messages": [{"role": "user", "content": f"Ticket {n}: write the number ten in digits."}],
            "answer": "10.",
        }
        for n in numbers
    ]


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[tuple[int, dict[str, float]]] = []
        self.stop_after = stop_after

    def message(self, text: str, level: str = "info") -> None:
        pass

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        self.events.append((step, dict(data)))

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        trained = [step for step, _ in self.events if step > 0]
        return self.stop_after is not None and len(trained) >= self.stop_after


def rl_spec(model: Path, tmp_path: Path, epochs: int, name: str = "out", **options: Any) -> TrainingSpec:
    train_file = tmp_path / "train.jsonl"
    validation_file = tmp_path / "valid.jsonl"
    train_file.write_text("".join(json.dumps(line) + "\n" for line in prompts(range(1, 13))))
    validation_file.write_text("".join(json.dumps(line) + "\n" for line in prompts(range(100, 112))))
    return TrainingSpec(
        base_model_dir=model,
        train_file=train_file,
        validation_file=validation_file,
        output_dir=tmp_path / name,
        hyperparameters=Hyperparameters(epochs, 4, 0.25),
        seed=0,
        cpu_threads=1,
        method="reinforcement",
        method_settings={"grader": GRADER, "compute_multiplier": 2.0, "eval_interval": 3, "eval_samples": 4},
        **options,
    )


def test_a_stopped_reinforcement_run_resumes_to_the_same_weights(builtin_model: Path, tmp_path: Path) -> None:
    from tuneline.server.modeling import load_causal_lm

    whole = train(rl_spec(builtin_model, tmp_path, 1, "whole"), Recorder())
    stopped = train(rl_spec(builtin_model, tmp_path, 1, "part"), Recorder(stop_after=1))
    assert stopped.stopped and stopped.steps == 1 and stopped.model_dir is not None
    rest = Recorder()
    resumed = train(rl_spec(builtin_model, tmp_path, 1, "rest", resume_from=stopped.model_dir), rest)
    assert resumed.steps == whole.steps == 3 and [step for step, _ in rest.events] == [2, 3]
    cpu = torch.device("cpu")
    a = load_causal_lm(whole.model_dir, cpu, torch.float32).state_dict()  # type: ignore[arg-type]
    b = load_causal_lm(resumed.model_dir, cpu, torch.float32).state_dict()  # type: ignore[arg-type]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_grpo_raises_the_validation_reward_of_a_task_the_model_fails(
    builtin_model: Path, tmp_path: Path
) -> None:
    pytest.importorskip("tuneline.server.graders")
    spec = rl_spec(builtin_model, tmp_path, 6)
    recorder = Recorder()
    started = time.monotonic()
    outcome = train(spec, recorder)
    seconds = time.monotonic() - started
    assert not outcome.stopped and outcome.steps == 18 and outcome.model_dir is not None
    curve = [
        (step, round(data["valid_mean_reward"], 2))
        for step, data in recorder.events
        if "valid_mean_reward" in data
    ]
    train_curve = [
        round(data["train_mean_reward"], 2) for _, data in recorder.events if "train_mean_reward" in data
    ]
    print(f"GRPO validation reward by step: {curve}; train reward per step: {train_curve}; {seconds:.1f} s")
    assert curve[0][0] == 0 and curve[-1][0] == 18 and [s for s, _ in curve][1:4] == [3, 6, 9]
    assert all({"train_loss", "train_kl", "train_reward_std"} <= set(d) for s, d in recorder.events if s > 0)
    assert curve[0][1] <= 0.25  # it fails at first
    assert curve[-1][1] >= curve[0][1] + 0.4  # and learns the task on prompts it never trained on
    assert seconds < 180


def test_reinforcement_lines_end_with_the_user_and_keep_their_other_fields_as_the_item() -> None:
    from tuneline.server.method_files import check_method_file, check_reinforcement_example, grader_item

    line = {"messages": [{"role": "user", "content": "Ticket 1"}], "answer": "10.", "meta": {"k": [1]}}
    assert check_reinforcement_example(line) is None
    assert grader_item(line) == {"answer": "10.", "meta": {"k": [1]}}
    answered = {"messages": [*line["messages"], {"role": "assistant", "content": "10."}]}
    assert check_reinforcement_example(answered)[0] == "invalid_reinforcement_example"  # type: ignore[index]
    assert (
        check_reinforcement_example({"messages": [{"role": "bot", "content": "x"}]})[0] == "unrecognized_role"
    )  # type: ignore[index]
    lines = [json.dumps(line).encode() + b"\n"] * 3 + [b"{broken\n"]
    count, issue = check_method_file(lines, "reinforcement", min_examples=1)
    assert count == 3 and issue is not None and (issue.line, issue.key) == (4, "invalid_json")
    count, issue = check_method_file(lines[:3], "reinforcement", min_examples=10)
    assert issue is not None and issue.key == "too_few_examples"
