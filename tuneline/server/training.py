"""Supervised fine-tuning for `tuneline serve`: real gradient descent on a causal LM. This module is
the job's entry (`train(spec, reporter)`): loading, hyperparameters, checkpoints, devices; the loop
itself is tuneline/server/trainer.py, GPU memory planning tuneline/server/gpu_memory.py.

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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tuneline.server.distributed import (
    Ranks,
    choose_strategy,
    full_model_state,
    optimizer_state,
    run_ranks,
    world_size_for,
)
from tuneline.server.gpu_memory import fit_to_memory
from tuneline.server.modeling import (
    MODEL_CARD,
    cpu_threads,
    load_causal_lm,
    load_tokenizer,
    parameter_count,
    pick_device,
)

# Re-exported: the names callers take from here (the worker, the built-in build, benchmarks).
from tuneline.server.trainer import GRADIENT_CLIP as GRADIENT_CLIP
from tuneline.server.trainer import Hyperparameters as Hyperparameters
from tuneline.server.trainer import Trainer as Trainer
from tuneline.server.trainer import TrainingReporter as TrainingReporter
from tuneline.server.trainer import autocast_dtype
from tuneline.server.trainer import epoch_batches as epoch_batches
from tuneline.server.trainer import make_optimizer as make_optimizer
from tuneline.server.training_errors import TrainingDiverged as TrainingDiverged
from tuneline.server.training_errors import TrainingError as TrainingError
from tuneline.server.training_errors import TrainingOutOfMemory
from tuneline.tokens import default_epochs

STATE_FILE = "training_state.pt"
# Base learning rates of checkpoints that do not state their own in tuneline_model.json.
FULL_FINE_TUNE_LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4
LORA_RANK = 16
# Models above this many parameters recompute each layer's activations in the backward pass.
GRADIENT_CHECKPOINTING_ABOVE_PARAMS = 2_000_000_000


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
        fit_to_memory(trainer, spec.batch_size_auto, reporter, resumed=state is not None)
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
