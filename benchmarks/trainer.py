"""Training throughput of the server's trainer against a plain PyTorch loop and the hardware's ceiling,
all measured in the same run, on demo-shaped chat data (the demo's short support chats, ~110 tokens).

Lines (each trains the same model, loaded from the same directory, with AdamW and gradient clipping,
on the same device and threads):
- ceiling: benchmarks/ceiling.py's loop, full rows of random tokens through the plain model (no
  padding; the reference of the GPU figures, see there): what the hardware reaches;
- plain loop: the loop everyone writes first, on the same chat batches as train() (same order), one
  padded row per example, `model(..., labels=labels)` (the library's loss over the full logits);
- train() packed: `tuneline.server.training.train()` for one epoch, its loop alone (first step to the
  epoch's checkpoint) and end to end (loading, tokenizing, the GPU dry run, the checkpoint);
- train() padded: the same with `packing=False` (one padded row per example), to show what packing
  buys on short examples.

Tokens are the chat examples' tokens (no padding); on a GPU the first 3 steps of each loop are not
timed (kernel selection, allocator growth), nor is train()'s checkpoint save. Runs alternate (ceiling, plain, packed, padded,
ceiling, ...) and medians are reported, since a shared machine's speed drifts; the ratios are
train() loop / plain loop (CPU target >= 1.0), train() / ceiling (GPU target >= 0.9) and packed /
padded (>= 1.0). MFU per line on a GPU (benchmarks/ceiling.py counts FLOPs; for chat lines the attended
context is the mean example length), GFLOP/s on a CPU.

    python benchmarks/trainer.py                               # tuneline-tiny on the demo data, CPU
    python benchmarks/trainer.py --synthetic llama-tiny        # a small Llama shape, CPU

On a GPU box (CUDA torch; `pip install -e ".[server,gpu]"` adds liger-kernel, optional), the issue-15
table, about 10 minutes on an H200 (batches of the ceiling's tokens per step, one epoch each):

    python benchmarks/trainer.py --suite gpu

which runs, one after the other, `--synthetic gpt2-110m`, `--synthetic gpt2-350m`,
`--synthetic llama-1.5b` and `--synthetic llama-1.5b --lora`, each with its ceiling, plus
`--synthetic gpt2-350m --auto-batch` (the "auto" batch size sized from free memory: it must not run
out of memory) and `--synthetic gpt2-110m --compile` (train() with torch.compile, the setting
`TrainingSpec.compile`: whether it pays). Reference (shared/gpu/README.md, H200, 2026-12-04, before this trainer): ceiling
110M 211k tok/s (19.2% MFU), 350M 84k (22.3%), llama-1.5b 46.9k (46.4%), LoRA 48.3k (33.2%); the old
train() 5.4% MFU on 110M, and out of memory on 350M at batch 64.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ceiling import (  # noqa: E402
    SYNTHETIC,
    ceiling,
    flops_per_token,
    lora_wrapped,
    mfu_text,
    synchronize,
    synthetic_model,
)

from tuneline.server.chat_template import ChatFormat  # noqa: E402
from tuneline.server.hyperparameters import Hyperparameters  # noqa: E402
from tuneline.server.modeling import (  # noqa: E402
    context_length,
    cpu_threads,
    load_causal_lm,
    load_tokenizer,
    parameter_count,
    pick_device,
)
from tuneline.server.packing import collate  # noqa: E402
from tuneline.server.training import (  # noqa: E402
    GRADIENT_CLIP,
    TrainingSpec,
    base_learning_rate,
    epoch_batches,
    make_optimizer,
    train,
)

GPU_SUITE = [
    ["--synthetic", "gpt2-110m", "--repeats", "1"],
    ["--synthetic", "gpt2-350m", "--repeats", "1"],
    ["--synthetic", "llama-1.5b", "--repeats", "1"],
    ["--synthetic", "llama-1.5b", "--lora", "--repeats", "1"],
    ["--synthetic", "gpt2-350m", "--auto-batch", "--examples", "20000"],
    ["--synthetic", "gpt2-110m", "--compile", "--repeats", "1"],
]
# Ceiling rows per step on a GPU, as the reference measured them (x 2048 tokens).
GPU_CEILING_ROWS = {"llama-1.5b": 8}


class TimingReporter:
    """Marks when the timed part of the loop starts (the stop check before step `skip` + 1: the first
    steps of a GPU run pick kernels and grow the allocator) and ends (the last step's metrics, which
    the trainer reports before it saves the epoch's checkpoint: saving is not training)."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.checks = 0
        self.loop_started: float | None = None
        self.loop_ended: float | None = None
        self.cpu_started = 0.0
        self.cpu_ended = 0.0
        self.messages: list[str] = []

    def message(self, text: str, level: str = "info") -> None:
        self.messages.append(text)

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        if step == total_steps:
            synchronize()
            self.loop_ended = time.perf_counter()
            self.cpu_ended = time.process_time()

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        if self.checks == self.skip:
            synchronize()
            self.loop_started = time.perf_counter()
            self.cpu_started = time.process_time()
        self.checks += 1
        return False


def support_lines(n: int) -> list[bytes]:
    """n chat lines: the demo support data's valid lines, repeated as needed."""
    from tuneline.formats import check_example

    lines = []
    for path in sorted((ROOT / "data" / "raw" / "support").rglob("*.jsonl")):
        for raw in path.read_bytes().splitlines():
            try:
                example = json.loads(raw)
            except ValueError:
                continue
            if check_example(example, allowed=("chat",)) is None:
                lines.append(raw)
    if not lines:
        raise SystemExit("no demo data under data/raw/support: run `tuneline demo-data` first")
    return [lines[i % len(lines)] for i in range(n)]


def synthetic_checkpoint(name: str, folder: Path, texts: list[str]) -> Path:
    """A model of the named shape (benchmarks/ceiling.py SYNTHETIC) with random weights and a
    byte-level BPE tokenizer trained on `texts`, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(
        vocab_size=4096,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, bpe)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    eos = wrapped.eos_token_id
    model = synthetic_model(name, 2048, bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(str(folder))
    wrapped.save_pretrained(str(folder))
    return folder


def plain_loop(
    model_dir: Path, lines: list[bytes], batch_size: int, seed: int, lr: float, lora: bool, skip: int = 0
) -> dict[str, float]:
    """The plain loop over one epoch of the same batches as train(), one padded row per example."""
    device = pick_device()
    model = load_causal_lm(model_dir, device, torch.float32)
    if lora:
        model = lora_wrapped(model)
    tokenizer = load_tokenizer(model_dir)
    chat_format = ChatFormat(tokenizer)
    limit = context_length(model.config)
    encoded = [chat_format.encode_example(json.loads(line), limit) for line in lines]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = epoch_batches([len(e.input_ids) for e in encoded], batch_size, seed, 0)
    batches = [collate([encoded[i] for i in indices], int(pad), device, packed=False) for indices in order]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, lr)
    autocast = device.type == "cuda"
    model.train()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started, cpu_started = time.perf_counter(), time.process_time()
    for index, batch in enumerate(batches):
        if index == skip:
            synchronize()
            started, cpu_started = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                labels=batch.labels,
                use_cache=False,
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRADIENT_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(b.tokens for b in batches[skip:])
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gib": _peak()}


def train_run(
    model_dir: Path, train_file: Path, out: Path, args: argparse.Namespace, **options: Any
) -> dict[str, Any]:
    """One epoch of train(): loop and end-to-end seconds, tokens, peak memory, the batch it used."""
    reporter = TimingReporter(args.skip)
    spec = TrainingSpec(
        model_dir,
        train_file,
        None,
        out,
        Hyperparameters(1, args.batch_size, 1.0),
        args.seed,
        cpu_threads=args.threads,
        lora_above_params=0 if args.lora else 10**12,
        compile=args.compile,
        **options,
    )
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    outcome = train(spec, reporter)
    synchronize()
    total = time.perf_counter() - started
    assert reporter.loop_started is not None and reporter.loop_ended is not None
    return {
        "tokens": timed_tokens(model_dir, train_file, outcome.hyperparameters.batch_size, args),
        "seconds": reporter.loop_ended - reporter.loop_started,
        "cpu_seconds": reporter.cpu_ended - reporter.cpu_started,
        "total_seconds": total,
        "peak_gib": _peak(),
        "batch_size": outcome.hyperparameters.batch_size,
    }


def timed_tokens(model_dir: Path, train_file: Path, batch_size: int, args: argparse.Namespace) -> int:
    """The tokens of the epoch's steps after the first `args.skip` (the timed ones), in the trainer's
    own batch order."""
    tokenizer = load_tokenizer(model_dir)
    chat_format = ChatFormat(tokenizer)
    from transformers import AutoConfig

    limit = context_length(AutoConfig.from_pretrained(str(model_dir), local_files_only=True))
    lengths = [
        len(chat_format.encode_example(json.loads(line), limit).input_ids)
        for line in train_file.read_bytes().splitlines()
        if line.strip()
    ]
    batches = epoch_batches(lengths, batch_size, args.seed, 0)
    return sum(lengths[i] for batch in batches[args.skip :] for i in batch)


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(run: Callable[[], dict[str, Any]]) -> dict[str, Any] | str:
    """The run's figures, or why it failed (out of memory, or the trainer's own refusal)."""
    try:
        return run()
    except torch.cuda.OutOfMemoryError as exc:
        return f"out of memory ({str(exc).splitlines()[0][:100]})"
    except RuntimeError as exc:
        if getattr(exc, "code", None) == "out_of_memory":
            return f"refused: {exc}"
        raise
    finally:
        _free()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a Hugging Face checkpoint directory (default: tuneline-tiny)"
    )
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="a random-weight model of this shape")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (r=16, all linear layers)")
    parser.add_argument("--examples", type=int, default=None, help="chat examples (default: batch x --steps)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per epoch (default 60 on a CPU, 24 on a GPU)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default: 8 on a CPU; "
                        "on a GPU the ceiling's tokens per step / the mean example length)")  # fmt: skip
    parser.add_argument(
        "--auto-batch", action="store_true", help='train() only, with batch_size "auto" (GPU)'
    )
    parser.add_argument("--compile", action="store_true", help="train() with torch.compile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the idle cores)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--suite", choices=("gpu",), help="run the GPU table (see the docstring)")
    args = parser.parse_args()
    if args.suite:
        for extra in GPU_SUITE:
            print(f"\n$ python benchmarks/trainer.py {' '.join(extra)}", flush=True)
            subprocess.run([sys.executable, __file__, *extra], check=False)
        return 0

    args.threads = cpu_threads(args.threads)
    torch.set_num_threads(args.threads)
    device = pick_device()
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as scratch:
        work = Path(scratch)
        sample = support_lines(2000)
        if args.synthetic:
            from tuneline.formats import message_text

            texts = [message_text(m) for line in sample for m in json.loads(line)["messages"]]
            model_dir = synthetic_checkpoint(args.synthetic, work / args.synthetic, texts)
        elif args.model_dir:
            model_dir = args.model_dir
        else:
            from tuneline.server.builtin import ensure_builtin_model

            model_dir = ensure_builtin_model(work / "state")
        tokenizer = load_tokenizer(model_dir)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        context = context_length(config)
        chat_format = ChatFormat(tokenizer)
        mean_length = statistics.mean(
            len(chat_format.encode_example(json.loads(line), context).input_ids) for line in sample[:400]
        )
        seq = min(2048, context)
        ceiling_rows = (
            GPU_CEILING_ROWS.get(args.synthetic or "", 16) if gpu else max(1, round(8 * mean_length / seq))
        )
        if args.batch_size is None:
            args.batch_size = max(1, round(ceiling_rows * seq / mean_length)) if gpu else 8
        steps = args.steps or (24 if gpu else 60)
        # Untimed first steps on a GPU (kernel selection, allocator growth), none on a CPU.
        args.skip = 3 if gpu and steps > 6 else 0
        n_examples = args.examples or args.batch_size * steps
        lines = support_lines(n_examples)
        train_file = work / "train.jsonl"
        train_file.write_bytes(b"\n".join(lines) + b"\n")
        lr = base_learning_rate(model_dir, lora=args.lora)
        parameters = parameter_count(model_dir)
        chat_flops = flops_per_token(config, mean_length, args.lora, parameters)
        print(
            f"device {device.type}{' ' + torch.cuda.get_device_name() if gpu else ''}, {args.threads} CPU threads, "
            f"model {model_dir.name} ({parameters / 1e6:.1f}M parameters{', LoRA r16' if args.lora else ''}), "
            f"{n_examples} chat examples of {mean_length:.0f} tokens on average, batch {args.batch_size} "
            f"(~{args.batch_size * mean_length:,.0f} tokens a step); ceiling rows {ceiling_rows}x{seq}",
            flush=True,
        )
        if args.auto_batch:
            result = guarded(
                lambda: train_run(model_dir, train_file, work / "auto", args, batch_size_auto=True)
            )
            if isinstance(result, str):
                print(f"train() with batch_size auto: {result}")
                return 1
            rate = result["tokens"] / result["seconds"]
            print(
                f"train() with batch_size auto: batch {result['batch_size']}, {rate:,.0f} tok/s, "
                f"{mfu_text(chat_flops, rate)}, peak {result['peak_gib']:.1f} GiB (no out-of-memory)"
            )
            return 0
        rates: dict[str, list[float]] = {"ceiling": [], "plain": [], "packed": [], "padded": []}
        # On a CPU, tokens per CPU-second of this process too: less moved by other processes on a
        # shared machine than wall time (the threads' waits do not count).
        cpu_rates: dict[str, list[float]] = {name: [] for name in rates}
        peaks: dict[str, float] = {}
        failures: dict[str, str] = {}
        ceiling_steps = 10 if gpu else 5
        for repeat in range(args.repeats):
            runs: dict[str, Callable[[], dict[str, Any]]] = {
                "ceiling": lambda: ceiling(
                    synthetic_or_loaded(model_dir),
                    ceiling_rows,
                    seq,
                    ceiling_steps,
                    args.lora,
                    warmup=3 if gpu else 1,
                ),
                "plain": lambda: plain_loop(
                    model_dir, lines, args.batch_size, args.seed, lr, args.lora, args.skip
                ),
                "packed": lambda: train_run(model_dir, train_file, work / "packed", args),
                "padded": lambda: train_run(model_dir, train_file, work / "padded", args, packing=False),
            }
            figures = []
            for name, run in runs.items():
                result = guarded(run)
                if isinstance(result, str):
                    failures[name] = result
                    figures.append(f"{name} {result}")
                    continue
                rate = result["tokens"] / result["seconds"]
                rates[name].append(rate)
                cpu_rates[name].append(result["tokens"] / max(1e-9, result["cpu_seconds"]))
                peaks[name] = max(peaks.get(name, 0.0), result["peak_gib"])
                figures.append(f"{name} {rate:,.0f} tok/s ({cpu_rates[name][-1]:,.0f} per CPU-second)")
            print(f"  run {repeat + 1}: " + ", ".join(figures), flush=True)
        medians = {name: statistics.median(values) for name, values in rates.items() if values}
        cpu_medians = {name: statistics.median(values) for name, values in cpu_rates.items() if values}
        labels = {
            "ceiling": "ceiling (random tokens, full rows)",
            "plain": "plain loop (padded, HF loss)",
            "packed": "train() loop, packed",
            "padded": "train() loop, padded",
        }
        for name, label in labels.items():
            if name not in medians:
                print(f"{label:38s} {failures.get(name, 'not run')}")
                continue
            flops = flops_per_token(config, seq, args.lora, parameters) if name == "ceiling" else chat_flops
            memory = f", peak {peaks[name]:.1f} GiB" if gpu else ""
            print(f"{label:38s} {medians[name]:12,.0f} tokens/s  {mfu_text(flops, medians[name])}{memory}")

        def ratio(a: str, b: str, target: str) -> None:
            if a in medians and b in medians:
                by_cpu = "" if gpu else f", by CPU time {cpu_medians[a] / cpu_medians[b]:.2f}"
                print(f"ratio {labels[a]} / {labels[b]}: {medians[a] / medians[b]:.2f}{by_cpu} ({target})")

        ratio("packed", "plain", "CPU target >= 1.0")
        ratio("packed", "ceiling", "GPU target >= 0.9")
        ratio("packed", "padded", "target >= 1.0: packing no slower than padding")
    return 0


def synthetic_or_loaded(model_dir: Path) -> Any:
    """A fresh copy of the benchmark's model, on the CPU (the ceiling trains it, so never reused)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model


if __name__ == "__main__":
    raise SystemExit(main())
