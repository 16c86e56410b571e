"""The training loop of one run: `Trainer` (used by train() in tuneline/server/training.py and by the
built-in model's build), the epoch order, the learning-rate schedule and the optimizer.

What a Trainer guarantees:
- epoch order: a seeded shuffle, length-sorted within windows of LENGTH_WINDOW batches, batch order
  shuffled again; the same (seed, epoch) gives the same batches, so a resumed run trains the batches
  the uninterrupted run would have;
- each step takes batch_size examples, packed into rows (tuneline/server/packing.py; padded rows for a
  model whose forward takes no position ids), shared out to the data-parallel ranks, and computes the
  mean loss over the whole batch's trained tokens without full-vocabulary logits
  (tuneline/server/losses.py);
- metrics are kept as tensors and reported in bursts (every step on a CPU, every 10 on a GPU); a
  non-finite loss or gradient norm raises TrainingDiverged when reported, before any later save;
- `state()` / `restore()` carry the step, epoch, optimizer and RNG state for an exact resume;
- `dry_run()` runs the largest batch's forward and backward with the optimizer's state allocated and
  leaves nothing behind (tuneline/server/gpu_memory.py calls it on a GPU).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneline.server.chat_template import ChatFormat, EncodedExample
from tuneline.server.distributed import Ranks, load_optimizer_state, wrap
from tuneline.server.hyperparameters import Hyperparameters
from tuneline.server.losses import CausalLMLoss
from tuneline.server.modeling import context_length
from tuneline.server.packing import Batch, collate, pack_rows, trained_targets
from tuneline.server.training_errors import TrainingDiverged
from tuneline.server.training_spec import TrainingReporter

WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 20
GRADIENT_CLIP = 1.0
# Batches are drawn in windows of this many batches, sorted by length inside a window: little padding,
# and still a random mix of examples across the epoch.
LENGTH_WINDOW = 16


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
