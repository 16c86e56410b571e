"""What the hardware reaches on fine-tuning-shaped work with plain PyTorch done right: the ceiling the
trainer (benchmarks/trainer.py) is measured against, in the same run.

The method is the reference script of the project's GPU measurements (shared/gpu/ceiling.py, by the
session that filed issue 15; its H200 figures are quoted in benchmarks/trainer.py): random weights,
random tokens in full packed rows (no padding, no masking), `model(input_ids, labels=input_ids)`,
backward, gradient clipping, fused AdamW; bf16 autocast, TF32 and SDPA attention on a GPU; LoRA r=16 on
all linear layers with the frozen base in bf16 as the LoRA variant. A throughput ceiling, not a
training run. MFU counts (6 x parameters, 4 x for LoRA: no weight gradients for frozen weights) +
12 x layers x width x context FLOPs per token, against the GPU's dense bf16 peak.

    python benchmarks/ceiling.py gpt2-110m llama-1.5b llama-1.5b:lora     # on a GPU
    python benchmarks/ceiling.py llama-tiny --rows 4 --seq 512             # on a CPU
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by device name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}

# Synthetic checkpoints: random weights of real architectures, no download.
SYNTHETIC: dict[str, dict[str, Any]] = {
    "gpt2-110m": {"kind": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 32768},
    "gpt2-350m": {"kind": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 32768},
    # The Llama-shaped 1.5B of the reference measurements: 16 layers, 2048 wide, GQA 32/8, vocab 128256.
    "llama-1.5b": {
        "kind": "llama", "num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    },
    # The same shape scaled down for a CPU: 4 layers, 256 wide, GQA 8/4.
    "llama-tiny": {
        "kind": "llama", "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 704,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192,
    },
}  # fmt: skip


def synthetic_model(name: str, context: int = 2048, **token_ids: int | None) -> Any:
    """A randomly initialised model of the named shape (seeded), SDPA attention, no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    shape = dict(SYNTHETIC[name])
    kind = shape.pop("kind")
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(
            n_positions=context, attn_implementation="sdpa", resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **shape, **token_ids,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        max_position_embeddings=max(context, 4096), attn_implementation="sdpa", tie_word_embeddings=False,
        **shape, **token_ids,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def flops_per_token(model: Any, context: float, lora: bool, parameters: int | None = None) -> float:
    """Training FLOPs per token, as the reference counts them (see the module docstring)."""
    config = model.config if hasattr(model, "config") else model
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    if parameters is None:
        parameters = sum(p.numel() for p in model.parameters())
    return (4 if lora else 6) * parameters + 12 * layers * width * context


def peak_flops() -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None when unknown or on a CPU)."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((value for key, value in PEAK_BF16.items() if key in name), None)


def mfu_text(flops: float, tokens_per_second: float) -> str:
    """'MFU x%' on a GPU of known peak; the achieved GFLOP/s otherwise."""
    achieved = flops * tokens_per_second
    name, peak = peak_flops()
    if peak is None:
        return (
            f"{achieved / 1e9:,.1f} GFLOP/s" if name == "cpu" else f"{achieved / 1e12:.1f} TFLOP/s ({name})"
        )
    return f"MFU {100 * achieved / peak:.1f}%"


def lora_wrapped(model: Any) -> Any:
    """LoRA r=16 on all linear layers, the frozen base in bf16 on a GPU (as the trainer does)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    if torch.cuda.is_available():
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    return model


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ceiling(
    model: Any, rows: int, seq: int, steps: int, lora: bool = False, compile_: bool = False, warmup: int = 3
) -> dict[str, float]:
    """Tokens per second (and peak GPU memory) of the reference loop on `model`, which it trains."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parameters = sum(p.numel() for p in model.parameters())
    model.to(device)
    if lora:
        model = lora_wrapped(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    forward = torch.compile(model) if compile_ else model
    vocabulary = model.config.vocab_size
    autocast = device.type == "cuda"
    model.train()

    def step() -> None:
        ids = torch.randint(0, vocabulary, (rows, seq), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize()
    seconds = time.perf_counter() - started
    tokens_per_second = rows * seq * steps / seconds
    return {
        "tokens": rows * seq * steps,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_started,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops_per_token(model, seq, lora, parameters),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="shape names (SYNTHETIC), ':lora' or ':compile' appended")
    parser.add_argument("--rows", type=int, default=None, help="rows per step (default 16, 8 for llama-1.5b)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    for item in args.models:
        name, _, variant = item.partition(":")
        rows = args.rows or (8 if name == "llama-1.5b" else 16)
        try:
            result = ceiling(
                synthetic_model(name, args.seq),
                rows,
                args.seq,
                args.steps,
                variant == "lora",
                variant == "compile",
            )
        except torch.cuda.OutOfMemoryError as exc:
            print(f"{item}: out of memory ({str(exc).splitlines()[0][:120]})", flush=True)
            continue
        rate = result["tokens_per_second"]
        print(
            f"{item}: rows {rows}x{args.seq}, {rate:,.0f} tok/s, "
            f"{mfu_text(result['flops_per_token'], rate)}, peak {result['peak_gib']:.1f} GiB",
            flush=True,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
