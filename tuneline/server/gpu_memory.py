"""How much a training job puts on a GPU: the "auto" batch size from free memory, and the dry run that
catches a batch too large for the GPU before training starts.

What `fit_to_memory` guarantees (on a GPU; train() calls it before the first step):
- a job that asked for batch_size "auto" gets the largest power of two not above n_examples / 200
  whose share per GPU fits GPU_MEMORY_SHARE of the free memory (auto_gpu_batch_size), halved again
  while a dry run does not fit;
- every job then runs one forward and backward pass of its largest batch (Trainer.dry_run); a job
  whose explicit batch does not fit fails with TrainingOutOfMemory naming `batch_size` (or, at
  batch 1, the GPUs per job and LoRA settings), never with a CUDA out-of-memory traceback;
- all ranks of a multi-GPU job agree on the batch size and on the verdict.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from tuneline.server.distributed import Ranks
from tuneline.server.losses import CHUNK_TOKENS
from tuneline.server.training_errors import TrainingOutOfMemory

if TYPE_CHECKING:
    from tuneline.server.trainer import Trainer
    from tuneline.server.training_spec import TrainingReporter

# The share of a GPU's free memory the auto batch size plans to use (the rest: allocator slack).
GPU_MEMORY_SHARE = 0.85


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


def fit_to_memory(trainer: Trainer, batch_size_auto: bool, reporter: TrainingReporter, resumed: bool) -> None:
    """On a GPU: an "auto" batch sized from free memory, then the dry run of the largest batch; an
    "auto" batch that does not fit is halved until it does. Raises TrainingOutOfMemory."""
    hp = trainer.hyperparameters
    ranks = trainer.ranks
    if batch_size_auto and not resumed:
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
        if batch_size_auto and size > 1 and not resumed:
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
