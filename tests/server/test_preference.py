"""DPO (tuneline/server/preference.py): the loss and gradients equal TRL's DPOTrainer (sigmoid) on the
same batch, the LoRA reference is the base with adapters disabled, and a stopped run resumes exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tuneline.server.chat_template import IGNORE_INDEX, ChatFormat
from tuneline.server.hyperparameters import Hyperparameters
from tuneline.server.method_files import preference_chats
from tuneline.server.modeling import load_causal_lm, load_tokenizer
from tuneline.server.preference import dpo_loss, sequence_logps
from tuneline.server.training import TrainingSpec, train

TOPICS = ["refund", "password", "shipping", "invoice", "login"]
CPU = torch.device("cpu")


def pair(index: int, wordy: bool = False) -> dict[str, Any]:
    topic = TOPICS[index % 5]
    wrong = f"category: {TOPICS[(index + 2) % 5]}" + (" please" * (1 + index % 3) if wordy else "")
    return {
        "input": {"messages": [{"role": "user", "content": f"Question {index}: help with my {topic}"}]},
        "preferred_output": [{"role": "assistant", "content": f"category: {topic}"}],
        "non_preferred_output": [{"role": "assistant", "content": wrong}],
    }


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
        return self.stop_after is not None and len(self.events) >= self.stop_after


def test_loss_and_gradients_equal_trl_dpo_trainer(builtin_model: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    tokenizer = load_tokenizer(builtin_model)
    chat = ChatFormat(tokenizer)
    reference = load_causal_lm(builtin_model, CPU, torch.float32)
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy away from its reference, so the log-ratios are not zero
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    pairs = [
        tuple(chat.encode_example(c, 10**6) for c in preference_chats(pair(i, wordy=True))) for i in range(4)
    ]
    beta = 0.1

    # TRL on the same token ids: the prompt up to the first trained token, the answer through the last.
    def trl_line(chosen: Any, rejected: Any) -> dict[str, list[int]]:
        first = chosen.labels.index(next(x for x in chosen.labels if x != IGNORE_INDEX))
        last = [max(i for i, x in enumerate(e.labels) if x != IGNORE_INDEX) for e in (chosen, rejected)]
        return {
            "prompt_ids": chosen.input_ids[:first],
            "chosen_ids": chosen.input_ids[first : last[0] + 1],
            "rejected_ids": rejected.input_ids[first : last[1] + 1],
        }

    trl_policy = copy.deepcopy(policy)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=["sigmoid"],
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=None,
    )
    # DPOTrainer's constructor requires a train dataset; the batch compared is built below, not from it.
    constructor_dataset = datasets.Dataset.from_list([{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 2)
    trainer = trl.DPOTrainer(
        model=trl_policy,
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=constructor_dataset,
        processing_class=tokenizer,
    )
    trl_policy.train()
    trl_loss = trainer.compute_loss(trl_policy, trainer.data_collator([trl_line(c, r) for c, r in pairs]))
    trl_loss.backward()

    policy.train()
    chosen, rejected = [c for c, _ in pairs], [r for _, r in pairs]
    ours = sequence_logps(policy, chosen + rejected, 0, CPU)
    with torch.no_grad():
        base = sequence_logps(reference, chosen + rejected, 0, CPU)
    losses, _, _ = dpo_loss(ours[:4], ours[4:], base[:4], base[4:], beta)
    loss = losses.mean()
    loss.backward()

    grads = dict(policy.named_parameters())
    theirs = dict(trl_policy.named_parameters())
    gap = sum(((grads[k].grad - theirs[k].grad) ** 2).sum() for k in grads) ** 0.5
    size = sum((theirs[k].grad ** 2).sum() for k in grads) ** 0.5
    print(
        f"DPO parity: loss {loss.item():.7f} vs TRL {trl_loss.item():.7f}; gradient relative gap {gap / size:.2e}"
    )
    assert loss.item() > 0.8  # far from log 2: the log-ratios matter
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert float(gap / size) < 1e-5


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def spec(model: Path, tmp_path: Path, name: str, **options: Any) -> TrainingSpec:
    return TrainingSpec(
        base_model_dir=model,
        train_file=write(tmp_path / "train.jsonl", [pair(i) for i in range(12)]),
        validation_file=write(tmp_path / "valid.jsonl", [pair(100 + i) for i in range(4)]),
        output_dir=tmp_path / name,
        hyperparameters=Hyperparameters(2, 4, 0.25),
        seed=3,
        cpu_threads=1,
        method="dpo",
        method_settings={"beta": 0.1},
        **options,
    )


def test_lora_reference_is_the_base_with_adapters_disabled(builtin_model: Path, tmp_path: Path) -> None:
    from tuneline.server.preference import PreferenceTrainer
    from tuneline.server.training import load_for_training

    job = spec(builtin_model, tmp_path, "lora", lora_above_params=0)
    model, tokenizer, lora = load_for_training(job, CPU)
    assert lora
    lines = [pair(i) for i in range(4)]
    trainer = PreferenceTrainer(
        model, tokenizer, lines, [], Hyperparameters(1, 4, 1.0), 0, 1e-2, CPU, beta=0.1, lora=True
    )
    trainer.train_step([0, 1, 2, 3])
    trainer.train_step([0, 1, 2, 3])
    with torch.no_grad():
        policy = trainer._logps(trainer.train_data, trainer.train_rejected)
    reference = trainer._reference_logps("train", [0, 1, 2, 3])
    base = load_causal_lm(builtin_model, CPU, torch.float32)
    with torch.no_grad():
        expected = sequence_logps(base, trainer.train_data + trainer.train_rejected, trainer.pad_id, CPU)
    assert torch.allclose(reference.flatten(1).T.flatten(), expected, atol=1e-4)
    assert not torch.allclose(policy, reference, atol=1e-3)  # the adapters moved the policy
    assert trainer.reference is None  # no precomputed copy with LoRA


def test_a_stopped_dpo_run_resumes_to_the_same_weights(builtin_model: Path, tmp_path: Path) -> None:
    whole = Recorder()
    done = train(spec(builtin_model, tmp_path, "whole"), whole)
    assert done.steps == 6 and not done.stopped
    names = {"train_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}
    assert all(names <= set(data) for _, data in whole.events)
    assert "full_valid_rewards/accuracies" in whole.events[-1][1]

    first = Recorder(stop_after=4)  # stops mid-epoch 2: the state carries the reference log-probs
    stopped = train(spec(builtin_model, tmp_path, "part"), first)
    assert stopped.stopped and stopped.steps == 4 and stopped.model_dir is not None
    assert "reference_logps" in torch.load(stopped.model_dir / "training_state.pt", weights_only=True)
    rest = Recorder()
    resumed = train(spec(builtin_model, tmp_path, "rest", resume_from=stopped.model_dir), rest)
    assert resumed.steps == 6 and [step for step, _ in rest.events] == [5, 6]
    assert rest.events[-1][1]["train_loss"] == pytest.approx(whole.events[-1][1]["train_loss"], rel=1e-5)
    a = load_causal_lm(done.model_dir, CPU, torch.float32).state_dict()  # type: ignore[arg-type]
    b = load_causal_lm(resumed.model_dir, CPU, torch.float32).state_dict()  # type: ignore[arg-type]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
