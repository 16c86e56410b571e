"""Supervised fine-tuning for `tuneline serve`: real gradient descent on a causal LM.

What `train` guarantees:
- the loss is taken only on assistant turns whose weight is not 0 (tuneline/server/chat_template.py),
  without full-vocabulary logits (tuneline/server/losses.py);
- n_epochs, batch_size (examples per optimizer step) and learning_rate_multiplier are honoured; the
  peak learning rate is the model's base rate times the multiplier, with a short linear warm-up and a
  cosine decay;
- a batch's examples are packed into rows (tuneline/server/packing.py): attention never crosses two
  examples and positions restart per example, so a packed step computes the loss and gradients of
  the same examples unpacked (to float summation order), on less padding;
- the same seed, data, hyperparameters and base model give the same weights (on CPU, bit for bit);
- one checkpoint per epoch, each a loadable model directory carrying the optimizer, RNG and step state
  (`training_state.pt`), so a run resumed from it ends exactly where an uninterrupted one does; a run
  stopped mid-epoch leaves such a state directory too, as `TrainingOutcome.model_dir`;
- `trained_tokens` = billable tokens (the example's tokens under the model's tokenizer, truncated to
  its context) x epochs;
- models above `lora_above_params` parameters train LoRA adapters (peft) instead of all weights;
- a non-finite loss or gradient fails the run with TrainingDiverged (`code` "training_diverged",
  naming the step and the likely cause) before anything of it is saved as a checkpoint; on a GPU, a
  batch that would not fit is found by a dry forward/backward of the largest batch before training
  and fails with TrainingOutOfMemory (`code` "out_of_memory", naming the setting to lower), never with
  a CUDA out-of-memory traceback. The job worker reads `code` from these TrainingError exceptions.

On a GPU: bf16 autocast where the GPU has it (float32 master weights), TF32 matmuls, fused AdamW,
gradient checkpointing above `gradient_checkpointing_above_params`, `torch.compile` when asked
(`TrainingSpec.compile`; measured by benchmarks/trainer.py), and `spec.devices` GPUs per job, data
parallel or sharded (tuneline/server/distributed.py).

"auto" hyperparameters: n_epochs by the hosted service's rule (tuneline.tokens.default_epochs);
batch_size the largest power of two not above n_examples / 200, between 1 and 32 (at least 200 steps
per epoch: a small model needs several hundred steps to learn from a few hundred examples; on ~1000
demo examples, 3 epochs at batch 4 reach eval exact match 0.94 where batch 8 reaches 0.86, in the same
time; larger sets get the larger batches that keep a CPU or GPU busier). On a GPU, a job that asked
for "auto" (`TrainingSpec.batch_size_auto`) gets the largest power of two not above n_examples / 200
that also fits the GPU's free memory for this model (auto_gpu_batch_size): the cap of 32 is lifted,
the memory decides. learning_rate_multiplier 1.0 (each model's base rate is tuned for its auto batch
sizes). Base rates: the model card's (`tuneline_model.json`; 2e-3 for tuneline-tiny), else 5e-5 for
full fine-tuning and 2e-4 for LoRA.

Reporting: a metrics report every step (train loss and mean token accuracy on the trained tokens),
one validation batch every `validation_every` steps (about 25 per job), the whole validation file
at every epoch's end, then `checkpoint()`; `should_stop()` is asked before every step.

`python -m tuneline.server.training --demo` fine-tunes the built-in model on the demo support data
and prints the exact match before and after (eval set, held-out validation split, canary set) and
the training time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from tuneline.server.chat_template import ChatFormat, EncodedExample
from tuneline.server.distributed import (
    Ranks,
    choose_strategy,
    full_model_state,
    load_optimizer_state,
    optimizer_state,
    run_ranks,
    world_size_for,
    wrap,
)
from tuneline.server.losses import CHUNK_TOKENS, CausalLMLoss
from tuneline.server.modeling import (
    MODEL_CARD,
    context_length,
    cpu_threads,
    load_causal_lm,
    load_tokenizer,
    parameter_count,
    pick_device,
)
from tuneline.server.packing import Batch, collate, pack_rows, trained_targets
from tuneline.tokens import default_epochs

STATE_FILE = "training_state.pt"
# Base learning rates of checkpoints that do not state their own in tuneline_model.json.
FULL_FINE_TUNE_LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4
LORA_RANK = 16
WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 20
GRADIENT_CLIP = 1.0
# Batches are drawn in windows of this many batches, sorted by length inside a window: little padding,
# and still a random mix of examples across the epoch.
LENGTH_WINDOW = 16
# Models above this many parameters recompute each layer's activations in the backward pass.
GRADIENT_CHECKPOINTING_ABOVE_PARAMS = 2_000_000_000
# The share of a GPU's free memory the auto batch size plans to use (the rest: allocator slack).
GPU_MEMORY_SHARE = 0.85


class TrainingError(RuntimeError):
    """A training run that cannot go on; `code` is the job's error code."""

    code = "training_failed"


class TrainingDiverged(TrainingError):
    code = "training_diverged"


class TrainingOutOfMemory(TrainingError):
    code = "out_of_memory"


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


class TrainingReporter(Protocol):
    def message(self, text: str, level: str = "info") -> None: ...

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None: ...

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass
class TrainingOutcome:
    # The fine-tuned model; when stopped, the resumable state (None if no step was trained).
    model_dir: Path | None
    trained_tokens: int
    steps: int
    hyperparameters: Hyperparameters
    stopped: bool
    final_metrics: dict[str, float] = field(default_factory=dict)


# -- data ----------------------------------------------------------------------------------------


def read_examples(path: Path) -> list[dict[str, Any]]:
    """The examples of a JSONL training file (already valid per tuneline/formats.py)."""
    examples = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            example = json.loads(raw)
            if not isinstance(example, dict) or not ("messages" in example or "prompt" in example):
                raise ValueError(
                    f"line {number} of {Path(path).name}: supervised fine-tuning takes chat or "
                    "prompt/completion lines"
                )
            examples.append(example)
    return examples


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (example indices) of one epoch: a seeded shuffle, sorted by length within windows
    of LENGTH_WINDOW batches, batch order shuffled again. The same (seed, epoch) gives the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * LENGTH_WINDOW
    batches: list[list[int]] = []
    for begin in range(0, len(order), window):
        chunk = sorted(order[begin : begin + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


# -- the run -------------------------------------------------------------------------------------


def data_fingerprint(spec: TrainingSpec) -> str:
    """What a resumed run must share with the run it resumes: the data, hyperparameters and seed."""
    digest = hashlib.sha256()
    for path in (spec.train_file, spec.validation_file):
        digest.update(b"\0")
        if path is not None:
            digest.update(Path(path).read_bytes())
    digest.update(json.dumps([spec.hyperparameters.__dict__, spec.seed], sort_keys=True).encode())
    return digest.hexdigest()


def base_learning_rate(model_dir: Path, lora: bool) -> float:
    card = Path(model_dir) / MODEL_CARD
    if card.is_file():
        rate = json.loads(card.read_text(encoding="utf-8")).get("learning_rate")
        if isinstance(rate, int | float) and rate > 0:
            return float(rate)
    return LORA_LEARNING_RATE if lora else FULL_FINE_TUNE_LEARNING_RATE


def learning_rate_at(step: int, total_steps: int, peak: float) -> float:
    """Linear warm-up over WARMUP_FRACTION of the steps (at most MAX_WARMUP_STEPS), cosine decay to 0."""
    warmup = max(1, min(MAX_WARMUP_STEPS, int(total_steps * WARMUP_FRACTION)))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters) where this torch and device have it."""
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a GPU that has bf16; None (float32) elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


@dataclass
class _Metrics:
    """Per-step figures, kept as tensors until flushed so a GPU is not synchronised every step:
    (step, [summed loss, right predictions] over all ranks, trained tokens, gradient norm, extra)."""

    pending: list[tuple[int, torch.Tensor, int, torch.Tensor, dict[str, float]]] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)


class Trainer:
    """One fine-tuning run: model, data, optimizer and the loop. Used by `train` and by the built-in
    model's build (which trains from random weights on the general corpus)."""

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
        ranks: Ranks | None = None,
        packing: bool = True,
        row_tokens: int | None = None,
        compile: bool = False,
        loss_kernel: str = "auto",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.device = device
        self.ranks = ranks or Ranks()
        self.seed = seed
        self.peak = peak_learning_rate
        limit = context_length(model.config)
        self.train_data = [self.format.encode_example(e, limit) for e in train_examples]
        self.validation_data = [self.format.encode_example(e, limit) for e in validation_examples]
        self.lengths = [len(e.input_ids) for e in self.train_data]
        self.targets = [trained_targets(e) for e in self.train_data]
        self.tokens_per_epoch = sum(self.lengths)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self._validation_every = validation_every
        self.resize(hyperparameters)
        self.loss = CausalLMLoss(model, loss_kernel)
        self.packed = packing and self.loss.takes_positions
        attention = str(getattr(model.config, "_attn_implementation", "") or "")
        # Flash-attention reads example boundaries from the positions of a single row (varlen).
        self.one_row = self.packed and attention.startswith("flash_attention")
        self.row_tokens = row_tokens
        self.forward: Any = wrap(self.loss, model, self.ranks, device)
        if compile:
            self.forward = torch.compile(self.forward, dynamic=True)
        self.parameters = [p for p in self.forward.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.parameters, peak_learning_rate)
        self.autocast = autocast_dtype(device)
        self.step = 0
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch already trained
        self.tokens_seen = 0
        self._validation_cursor = 0
        self._metrics = _Metrics()
        self._flush_every = 1 if device.type == "cpu" else 10

    def resize(self, hyperparameters: Hyperparameters) -> None:
        """Set the hyperparameters (the batch size decides the steps); before the first step only."""
        self.hyperparameters = hyperparameters
        self.steps_per_epoch = math.ceil(len(self.train_data) / hyperparameters.batch_size)
        self.total_steps = self.steps_per_epoch * hyperparameters.n_epochs
        self.validation_every = self._validation_every or max(5, math.ceil(self.total_steps / 25))

    # -- state --

    def state(self, fingerprint: str, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
        state: dict[str, Any] = {
            "fingerprint": fingerprint,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "batch_size": self.hyperparameters.batch_size,
            "tokens_seen": self.tokens_seen,
            "validation_cursor": self._validation_cursor,
            "optimizer": optimizer if optimizer is not None else self.optimizer.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "last_metrics": dict(self._metrics.last),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.tokens_seen = int(state["tokens_seen"])
        self._validation_cursor = int(state["validation_cursor"])
        load_optimizer_state(self.forward, self.optimizer, state["optimizer"], self.ranks)
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._metrics.last = dict(state.get("last_metrics", {}))

    # -- batches --

    def batches_left_in_epoch(self) -> Iterator[list[int]]:
        batches = epoch_batches(self.lengths, self.hyperparameters.batch_size, self.seed, self.epoch)
        yield from batches[self.batch_in_epoch :]

    def local_share(self, examples: Sequence[EncodedExample]) -> list[EncodedExample]:
        """This rank's examples of a batch (all of them on one rank)."""
        return [examples[i] for i in self.ranks.share([len(e.input_ids) for e in examples])]

    def collate(self, examples: Sequence[EncodedExample]) -> Batch:
        if not self.packed:
            return collate(examples, self.pad_id, self.device, packed=False)
        width = sum(len(e.input_ids) for e in examples) if self.one_row else self.row_tokens
        return collate(examples, self.pad_id, self.device, width=width)

    def batch_shape(self, examples: Sequence[EncodedExample]) -> tuple[int, int]:
        """(rows, width) that `collate` gives these examples, without building tensors."""
        lengths = [len(e.input_ids) for e in examples]
        if not lengths:
            return 1, 1
        if not self.packed:
            return len(lengths), max(lengths)
        if self.one_row:
            return 1, sum(lengths)
        rows = pack_rows(lengths, max(max(lengths), self.row_tokens or 0))
        return len(rows), max(sum(lengths[i] for i in row) for row in rows)

    # -- the loop --

    def _losses(self, batch: Batch, module: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, right predictions) of this rank's batch, through `module` (default: the
        wrapped forward)."""
        precision = (
            torch.autocast(self.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with precision:
            return (module or self.forward)(  # type: ignore[no-any-return]
                batch.input_ids,
                batch.position_ids,
                batch.attention_mask,
                batch.trained_positions,
                batch.targets,
            )

    def train_step(self, indices: list[int], end_of_epoch: bool = False) -> None:
        """One optimizer step on the batch; at an epoch's end the whole validation set is scored too."""
        examples = [self.train_data[i] for i in indices]
        trained = sum(self.targets[i] for i in indices)  # of the whole batch, over every rank
        batch = self.collate(self.local_share(examples))
        lr = learning_rate_at(self.step, self.total_steps, self.peak)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss, correct = self._losses(batch)
        # The mean over the whole batch's trained tokens; data-parallel ranks average their gradients.
        (loss * (self.ranks.world_size / max(1, trained))).backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, GRADIENT_CLIP)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a replicated DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batch_in_epoch += 1
        self.tokens_seen += sum(self.lengths[i] for i in indices)
        figures = self.ranks.sum(torch.stack([loss.detach().float(), correct.float()]))
        extra: dict[str, float] = {}
        if self.validation_data and self.step % self.validation_every == 0:
            extra = self.validation_batch()
        if end_of_epoch:
            extra.update(self.full_validation())
        self._metrics.pending.append((self.step, figures, trained, norm.detach(), extra))

    def flush(self, reporter: TrainingReporter | None) -> None:
        """Report the buffered per-step metrics. `last_metrics` keeps the latest of each figure (the
        validation figures of the latest validation batch), as a checkpoint's metrics show them.
        Raises TrainingDiverged at the first step whose loss or gradient is not finite."""
        for step, figures, trained, norm, extra in self._metrics.pending:
            loss_sum, correct = figures.tolist()
            loss = loss_sum / max(1, trained)
            if not (math.isfinite(loss) and math.isfinite(float(norm))):
                self._metrics.pending.clear()
                raise TrainingDiverged(self._divergence(step, loss, float(norm)))
            data = {"train_loss": loss, "train_mean_token_accuracy": correct / max(1, trained), **extra}
            self._metrics.last = {**self._metrics.last, "step": float(step), **data}
            if reporter is not None:
                reporter.metrics(step, self.total_steps, data)
        self._metrics.pending.clear()

    def _divergence(self, step: int, loss: float, norm: float) -> str:
        what = f"the training loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
        multiplier = self.hyperparameters.learning_rate_multiplier
        if multiplier > 1:
            cause = (
                f"a learning rate too high for this model and data (learning_rate_multiplier {multiplier:g}, "
                f"peak learning rate {self.peak:.3g})"
            )
        else:
            cause = (
                f"values too large for {self.autocast or torch.float32} at peak learning rate {self.peak:.3g}"
            )
        return (
            f"Training diverged at step {step} of {self.total_steps}: {what}. Likely cause: {cause}; "
            "lower learning_rate_multiplier."
        )

    def maybe_flush(self, reporter: TrainingReporter | None) -> None:
        if len(self._metrics.pending) >= self._flush_every:
            self.flush(reporter)

    @torch.no_grad()
    def evaluate(self, examples: Sequence[EncodedExample]) -> tuple[float, float]:
        """(mean loss, mean token accuracy) over `examples`, weighted by trained tokens."""
        self.model.eval()
        totals = torch.zeros(2, device=self.device)
        total_count = 0
        size = max(self.hyperparameters.batch_size, 16)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        for begin in range(0, len(order), size):
            chunk = [examples[i] for i in order[begin : begin + size]]
            loss, correct = self._losses(self.collate(self.local_share(chunk)))
            totals += torch.stack([loss.float(), correct.float()])
            total_count += sum(trained_targets(e) for e in chunk)
        loss_sum, correct_sum = self.ranks.sum(totals).tolist()
        count = max(1, total_count)
        return loss_sum / count, correct_sum / count

    def validation_batch(self) -> dict[str, float]:
        size = self.hyperparameters.batch_size
        picked = [
            self.validation_data[(self._validation_cursor + i) % len(self.validation_data)]
            for i in range(min(size, len(self.validation_data)))
        ]
        self._validation_cursor = (self._validation_cursor + len(picked)) % len(self.validation_data)
        loss, accuracy = self.evaluate(picked)
        return {"valid_loss": loss, "valid_mean_token_accuracy": accuracy}

    def full_validation(self) -> dict[str, float]:
        if not self.validation_data:
            return {}
        loss, accuracy = self.evaluate(self.validation_data)
        return {"full_valid_loss": loss, "full_valid_mean_token_accuracy": accuracy}

    def end_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0

    @property
    def last_metrics(self) -> dict[str, float]:
        return dict(self._metrics.last)

    # -- memory (GPU) --

    def largest_batch(self) -> list[EncodedExample]:
        """This rank's share of the batch, among every batch left in the run, that `collate` makes
        the most tokens of (rows x width): the one a dry run must fit."""
        best: list[EncodedExample] = []
        best_size = -1
        for epoch in range(self.epoch, self.hyperparameters.n_epochs):
            for indices in epoch_batches(self.lengths, self.hyperparameters.batch_size, self.seed, epoch):
                share = self.local_share([self.train_data[i] for i in indices])
                rows, width = self.batch_shape(share)
                if rows * width > best_size:
                    best, best_size = share, rows * width
        return best

    def dry_run(self) -> None:
        """A forward and backward pass of the largest batch, with the optimizer's state allocated
        beside it (AdamW: two float32 values per trained parameter): raises torch.cuda.OutOfMemoryError
        when the run would not fit. Leaves no gradient, optimizer state or RNG draw behind."""
        examples = self.largest_batch()
        reserve: torch.Tensor | None = None
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                count = sum(p.numel() for p in self.parameters if not self.optimizer.state.get(p))
                reserve = torch.empty(2 * count, dtype=torch.float32, device=self.device)
                self.model.train()
                # Under DDP, the unwrapped module: no collective that a rank out of memory would leave waiting.
                module = self.loss if self.ranks.strategy == "ddp" else None
                loss, _ = self._losses(self.collate(examples), module)
                (loss * 0.0).backward()
        finally:
            del reserve
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


# -- GPU memory planning -------------------------------------------------------------------------


def activation_bytes_per_token(config: Any, checkpointing: bool) -> int:
    """Activation memory one token of a step keeps for the backward pass, all layers (bf16 autocast,
    SDPA attention; fitted to the H200 reference runs of shared/gpu: about 140 KB a layer for a
    2048-wide Llama, 73 KB for a 768-wide GPT-2). With gradient checkpointing: each layer's input,
    plus one layer's activations during its recomputation."""
    layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 1)
    width = int(getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 1)
    inner = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width)
    per_layer = 48 * width + 12 * inner
    if checkpointing:
        return 4 * width * layers + per_layer
    return per_layer * layers


def auto_gpu_batch_size(
    n_examples: int,
    mean_length: float,
    config: Any,
    trainable_parameters: int,
    checkpointing: bool,
    free_bytes: int,
    world_size: int = 1,
    sharded: bool = False,
) -> int:
    """Examples per step for an "auto" job on GPUs: the largest power of two not above
    n_examples / 200 (at least 200 steps an epoch, as on a CPU, without the CPU's cap of 32) whose
    share per GPU fits GPU_MEMORY_SHARE of `free_bytes` (free after the model is loaded): gradients
    and AdamW state (12 bytes a trained parameter, sharded or not), the loss's logits chunk
    (3 x CHUNK_TOKENS x vocabulary x 4 bytes) and the activations of every token of the step."""
    by_data = 1 if n_examples < 400 else 2 ** math.floor(math.log2(n_examples / 200))
    states = 12 * trainable_parameters / (world_size if sharded else 1)
    vocabulary = int(getattr(config, "vocab_size", 0) or 0)
    loss = 3 * CHUNK_TOKENS * vocabulary * 4
    room = GPU_MEMORY_SHARE * free_bytes - states - loss
    tokens = room / activation_bytes_per_token(config, checkpointing)
    per_gpu = tokens / max(1.0, mean_length)
    by_memory = 2 ** math.floor(math.log2(per_gpu)) * world_size if per_gpu >= 1 else world_size
    return int(max(1, min(by_data, by_memory)))


# -- saving --------------------------------------------------------------------------------------


def save_model(
    model: Any,
    tokenizer: Any,
    directory: Path,
    base_model_dir: Path,
    lora: bool,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """A loadable model directory: full weights (safetensors) or a LoRA adapter, plus the tokenizer.
    `state_dict`: the weights to write when the model's own are sharded (FSDP)."""
    directory.mkdir(parents=True, exist_ok=True)
    if lora:
        model.peft_config["default"].base_model_name_or_path = str(Path(base_model_dir).resolve())
    if state_dict is not None:
        model.save_pretrained(str(directory), state_dict=state_dict)
    else:
        model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    card = Path(base_model_dir) / MODEL_CARD
    if card.is_file() and not lora:
        shutil.copyfile(card, directory / MODEL_CARD)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def _link_or_copy_model(source: Path, target: Path) -> None:
    """The model files of a checkpoint (not its training state) as a separate directory; hard links
    when the file system allows, so the final model costs no second copy of the weights."""
    _fresh_dir(target).mkdir(parents=True)
    for item in source.iterdir():
        if item.name == STATE_FILE or not item.is_file():
            continue
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)


# -- the entry point -----------------------------------------------------------------------------


def load_for_training(spec: TrainingSpec, device: torch.device) -> tuple[Any, Any, bool]:
    """(model, tokenizer, uses LoRA): the base model, or the state to resume from, ready to train
    (gradient checkpointing on above spec.gradient_checkpointing_above_params)."""
    tokenizer = load_tokenizer(spec.base_model_dir)
    parameters = parameter_count(spec.base_model_dir)
    lora = parameters > spec.lora_above_params
    checkpointing = parameters > spec.gradient_checkpointing_above_params
    if not lora:
        model = load_causal_lm(spec.resume_from or spec.base_model_dir, device, torch.float32)
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        # The frozen base in bf16 on a GPU that has it; the adapters are kept in float32 by peft.
        frozen = autocast_dtype(device) or torch.float32
        base = load_causal_lm(spec.base_model_dir, device, frozen)
        if spec.resume_from is not None:
            model = PeftModel.from_pretrained(base, str(spec.resume_from), is_trainable=True)
        else:
            config = LoraConfig(
                r=LORA_RANK,
                lora_alpha=2 * LORA_RANK,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(base, config)
        model.to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device.type == "cuda":
        _use_flash_attention(model)
    return model, tokenizer, lora


def _use_flash_attention(model: Any) -> None:
    """flash-attention 2 when it is installed and the architecture takes it: packed batches then run
    as one row whose examples its varlen kernels keep apart (Trainer.one_row). SDPA otherwise."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    with contextlib.suppress(ValueError, ImportError, AttributeError, NotImplementedError):
        inner.set_attn_implementation("flash_attention_2")


def train(spec: TrainingSpec, reporter: TrainingReporter) -> TrainingOutcome:
    """Fine-tune `spec.base_model_dir` on `spec.train_file` (see the module docstring for guarantees).
    With spec.devices above 1, this process is rank 0 of the job and starts the others itself."""
    threads = torch.get_num_threads()
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(spec.cpu_threads))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        world_size = world_size_for(spec.devices, device)
        if world_size > 1:
            return run_ranks(spec, reporter, world_size, device, run_rank)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return run_rank(spec, reporter, device, Ranks())
    finally:
        torch.set_num_threads(threads)


def run_rank(
    spec: TrainingSpec, reporter: TrainingReporter, device: torch.device, ranks: Ranks
) -> TrainingOutcome:
    """The run, as one rank of the job (the only one, or one of spec.devices)."""
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(spec.cpu_threads))
    try:
        return _train(spec, reporter, device, ranks)
    except torch.cuda.OutOfMemoryError as exc:
        raise TrainingOutOfMemory(
            f"The GPU ran out of memory during training ({_first_line(exc)}): lower batch_size, or "
            "give the job more GPUs (server.gpus_per_job)."
        ) from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _fit_to_memory(trainer: Trainer, spec: TrainingSpec, reporter: TrainingReporter, resumed: bool) -> None:
    """On a GPU: an "auto" batch sized from free memory, then the dry run of the largest batch; an
    "auto" batch that does not fit is halved until it does. Raises TrainingOutOfMemory."""
    hp = trainer.hyperparameters
    ranks = trainer.ranks
    if spec.batch_size_auto and not resumed:
        free, _ = torch.cuda.mem_get_info(trainer.device)
        trainable = sum(p.numel() for p in trainer.parameters)  # a sharded tensor counts whole
        batch = auto_gpu_batch_size(
            len(trainer.train_data),
            trainer.tokens_per_epoch / max(1, len(trainer.train_data)),
            trainer.model.config,
            trainable,
            _checkpointing(trainer.model),
            free,
            ranks.world_size,
            ranks.strategy == "fsdp",
        )
        trainer.resize(replace(hp, batch_size=_agreed_minimum(batch, ranks)))
    while True:
        fits = True
        try:
            trainer.dry_run()
        except torch.cuda.OutOfMemoryError:
            fits = False
        fits = not ranks.agree_any(not fits)
        if fits:
            break
        size = trainer.hyperparameters.batch_size
        if spec.batch_size_auto and size > 1 and not resumed:
            reporter.message(f"batch_size {size} does not fit in GPU memory; trying {size // 2}", "warning")
            trainer.resize(replace(trainer.hyperparameters, batch_size=size // 2))
            continue
        tokens = sum(len(e.input_ids) for e in trainer.largest_batch())
        if size > 1:
            advice = f'lower batch_size (now {size}) or leave it "auto"'
        else:
            advice = "give the job more GPUs (server.gpus_per_job) or train LoRA adapters (server.lora_above_params)"
        raise TrainingOutOfMemory(
            f"The job does not fit in GPU memory: a dry run of its largest batch ({tokens} tokens on each "
            f"GPU) ran out of memory before training started: {advice}."
        )


def _checkpointing(model: Any) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any(getattr(m, "gradient_checkpointing", False) for m in inner.modules())


def _agreed_minimum(value: int, ranks: Ranks) -> int:
    if not ranks.distributed:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=ranks.control)
    return int(tensor.item())


def _train(
    spec: TrainingSpec, reporter: TrainingReporter, device: torch.device, ranks: Ranks
) -> TrainingOutcome:
    torch.manual_seed(spec.seed)
    fingerprint = data_fingerprint(spec)
    state: dict[str, Any] | None = None
    if spec.resume_from is not None:
        state = torch.load(Path(spec.resume_from) / STATE_FILE, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ValueError(
                f"cannot resume from {spec.resume_from}: it was trained on other data, hyperparameters or seed"
            )
    model, tokenizer, lora = load_for_training(spec, device)
    n_parameters = sum(p.numel() for p in model.parameters())
    if ranks.distributed:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ranks.strategy = choose_strategy(spec.parallelism, lora, trainable, device)
    train_examples = read_examples(spec.train_file)
    validation_examples = read_examples(spec.validation_file) if spec.validation_file else []
    hp = spec.hyperparameters
    if state is not None and "batch_size" in state:
        hp = replace(hp, batch_size=int(state["batch_size"]))  # as sized when the run began
    trainer = Trainer(
        model,
        tokenizer,
        train_examples,
        validation_examples,
        hp,
        spec.seed,
        base_learning_rate(spec.base_model_dir, lora) * hp.learning_rate_multiplier,
        device,
        spec.validation_every,
        ranks=ranks,
        packing=spec.packing,
        row_tokens=spec.row_tokens,
        compile=spec.compile,
        loss_kernel=spec.loss_kernel,
    )
    if device.type == "cuda":
        _fit_to_memory(trainer, spec, reporter, resumed=state is not None)
    hp = trainer.hyperparameters
    if state is not None:
        trainer.restore(state)
    output_dir = Path(spec.output_dir)
    if ranks.main:
        output_dir.mkdir(parents=True, exist_ok=True)

    def save_state(directory: Path) -> Path:
        trainer.flush(reporter)
        weights = full_model_state(trainer.forward, ranks)
        optimizer = optimizer_state(trainer.forward, trainer.optimizer, ranks)
        if ranks.main:
            save_model(trainer.model, tokenizer, _fresh_dir(directory), spec.base_model_dir, lora, weights)
            torch.save(trainer.state(fingerprint, optimizer), directory / STATE_FILE)
        ranks.barrier()
        return directory

    if state is None:
        method = f"LoRA rank {LORA_RANK}" if lora else "full fine-tuning"
        layout = "packed rows" if trainer.packed else "padded rows"
        devices = (
            f"{ranks.world_size} x {device.type} ({ranks.strategy})" if ranks.distributed else device.type
        )
        reporter.message(
            f"Training on {devices}: {n_parameters / 1e6:.1f}M parameters ({method}), "
            f"{len(train_examples)} examples, {trainer.tokens_per_epoch} tokens per epoch, "
            f"{trainer.total_steps} steps of {hp.batch_size} examples ({layout})"
        )
    last_saved: Path | None = Path(spec.resume_from) if spec.resume_from is not None else None
    saved_at_step = trainer.step
    while trainer.epoch < hp.n_epochs:
        batches = list(trainer.batches_left_in_epoch())
        for position, indices in enumerate(batches):
            if ranks.agree(reporter.should_stop() if ranks.main else False):
                trainer.flush(reporter)
                if trainer.step > saved_at_step:
                    last_saved = save_state(output_dir / f"resume-step-{trainer.step}")
                return TrainingOutcome(
                    last_saved, trainer.tokens_seen, trainer.step, hp, True, trainer.last_metrics
                )
            trainer.train_step(indices, end_of_epoch=position == len(batches) - 1)
            trainer.maybe_flush(reporter)
        trainer.end_epoch()
        last_saved = save_state(output_dir / f"ckpt-step-{trainer.step}")
        saved_at_step = trainer.step
        if ranks.main:
            reporter.checkpoint(trainer.step, last_saved, trainer.last_metrics)
    if last_saved is None:
        raise RuntimeError("no epoch was trained: n_epochs must be at least 1")
    final = output_dir / "model"
    if ranks.main:
        _link_or_copy_model(last_saved, final)
    return TrainingOutcome(
        final,
        trainer.tokens_per_epoch * hp.n_epochs,
        trainer.step,
        hp,
        False,
        trainer.last_metrics,
    )


# -- the demo: `python -m tuneline.server.training --demo` ---------------------------------------


def exact_match(chat: Any, examples: Sequence[dict[str, Any]], max_tokens: int = 192) -> float:
    """The share of examples whose greedy answer, stripped, equals the last assistant turn's text
    (asked 16 at a time: a ChatModel decodes concurrent requests as one batch)."""
    from concurrent.futures import ThreadPoolExecutor

    from tuneline.formats import message_text
    from tuneline.server.chat_template import chat_messages

    if not examples:
        return 0.0

    def right(example: dict[str, Any]) -> bool:
        messages = chat_messages(example)
        answer = chat.generate(messages[:-1], temperature=0.0, max_tokens=max_tokens).text.strip()
        return answer == message_text(messages[-1]).strip()

    with ThreadPoolExecutor(max_workers=16) as pool:
        return sum(pool.map(right, examples)) / len(examples)


def demo_training_lines(raw_dir: Path, eval_examples: Sequence[dict[str, Any]]) -> list[bytes]:
    """The demo's training file from the raw partitions: every valid chat or prompt/completion JSONL
    line within tuneline-tiny's context, minus lines asking an eval question (the pipeline's prepare
    stage also removes duplicates, contradictions and secrets; this is the quick path for a demo of the
    trainer alone)."""
    from tuneline.config import ValidationConfig
    from tuneline.formats import check_example
    from tuneline.server.chat_template import chat_messages
    from tuneline.server.modeling import BUILTIN_MODEL
    from tuneline.tokens import count_tokens, get_encoding

    limit = ValidationConfig().context_limits[BUILTIN_MODEL]
    encoding = get_encoding("o200k_base")

    def prompt_key(example: dict[str, Any]) -> str:
        return json.dumps(chat_messages(example)[:-1], sort_keys=True)

    asked = {prompt_key(e) for e in eval_examples}
    lines = []
    for path in sorted(Path(raw_dir).rglob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            try:
                example = json.loads(raw)
            except ValueError:
                continue
            if (
                check_example(example, allowed=("chat", "completion")) is None
                and prompt_key(example) not in asked
                and count_tokens([example], encoding)[0] <= limit
            ):
                lines.append(raw)
    return lines


class PrintingReporter:
    """A reporter for the command line: progress on stderr, never stops."""

    def __init__(self, every: int = 20) -> None:
        self.every = every

    def message(self, text: str, level: str = "info") -> None:
        import sys

        print(f"[{level}] {text}", file=sys.stderr, flush=True)

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        if step % self.every == 0 or step == total_steps or "full_valid_loss" in data:
            figures = ", ".join(f"{k}={v:.3f}" for k, v in data.items())
            self.message(f"Step {step}/{total_steps}: {figures}")

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        self.message(f"Checkpoint created at step {step}: {model_dir}")

    def should_stop(self) -> bool:
        return False


def demo(
    work_dir: Path,
    data_dir: Path | None = None,
    train_file: Path | None = None,
    validation_file: Path | None = None,
    seed: int = 42,
) -> dict[str, Any]:
    """Fine-tune tuneline-tiny on the demo support data as configs/local.yaml trains it: its
    hyperparameters and its share of general data replayed against forgetting.

    Without a prepared train file, the raw partitions' valid lines are split by a hash of each line:
    90% to train on, 10% held out as the validation file, and general lines are added to the training
    file at `export.general_mix_fraction`. Returns the exact match of the base and the fine-tuned model
    on the eval set (held-out tickets), on the validation split, on the paraphrase stress set (sentences
    training never shows) and on the canary set, with the build and training times (wall clock and the
    CPU seconds of the training process, which a busy machine does not inflate)."""
    from tuneline.config import load_config
    from tuneline.paths import DATA_DIR
    from tuneline.server.builtin import ensure_builtin_model
    from tuneline.server.modeling import ChatModel

    data = Path(data_dir) if data_dir else DATA_DIR
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    base_dir = ensure_builtin_model(
        work_dir / "state", data / "general" / "general_chat.jsonl", data / "general" / "canary.jsonl"
    )
    build_seconds = time.monotonic() - started
    config = load_config()
    eval_examples = read_examples(data / "eval" / "support_eval.jsonl")
    paraphrases = read_examples(data / "eval" / "support_paraphrases.jsonl")
    canary = read_examples(data / "general" / "canary.jsonl")
    if train_file is None:
        lines = demo_training_lines(data / "raw" / "support", eval_examples)
        held_out = [line for line in lines if hashlib.sha256(line).digest()[0] < 26]  # about 10%
        kept = [line for line in lines if hashlib.sha256(line).digest()[0] >= 26]
        general = sorted(
            (data / "general" / "general_chat.jsonl").read_bytes().splitlines(),
            key=lambda line: hashlib.sha256(line).digest(),
        )
        kept += general[: config.export.general_examples_for(len(kept))]
        train_file, validation_file = work_dir / "train.jsonl", work_dir / "validation.jsonl"
        train_file.write_bytes(b"\n".join(kept) + b"\n")
        validation_file.write_bytes(b"\n".join(held_out) + b"\n")
    validation = read_examples(validation_file) if validation_file else []
    n_examples = len(read_examples(train_file))
    base = ChatModel.load(base_dir)
    sets = {"eval": eval_examples, "validation": validation, "paraphrases": paraphrases, "canary": canary}
    before = {name: exact_match(base, examples) for name, examples in sets.items()}
    requested = config.training.hyperparameters
    hyperparameters = resolve_hyperparameters(
        n_examples, requested.n_epochs, requested.batch_size, requested.learning_rate_multiplier
    )
    spec = TrainingSpec(base_dir, train_file, validation_file, work_dir / "run", hyperparameters, seed)
    started, cpu_started = time.monotonic(), time.process_time()
    outcome = train(spec, PrintingReporter())
    train_seconds, train_cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    assert outcome.model_dir is not None
    tuned = ChatModel.load(outcome.model_dir)
    after = {name: exact_match(tuned, examples) for name, examples in sets.items()}
    return {
        "examples": n_examples,
        "validation_examples": len(validation),
        "hyperparameters": hyperparameters.__dict__,
        "steps": outcome.steps,
        "trained_tokens": outcome.trained_tokens,
        "build_seconds": round(build_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "load_average": round(os.getloadavg()[0], 1),
        **{f"{name}_exact_match": {"base": before[name], "fine_tuned": after[name]} for name in sets},
    }


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tuneline.server.training", description=__doc__)
    parser.add_argument(
        "--demo", action="store_true", help="fine-tune tuneline-tiny on the demo support data"
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="the demo data (default data/)")
    parser.add_argument("--train-file", type=Path, default=None, help="a prepared train.jsonl to use instead")
    parser.add_argument("--validation-file", type=Path, default=None, help="its validation.jsonl")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where to build and train (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if not args.demo:
        parser.print_help()
        return 2
    with tempfile.TemporaryDirectory(prefix="tuneline-demo-") as scratch:
        result = demo(
            args.work_dir or Path(scratch), args.data_dir, args.train_file, args.validation_file, args.seed
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
