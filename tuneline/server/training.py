"""Supervised fine-tuning for `tuneline serve`: real gradient descent on a causal LM.

What `train` guarantees:
- the loss is taken only on assistant turns whose weight is not 0 (tuneline/server/chat_template.py);
- n_epochs, batch_size and learning_rate_multiplier are honoured; the peak learning rate is the
  model's base rate times the multiplier, with a short linear warm-up and a cosine decay;
- the same seed, data, hyperparameters and base model give the same weights (on CPU, bit for bit);
- one checkpoint per epoch, each a loadable model directory carrying the optimizer, RNG and step state
  (`training_state.pt`), so a run resumed from it ends exactly where an uninterrupted one does; a run
  stopped mid-epoch leaves such a state directory too, as `TrainingOutcome.model_dir`;
- `trained_tokens` = billable tokens (the example's tokens under the model's tokenizer, truncated to
  its context) x epochs;
- models above `lora_above_params` parameters train LoRA adapters (peft) instead of all weights.

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

Reporting: a metrics report every step (train loss and mean token accuracy on the trained tokens),
one validation batch every `validation_every` steps (about 25 per job), the whole validation file
at every epoch's end, then `checkpoint()`; `should_stop()` is asked before every step.

`python -m tuneline.server.training --demo` fine-tunes the built-in model on the demo support data
and prints the exact match before and after (eval set, held-out validation split, canary set) and
the training time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from tuneline.server.chat_template import IGNORE_INDEX, ChatFormat, EncodedExample
from tuneline.server.modeling import (
    MODEL_CARD,
    context_length,
    cpu_threads,
    load_causal_lm,
    load_tokenizer,
    parameter_count,
    pick_device,
)
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
# Models whose logits are the output embedding of the last hidden state, unscaled: their loss is taken
# on the hidden states of trained positions only (the vocabulary projection of the others is skipped).
SCALED_LOGITS_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


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


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    # Where the loss is taken: flat indices into the (rows x (width - 1)) next-token predictions, and
    # the tokens to predict there. Built on the CPU, so picking them never waits on a GPU.
    trained_positions: torch.Tensor
    targets: torch.Tensor
    tokens: int  # non-padding tokens
    trained_tokens: int


def collate(examples: Sequence[EncodedExample], pad_id: int, device: torch.device) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    shifted = labels[:, 1:].reshape(-1)
    positions = torch.nonzero(shifted != IGNORE_INDEX).flatten()
    targets = shifted[positions]
    tokens = sum(len(e.input_ids) for e in examples)
    pin = device.type == "cuda"

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.pin_memory() if pin else tensor).to(device, non_blocking=pin)

    return Batch(
        input_ids=moved(input_ids),
        attention_mask=moved(attention_mask),
        labels=moved(labels),
        trained_positions=moved(positions),
        targets=moved(targets),
        tokens=tokens,
        trained_tokens=int(positions.numel()),
    )


# -- the model's loss ----------------------------------------------------------------------------


class LossFunction:
    """Mean cross-entropy and token accuracy over the trained positions of a batch."""

    def __init__(self, model: Any) -> None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        prefix = getattr(inner, "base_model_prefix", "")
        backbone = getattr(inner, prefix, None) if prefix else None
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        scaled = any(
            getattr(inner.config, name, None) not in (None, 1, 1.0) for name in SCALED_LOGITS_ATTRIBUTES
        )
        self.model = model
        self.backbone = backbone if backbone is not None and backbone is not inner and not scaled else None
        self.head = head

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean loss, correct predictions, trained positions) of the batch."""
        if self.backbone is not None and self.head is not None:
            hidden = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
            picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, batch.trained_positions)
            logits = self.head(picked).float()
        else:
            output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            every = output.logits[:, :-1]
            logits = every.reshape(-1, every.shape[-1]).index_select(0, batch.trained_positions).float()
        if batch.trained_tokens == 0:
            return logits.sum() * 0.0, batch.targets.new_zeros(()), 0
        loss = F.cross_entropy(logits, batch.targets)
        correct = (logits.detach().argmax(dim=-1) == batch.targets).sum()
        return loss, correct, batch.trained_tokens


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
    try:
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)


@dataclass
class _Metrics:
    """Per-step figures, kept as tensors until flushed so a GPU is not synchronised every step."""

    pending: list[tuple[int, torch.Tensor, torch.Tensor, int, dict[str, float]]] = field(default_factory=list)
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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.format = ChatFormat(tokenizer)
        self.device = device
        self.hyperparameters = hyperparameters
        self.seed = seed
        self.peak = peak_learning_rate
        limit = context_length(model.config)
        self.train_data = [self.format.encode_example(e, limit) for e in train_examples]
        self.validation_data = [self.format.encode_example(e, limit) for e in validation_examples]
        self.lengths = [len(e.input_ids) for e in self.train_data]
        self.tokens_per_epoch = sum(self.lengths)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.steps_per_epoch = math.ceil(len(self.train_data) / hyperparameters.batch_size)
        self.total_steps = self.steps_per_epoch * hyperparameters.n_epochs
        self.validation_every = validation_every or max(5, math.ceil(self.total_steps / 25))
        self.loss = LossFunction(model)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.parameters, peak_learning_rate)
        self.autocast = device.type == "cuda"
        self.step = 0
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch already trained
        self.tokens_seen = 0
        self._validation_cursor = 0
        self._metrics = _Metrics()
        self._flush_every = 1 if device.type == "cpu" else 10

    # -- state --

    def state(self, fingerprint: str) -> dict[str, Any]:
        state: dict[str, Any] = {
            "fingerprint": fingerprint,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "tokens_seen": self.tokens_seen,
            "validation_cursor": self._validation_cursor,
            "optimizer": self.optimizer.state_dict(),
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
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["cpu_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self._metrics.last = dict(state.get("last_metrics", {}))

    # -- the loop --

    def batches_left_in_epoch(self) -> Iterator[list[int]]:
        batches = epoch_batches(self.lengths, self.hyperparameters.batch_size, self.seed, self.epoch)
        yield from batches[self.batch_in_epoch :]

    def train_step(self, indices: list[int], end_of_epoch: bool = False) -> None:
        """One optimizer step on the batch; at an epoch's end the whole validation set is scored too."""
        batch = collate([self.train_data[i] for i in indices], self.pad_id, self.device)
        lr = learning_rate_at(self.step, self.total_steps, self.peak)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, correct, count = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, GRADIENT_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.batch_in_epoch += 1
        self.tokens_seen += batch.tokens
        extra: dict[str, float] = {}
        if self.validation_data and self.step % self.validation_every == 0:
            extra = self.validation_batch()
        if end_of_epoch:
            extra.update(self.full_validation())
        self._metrics.pending.append((self.step, loss.detach(), correct, count, extra))

    def flush(self, reporter: TrainingReporter | None) -> None:
        """Report the buffered per-step metrics. `last_metrics` keeps the latest of each figure (the
        validation figures of the latest validation batch), as a checkpoint's metrics show them."""
        for step, loss, correct, count, extra in self._metrics.pending:
            data = {
                "train_loss": float(loss),
                "train_mean_token_accuracy": float(correct) / max(1, count),
                **extra,
            }
            self._metrics.last = {**self._metrics.last, "step": float(step), **data}
            if reporter is not None:
                reporter.metrics(step, self.total_steps, data)
        self._metrics.pending.clear()

    def maybe_flush(self, reporter: TrainingReporter | None) -> None:
        if len(self._metrics.pending) >= self._flush_every:
            self.flush(reporter)

    @torch.no_grad()
    def evaluate(self, examples: Sequence[EncodedExample]) -> tuple[float, float]:
        """(mean loss, mean token accuracy) over `examples`, weighted by trained tokens."""
        self.model.eval()
        total_loss = torch.zeros((), device=self.device)
        total_correct = torch.zeros((), device=self.device)
        total_count = 0
        size = max(self.hyperparameters.batch_size, 16)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        for begin in range(0, len(order), size):
            batch = collate([examples[i] for i in order[begin : begin + size]], self.pad_id, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss, correct, count = self.loss(batch)
            total_loss += loss.float() * count
            total_correct += correct
            total_count += count
        count = max(1, total_count)
        return float(total_loss) / count, float(total_correct) / count

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


# -- saving --------------------------------------------------------------------------------------


def save_model(model: Any, tokenizer: Any, directory: Path, base_model_dir: Path, lora: bool) -> None:
    """A loadable model directory: full weights (safetensors) or a LoRA adapter, plus the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    if lora:
        model.peft_config["default"].base_model_name_or_path = str(Path(base_model_dir).resolve())
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
    """(model, tokenizer, uses LoRA): the base model, or the state to resume from, ready to train."""
    tokenizer = load_tokenizer(spec.base_model_dir)
    lora = parameter_count(spec.base_model_dir) > spec.lora_above_params
    if not lora:
        return (
            load_causal_lm(spec.resume_from or spec.base_model_dir, device, torch.float32),
            tokenizer,
            False,
        )
    from peft import LoraConfig, PeftModel, get_peft_model

    # The frozen base in bf16 on a GPU that has it; the adapters are kept in float32 by peft.
    frozen = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
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
    return model, tokenizer, True


def train(spec: TrainingSpec, reporter: TrainingReporter) -> TrainingOutcome:
    """Fine-tune `spec.base_model_dir` on `spec.train_file` (see the module docstring for guarantees)."""
    threads = torch.get_num_threads()
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(spec.cpu_threads))
    try:
        return _train(spec, reporter, device)
    finally:
        torch.set_num_threads(threads)


def _train(spec: TrainingSpec, reporter: TrainingReporter, device: torch.device) -> TrainingOutcome:
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
    train_examples = read_examples(spec.train_file)
    validation_examples = read_examples(spec.validation_file) if spec.validation_file else []
    hp = spec.hyperparameters
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
    )
    if state is not None:
        trainer.restore(state)
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def save_state(directory: Path) -> Path:
        trainer.flush(reporter)
        save_model(trainer.model, tokenizer, _fresh_dir(directory), spec.base_model_dir, lora)
        torch.save(trainer.state(fingerprint), directory / STATE_FILE)
        return directory

    n_parameters = sum(p.numel() for p in model.parameters())
    if state is None:
        method = f"LoRA rank {LORA_RANK}" if lora else "full fine-tuning"
        reporter.message(
            f"Training on {device.type}: {n_parameters / 1e6:.1f}M parameters ({method}), "
            f"{len(train_examples)} examples, {trainer.tokens_per_epoch} tokens per epoch, {trainer.total_steps} steps"
        )
    last_saved: Path | None = Path(spec.resume_from) if spec.resume_from is not None else None
    saved_at_step = trainer.step
    while trainer.epoch < hp.n_epochs:
        batches = list(trainer.batches_left_in_epoch())
        for position, indices in enumerate(batches):
            if reporter.should_stop():
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
        reporter.checkpoint(trainer.step, last_saved, trainer.last_metrics)
    if last_saved is None:
        raise RuntimeError("no epoch was trained: n_epochs must be at least 1")
    final = output_dir / "model"
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
        n_examples,
        requested.n_epochs,
        requested.batch_size,
        requested.learning_rate_multiplier,
        auto_rules(base_dir),
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
