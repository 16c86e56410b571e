"""Supervised fine-tuning for `tuneline serve`: real gradient descent on a causal LM. This module is
the job's entry (`train(spec, reporter)`): loading, hyperparameters, checkpoints, devices; the loop
itself is tuneline/server/trainer.py, GPU memory planning tuneline/server/gpu_memory.py. DPO and
reinforcement jobs (`spec.method`) run through the same loop, checkpoints and resume with the Trainer
of their method (`make_trainer`: tuneline/server/preference.py, reinforcement.py), on one device.

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

"auto" hyperparameters are resolved by tuneline/server/hyperparameters.py. On a GPU, a job that asked
for an "auto" batch size (`TrainingSpec.batch_size_auto`) gets the largest power of two not above
n_examples / 200 that also fits the GPU's free memory for this model (auto_gpu_batch_size): the cap
of 32 is lifted, the memory decides. Base learning rates: the model card's (`tuneline_model.json`;
2e-3 for tuneline-tiny), else 5e-5 for full fine-tuning and 2e-4 for LoRA.

Reporting: a metrics report every step (train loss and mean token accuracy on the trained tokens),
one validation batch every `validation_every` steps (about 25 per job), the whole validation file
at every epoch's end, then `checkpoint()`; `should_stop()` is asked before every step.

`python -m tuneline.server.training_demo --demo` fine-tunes the built-in model on the demo support data
and prints the exact match before and after (eval set, held-out validation split, canary set) and
the training time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tuneline import jsonl
from tuneline.server.catalog import MODEL_CARD
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
    cpu_threads,
    load_causal_lm,
    load_tokenizer,
    parameter_count,
    pick_device,
)

# Re-exported: the names callers take from here (the worker, the built-in build, benchmarks).
from tuneline.server.trainer import GRADIENT_CLIP as GRADIENT_CLIP
from tuneline.server.trainer import Trainer as Trainer
from tuneline.server.trainer import autocast_dtype
from tuneline.server.trainer import epoch_batches as epoch_batches
from tuneline.server.trainer import make_optimizer as make_optimizer
from tuneline.server.training_errors import TrainingDiverged as TrainingDiverged
from tuneline.server.training_errors import TrainingError as TrainingError
from tuneline.server.training_errors import TrainingOutOfMemory
from tuneline.server.training_spec import TrainingOutcome as TrainingOutcome
from tuneline.server.training_spec import TrainingReporter as TrainingReporter
from tuneline.server.training_spec import TrainingSpec as TrainingSpec

STATE_FILE = "training_state.pt"
# Base learning rates of checkpoints that do not state their own in tuneline_model.json.
FULL_FINE_TUNE_LEARNING_RATE = 5e-5
LORA_LEARNING_RATE = 2e-4
LORA_RANK = 16


# -- data ----------------------------------------------------------------------------------------


# The keys a training line of each method must have (the files were checked by method_files.py).
METHOD_LINES = {
    "supervised": (("messages", "prompt"), "chat or prompt/completion lines"),
    "dpo": (("input",), "preference lines"),
    "reinforcement": (("messages",), "chat lines ending with a user message"),
}


def read_examples(path: Path, method: str = "supervised") -> list[dict[str, Any]]:
    """The examples of a JSONL training file (already valid per tuneline/server/method_files.py; read as
    every JSONL set is, tuneline/jsonl.py: a byte-order mark the server accepted is not a training error
    here)."""
    keys, what = METHOD_LINES[method]
    examples = []
    for line in jsonl.read_lines(str(path)):
        example = line.value
        if line.reason or not isinstance(example, dict) or not any(k in example for k in keys):
            raise ValueError(f"line {line.number} of {Path(path).name}: {method} fine-tuning takes {what}")
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
    if spec.method != "supervised":
        digest.update(json.dumps([spec.method, spec.method_settings], sort_keys=True).encode())
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
        # DPO and reinforcement jobs train on one device (tuneline/server/preference.py, reinforcement.py).
        world_size = world_size_for(spec.devices, device) if spec.method == "supervised" else 1
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


def make_trainer(
    spec: TrainingSpec,
    model: Any,
    tokenizer: Any,
    train_examples: list[dict[str, Any]],
    validation_examples: list[dict[str, Any]],
    hp: Any,
    peak_learning_rate: float,
    device: torch.device,
    ranks: Ranks,
    lora: bool,
) -> Trainer:
    """The Trainer of the job's method: supervised (trainer.py), DPO (preference.py) or
    reinforcement (reinforcement.py), all driven by the same loop (`_train`)."""
    options: dict[str, Any] = {
        "ranks": ranks,
        "packing": spec.packing,
        "row_tokens": spec.row_tokens,
        "compile": spec.compile,
        "loss_kernel": spec.loss_kernel,
    }
    common = (
        model,
        tokenizer,
        train_examples,
        validation_examples,
        hp,
        spec.seed,
        peak_learning_rate,
        device,
    )
    if spec.method == "dpo":
        from tuneline.server.preference import PreferenceTrainer

        beta = float(spec.method_settings.get("beta", 0.1))
        return PreferenceTrainer(*common, spec.validation_every, beta=beta, lora=lora, **options)
    if spec.method == "reinforcement":
        from tuneline.server.reinforcement import ReinforcementTrainer

        # A full fine-tune keeps a frozen copy of the base as its KL reference (LoRA: adapters disabled).
        reference = None if lora else load_causal_lm(spec.base_model_dir, device, torch.float32)
        return ReinforcementTrainer(
            *common,
            spec.validation_every,
            settings=spec.method_settings,
            lora=lora,
            reference_model=reference,
            grader_settings=spec.grader_settings,
            **options,
        )
    return Trainer(*common, spec.validation_every, **options)


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
    train_examples = read_examples(spec.train_file, spec.method)
    validation_examples = read_examples(spec.validation_file, spec.method) if spec.validation_file else []
    hp = spec.hyperparameters
    if state is not None and "batch_size" in state:
        hp = replace(hp, batch_size=int(state["batch_size"]))  # as sized when the run began
    trainer = make_trainer(
        spec,
        model,
        tokenizer,
        train_examples,
        validation_examples,
        hp,
        base_learning_rate(spec.base_model_dir, lora) * hp.learning_rate_multiplier,
        device,
        ranks,
        lora,
    )
    if device.type == "cuda" and spec.method == "supervised":
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
