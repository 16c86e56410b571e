"""Chat-completion decoding throughput of `tuneline serve`'s models against a per-request loop.

Both answer the same prompts (the demo eval set's questions, greedy, up to --max-tokens) with the same
model (tuneline-tiny fine-tuned by a short job, or --model-dir), on the same device and threads:

- baselines: each request decoded alone by a KV-cached loop, one forward pass per token per request
  (`model(...)` with a DynamicCache): C requests in C threads (what the server did before), and the
  same requests one after another (no thread contention at all);
- tuneline: `ChatModel.generate` from C threads, whose concurrent requests the BatchedDecoder decodes
  as one batch (one forward pass per token for all of them; a request that arrives while others decode
  joins them between two tokens).

Printed: completion tokens per second of each, the ratio of tuneline to each baseline, and how many
answers agree (greedy decoding in a batch and alone must give the same text).

    .venv/bin/python benchmarks/generation.py [--requests 64] [--concurrency 16] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuneline.server.hyperparameters import Hyperparameters  # noqa: E402
from tuneline.server.modeling import ChatModel, cache_keyword  # noqa: E402
from tuneline.server.training import TrainingSpec, train  # noqa: E402
from tuneline.server.training_demo import PrintingReporter  # noqa: E402


def per_request_answer(chat: ChatModel, messages: list[dict[str, Any]], max_tokens: int) -> tuple[str, int]:
    """One request decoded alone: the loop every server starts with."""
    from transformers import DynamicCache

    prompt = chat.format.encode_prompt(messages)
    try:
        cache = DynamicCache(config=chat.model.config)
    except TypeError:
        cache = DynamicCache()
    keyword = cache_keyword(chat.model)
    ids: list[int] = []
    inputs = torch.tensor([prompt], device=chat.device)
    with torch.inference_mode():
        for _ in range(max_tokens):
            logits = chat.model(input_ids=inputs, use_cache=True, **{keyword: cache}).logits
            token = int(logits[0, -1].argmax())
            if token in chat.format.stop_token_ids:
                break
            ids.append(token)
            inputs = torch.tensor([[token]], device=chat.device)
    return chat.tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def fine_tuned_tiny(work: Path) -> Path:
    """tuneline-tiny after one short epoch on the demo data: it answers in the house style."""
    from tuneline.server.builtin import ensure_builtin_model
    from tuneline.server.training import read_examples
    from tuneline.server.training_demo import demo_training_lines

    base = ensure_builtin_model(work / "state")
    evals = read_examples(ROOT / "data" / "eval" / "support_eval.jsonl")
    lines = demo_training_lines(ROOT / "data" / "raw" / "support", evals)
    (work / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    spec = TrainingSpec(base, work / "train.jsonl", None, work / "run", Hyperparameters(1, 4, 1.0), 0)
    outcome = train(spec, PrintingReporter(every=10**9))
    assert outcome.model_dir is not None
    return outcome.model_dir


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tuneline-generation-") as scratch:
        model_dir = args.model_dir or fine_tuned_tiny(Path(scratch))
        chat = ChatModel.load(model_dir)
        questions = [
            json.loads(line)["messages"][:-1]
            for line in (ROOT / "data" / "eval" / "support_eval.jsonl").read_text().splitlines()
        ]
        prompts = [questions[i % len(questions)] for i in range(args.requests)]
        per_request_answer(chat, prompts[0], 4)  # warm-up: first-call allocations and lazy imports
        chat.generate(prompts[0], temperature=0.0, max_tokens=4)
        started = time.perf_counter()
        sequential = [per_request_answer(chat, m, args.max_tokens) for m in prompts]
        sequential_s = time.perf_counter() - started
        with ThreadPoolExecutor(args.concurrency) as pool:
            started = time.perf_counter()
            baseline = list(pool.map(lambda m: per_request_answer(chat, m, args.max_tokens), prompts))
            baseline_s = time.perf_counter() - started
            started = time.perf_counter()
            batched = list(
                pool.map(lambda m: chat.generate(m, temperature=0.0, max_tokens=args.max_tokens), prompts)
            )
            batched_s = time.perf_counter() - started
    baseline_tokens = sum(n for _, n in baseline)
    batched_tokens = sum(g.completion_tokens for g in batched)
    agree = sum(text == g.text for (text, _), g in zip(baseline, batched, strict=True))
    baseline_rate, batched_rate = baseline_tokens / baseline_s, batched_tokens / batched_s
    sequential_rate = sum(n for _, n in sequential) / sequential_s
    print(
        f"{args.requests} requests, concurrency {args.concurrency}, {torch.get_num_threads()} torch threads, "
        f"device {chat.device}"
    )
    print(f"baseline, per-request decoding in threads: {baseline_rate:8.0f} tokens/s  ({baseline_s:.1f} s)")
    print(
        f"baseline, per-request decoding in turn:    {sequential_rate:8.0f} tokens/s  ({sequential_s:.1f} s)"
    )
    print(f"tuneline, batched decoding in threads:     {batched_rate:8.0f} tokens/s  ({batched_s:.1f} s)")
    print(f"ratio tuneline / per-request in threads: {batched_rate / baseline_rate:.2f}")
    print(f"ratio tuneline / per-request in turn:    {batched_rate / sequential_rate:.2f}")
    print(f"identical answers: {agree}/{args.requests}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
