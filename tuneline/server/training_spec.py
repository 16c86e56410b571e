"""What a training run is given and what it gives back: TrainingSpec (the job's files, hyperparameters,
devices and trainer settings), TrainingOutcome, and the TrainingReporter a run reports through.

A module of its own, without torch, so that the trainer's parts (tuneline/server/training.py, trainer.py,
distributed.py) and the job's worker share one definition without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuneline.server.hyperparameters import Hyperparameters

# Models above this many parameters recompute each layer's activations in the backward pass.
GRADIENT_CHECKPOINTING_ABOVE_PARAMS = 2_000_000_000


@dataclass
class TrainingSpec:
    base_model_dir: Path
    train_file: Path
    validation_file: Path | None
    output_dir: Path
    hyperparameters: Hyperparameters
    seed: int
    resume_from: Path | None = None
    lora_above_params: int = 300_000_000
    # CPU threads for torch; None = the cores not already busy (see cpu_threads).
    cpu_threads: int | None = None
    # One validation batch every this many steps; None = about 25 times per job.
    validation_every: int | None = None
    # Devices the job trains on, one process each (server.gpus_per_job): None = every visible GPU,
    # 1 on a CPU; on a CPU a number above 1 runs that many gloo processes.
    devices: int | None = None
    # With several devices: "auto", "ddp" or "fsdp" (tuneline/server/distributed.py).
    parallelism: str = "auto"
    # The job asked for batch_size "auto": on a GPU the trainer sizes it (auto_gpu_batch_size).
    batch_size_auto: bool = False
    # Pack short examples into shared rows (False: one padded row per example, for comparison).
    packing: bool = True
    # Packed rows up to this many tokens; None = the longest example of the batch.
    row_tokens: int | None = None
    gradient_checkpointing_above_params: int = GRADIENT_CHECKPOINTING_ABOVE_PARAMS
    # torch.compile the forward pass (pays on a GPU for long runs; see benchmarks/trainer.py).
    compile: bool = False
    # The loss's vocabulary projection: "auto" (liger-kernel on CUDA when installed), "chunked", "liger".
    loss_kernel: str = "auto"
    # "supervised", "dpo" (tuneline/server/preference.py) or "reinforcement" (reinforcement.py), and
    # the method's own settings: beta; grader, compute_multiplier, eval_interval, eval_samples.
    method: str = "supervised"
    method_settings: dict[str, Any] = field(default_factory=dict)
    # What a reinforcement job's graders need from the server (tuneline.server.graders.GraderSettings:
    # the score_model endpoint, the python limits); None: the defaults.
    grader_settings: Any = None


@dataclass
class TrainingOutcome:
    # The fine-tuned model; when stopped, the resumable state (None if no step was trained).
    model_dir: Path | None
    trained_tokens: int
    steps: int
    hyperparameters: Hyperparameters
    stopped: bool
    final_metrics: dict[str, float] = field(default_factory=dict)


class TrainingReporter(Protocol):
    def message(self, text: str, level: str = "info") -> None: ...

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None: ...

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None: ...

    def should_stop(self) -> bool: ...
