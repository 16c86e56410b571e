"""A job on two ranks (two gloo processes on the CPU: the code path of two GPUs) trains the same steps
as one process on the same global batch: the same losses, step by step, and the same weights, data
parallel (DDP) and fully sharded (FSDP)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tuneline.server.hyperparameters import Hyperparameters
from tuneline.server.training import TrainingSpec, train

SYSTEM = "You are the Acme support assistant."
ANSWERS = ["Your refund is on its way.", "Use the reset link.", "It ships within two days."]


class Recorder:
    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[int] = []
        self.messages: list[str] = []

    def message(self, text: str, level: str = "info") -> None:
        self.messages.append(text)

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        self.steps.append((step, dict(data)))

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        self.checkpoints.append(step)

    def should_stop(self) -> bool:
        return False


def chat(n: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Question {n}: " + "please help " * (n % 4)},
            {"role": "assistant", "content": ANSWERS[n % 3]},
        ]
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    # 9 examples at batch 4: batches of 4, 4 and 1; the last leaves one of two ranks with nothing.
    train_file = folder / "train.jsonl"
    train_file.write_text("".join(json.dumps(chat(n)) + "\n" for n in range(9)), encoding="utf-8")
    valid_file = folder / "valid.jsonl"
    valid_file.write_text("".join(json.dumps(chat(100 + n)) + "\n" for n in range(3)), encoding="utf-8")
    return train_file, valid_file


def run(base: Path, files: tuple[Path, Path], out: Path, **options: Any) -> tuple[Recorder, Path]:
    recorder = Recorder()
    spec = TrainingSpec(
        base,
        files[0],
        files[1],
        out,
        Hyperparameters(1, 4, 1.0),
        seed=5,
        cpu_threads=1,
        validation_every=2,
        **options,
    )
    outcome = train(spec, recorder)
    assert not outcome.stopped and outcome.steps == 3 and outcome.model_dir is not None
    return recorder, outcome.model_dir


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_two_ranks_train_the_losses_and_weights_of_one_process(
    builtin_model: Path, files: tuple[Path, Path], tmp_path: Path
) -> None:
    single, single_dir = run(builtin_model, files, tmp_path / "one")
    expected = weights(single_dir)
    for strategy in ("ddp", "fsdp"):
        ranks, ranks_dir = run(builtin_model, files, tmp_path / strategy, devices=2, parallelism=strategy)
        assert f"2 x cpu ({strategy})" in ranks.messages[0]
        assert [s for s, _ in ranks.steps] == [s for s, _ in single.steps] == [1, 2, 3]
        for (step, mine), (_, theirs) in zip(ranks.steps, single.steps, strict=True):
            assert mine.keys() == theirs.keys(), step
            for key, value in theirs.items():
                assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (strategy, step, key)
        assert ranks.checkpoints == single.checkpoints == [3]
        got = weights(ranks_dir)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.allclose(got[name], tensor, atol=2e-6), (strategy, name)
