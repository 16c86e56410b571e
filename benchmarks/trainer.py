"""Training throughput of the server's trainer against a plain PyTorch loop, in the same run.

Both train the same model (loaded from the same directory) on the same examples, batches (same order,
same padding) and number of steps, with AdamW and gradient clipping, on the same device and threads:

- baseline: the loop everyone writes first: pre-collated batches, `model(..., labels=labels)` (the
  library's own loss over the full logits), backward, clip, step;
- tuneline: `tuneline.server.training.train()` for one epoch, measured twice: end to end (loading,
  tokenizing, the epoch's checkpoint) and its loop alone (first step to the checkpoint).

Tokens are the non-padding tokens of the batches; the printed ratio is tuneline's loop / baseline
(target >= 0.9). Runs alternate (baseline, tuneline, baseline, ...) and medians are reported, since
a shared machine's speed drifts. On CUDA both use bf16 autocast and the script also prints MFU
(6 x parameters + attention FLOPs per token, against the GPU's dense bf16 peak).

    python benchmarks/trainer.py                      # tuneline-tiny on the demo support data, CPU
    python benchmarks/trainer.py --synthetic gpt2-110m --examples 6400 --batch-size 32   # on a GPU
    python benchmarks/trainer.py --model-dir /path/to/hf-checkpoint
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
from tuneline.server.training import (  # noqa: E402
    GRADIENT_CLIP,
    TrainingSpec,
    base_learning_rate,
    collate,
    epoch_batches,
    make_optimizer,
    train,
)

# Dense bf16 tensor-core peaks (FLOP/s) by device name fragment.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}
SYNTHETIC = {
    # name: (layers, width, heads, vocabulary); GPT-2 shapes with random weights, no download.
    "gpt2-110m": (12, 768, 12, 32768),
    "gpt2-350m": (24, 1024, 16, 32768),
}


class TimingReporter:
    """Marks when the loop starts (the first stop check) and ends (the epoch's checkpoint)."""

    def __init__(self) -> None:
        self.loop_started: float | None = None
        self.loop_ended: float | None = None

    def message(self, text: str, level: str = "info") -> None:
        pass

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        pass

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        synchronize()
        self.loop_ended = time.perf_counter()

    def should_stop(self) -> bool:
        if self.loop_started is None:
            synchronize()
            self.loop_started = time.perf_counter()
        return False


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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
    """A GPT-2-shaped model with random weights and a byte-level BPE tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    layers, width, heads, vocabulary = SYNTHETIC[name]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(
        vocab_size=4096,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
    )
    tokenizer.train_from_iterator(texts, bpe)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    config = GPT2Config(
        vocab_size=vocabulary, n_positions=1024, n_embd=width, n_layer=layers, n_head=heads,
        bos_token_id=wrapped.eos_token_id, eos_token_id=wrapped.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    wrapped.save_pretrained(str(folder))
    return folder


def baseline(model_dir: Path, lines: list[bytes], batch_size: int, seed: int, lr: float) -> tuple[float, int]:
    """(seconds, tokens) of the plain loop over one epoch of the same batches."""
    device = pick_device()
    model = load_causal_lm(model_dir, device, torch.float32)
    tokenizer = load_tokenizer(model_dir)
    chat_format = ChatFormat(tokenizer)
    limit = context_length(model.config)
    encoded = [chat_format.encode_example(json.loads(line), limit) for line in lines]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = epoch_batches([len(e.input_ids) for e in encoded], batch_size, seed, 0)
    batches = [collate([encoded[i] for i in indices], int(pad), device) for indices in order]
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
    autocast = device.type == "cuda"
    model.train()
    synchronize()
    started = time.perf_counter()
    for batch in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize()
    return time.perf_counter() - started, sum(b.tokens for b in batches)


def tuneline_run(
    model_dir: Path, train_file: Path, out: Path, batch_size: int, seed: int, threads: int
) -> tuple[float, float, int]:
    """(end-to-end seconds, loop seconds, tokens) of train() over one epoch."""
    reporter = TimingReporter()
    spec = TrainingSpec(
        model_dir, train_file, None, out, Hyperparameters(1, batch_size, 1.0), seed, cpu_threads=threads
    )
    synchronize()
    started = time.perf_counter()
    outcome = train(spec, reporter)
    synchronize()
    total = time.perf_counter() - started
    assert reporter.loop_started is not None and reporter.loop_ended is not None
    return total, reporter.loop_ended - reporter.loop_started, outcome.trained_tokens


def mfu(model_dir: Path, tokens_per_second: float, mean_length: float) -> str:
    if not torch.cuda.is_available():
        return ""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    parameters = parameter_count(model_dir)
    layers = getattr(config, "num_hidden_layers", getattr(config, "n_layer", 0))
    width = getattr(config, "hidden_size", getattr(config, "n_embd", 0))
    flops_per_token = 6 * parameters + 12 * layers * width * mean_length
    name = torch.cuda.get_device_name()
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)
    if peak is None:
        return f"  ({name}: unknown peak, {flops_per_token * tokens_per_second / 1e12:.1f} TFLOP/s)"
    achieved = flops_per_token * tokens_per_second
    return f"  MFU {100 * achieved / peak:.1f}% ({achieved / 1e12:.1f} TFLOP/s of {peak / 1e12:.0f}, {parameters / 1e6:.0f}M parameters)"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, help="a Hugging Face checkpoint directory (default: tuneline-tiny)"
    )
    parser.add_argument("--synthetic", choices=sorted(SYNTHETIC), help="a random-weight GPT-2 of this size")
    parser.add_argument("--examples", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the idle cores)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    threads = cpu_threads(args.threads)
    torch.set_num_threads(threads)
    device = pick_device()
    with tempfile.TemporaryDirectory(prefix="tuneline-bench-") as scratch:
        work = Path(scratch)
        lines = support_lines(args.examples)
        train_file = work / "train.jsonl"
        train_file.write_bytes(b"\n".join(lines) + b"\n")
        if args.synthetic:
            from tuneline.formats import message_text

            texts = [message_text(m) for line in lines[:2000] for m in json.loads(line)["messages"]]
            model_dir = synthetic_checkpoint(args.synthetic, work / args.synthetic, texts)
        elif args.model_dir:
            model_dir = args.model_dir
        else:
            from tuneline.server.builtin import ensure_builtin_model

            model_dir = ensure_builtin_model(work / "state")
        lr = base_learning_rate(model_dir, lora=False)
        print(
            f"device {device.type}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
            f"{threads} CPU threads, model {model_dir.name}, {args.examples} examples, batch {args.batch_size}",
            flush=True,
        )
        if device.type == "cuda":  # kernel selection and allocator warm-up, untimed, for both
            warm = work / "warm.jsonl"
            warm.write_bytes(b"\n".join(lines[: 4 * args.batch_size]) + b"\n")
            baseline(model_dir, lines[: 4 * args.batch_size], args.batch_size, args.seed, lr)
            tuneline_run(model_dir, warm, work / "run-warm", args.batch_size, args.seed, threads)
        plain: list[float] = []
        ours_loop: list[float] = []
        ours_total: list[float] = []
        tokens = 0
        for repeat in range(args.repeats):
            seconds, tokens = baseline(model_dir, lines, args.batch_size, args.seed, lr)
            plain.append(tokens / seconds)
            total, loop, trained = tuneline_run(
                model_dir, train_file, work / f"run-{repeat}", args.batch_size, args.seed, threads
            )
            assert trained == tokens, (trained, tokens)
            ours_loop.append(tokens / loop)
            ours_total.append(tokens / total)
            print(
                f"  run {repeat + 1}: plain loop {plain[-1]:,.0f} tok/s, train() loop {ours_loop[-1]:,.0f} tok/s, "
                f"train() end to end {ours_total[-1]:,.0f} tok/s",
                flush=True,
            )
        base_rate, loop_rate, total_rate = (statistics.median(v) for v in (plain, ours_loop, ours_total))
        mean_length = tokens / args.examples
        print(f"plain PyTorch loop:   {base_rate:12,.0f} tokens/s{mfu(model_dir, base_rate, mean_length)}")
        print(f"train() loop:         {loop_rate:12,.0f} tokens/s{mfu(model_dir, loop_rate, mean_length)}")
        print(f"train() end to end:   {total_rate:12,.0f} tokens/s (load, tokenize, checkpoint included)")
        print(f"ratio train() loop / plain loop: {loop_rate / base_rate:.2f} (target >= 0.9)")
        print(f"ratio train() end to end / plain loop: {total_rate / base_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
