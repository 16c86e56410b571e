"""The trainer's demo: `python -m tuneline.server.training_demo --demo` fine-tunes the built-in model on
the demo support data, as configs/local.yaml trains it, and prints the exact match before and after (eval
set, held-out validation split, paraphrase stress set, canary set) and the training time.

It stands apart from tuneline/server/training.py so that the trainer holds only the training loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tuneline.config import ValidationConfig, load_config
from tuneline.formats import check_example, message_text
from tuneline.paths import data_dir as project_data
from tuneline.server.builtin import ensure_builtin_model
from tuneline.server.catalog import BUILTIN_MODEL
from tuneline.server.chat_template import chat_messages
from tuneline.server.hyperparameters import auto_rules, resolve_hyperparameters
from tuneline.server.modeling import ChatModel
from tuneline.server.training import TrainingSpec, read_examples, train
from tuneline.tokens import count_tokens, get_encoding


def exact_match(chat: Any, examples: Sequence[dict[str, Any]], max_tokens: int = 192) -> float:
    """The share of examples whose greedy answer, stripped, equals the last assistant turn's text
    (asked 16 at a time: a ChatModel decodes concurrent requests as one batch)."""
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
    data = Path(data_dir) if data_dir else project_data()
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
    parser = argparse.ArgumentParser(prog="python -m tuneline.server.training_demo", description=__doc__)
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
