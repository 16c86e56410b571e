"""The server's trainer: hyperparameter rules, label masking, real gradient descent on the built-in
model and on Hugging Face checkpoints (full and LoRA), determinism, checkpoints and exact resume."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tuneline.server.chat_template import IGNORE_INDEX, ChatFormat
from tuneline.server.gpu_memory import auto_gpu_batch_size
from tuneline.server.hyperparameters import Hyperparameters, auto_batch_size, resolve_hyperparameters
from tuneline.server.modeling import ChatModel, load_tokenizer
from tuneline.server.training import (
    STATE_FILE,
    Trainer,
    TrainingDiverged,
    TrainingSpec,
    epoch_batches,
    read_examples,
    train,
)
from tuneline.server.training_demo import demo_training_lines, exact_match
from tuneline.tokens import default_epochs

DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # the repository's demo data

SYSTEM = "You are the Acme support assistant."
INTENTS = {
    "refund": (
        "Where is my refund for order {n}?",
        "Category: billing/refund\nReply: Your refund is on its way.",
    ),
    "password": (
        "I forgot the password of account {n}.",
        "Category: account/password\nReply: Use the reset link.",
    ),
    "late": ("Parcel {n} has not arrived yet.", "Category: shipping/late\nReply: It ships within two days."),
}


def support_line(intent: str, n: int) -> dict[str, Any]:
    question, answer = INTENTS[intent]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question.format(n=n)},
            {"role": "assistant", "content": answer},
        ]
    }


def write_jsonl(path: Path, examples: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_dir(builtin_model: Path) -> Path:
    """The built-in model, built once per test session (tests/conftest.py)."""
    return builtin_model


@pytest.fixture(scope="module")
def support_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("support")
    names = list(INTENTS)
    train_lines = [support_line(names[i % 3], 100 + i) for i in range(12)]
    valid_lines = [support_line(names[i % 3], 900 + i) for i in range(3)]
    return write_jsonl(folder / "train.jsonl", train_lines), write_jsonl(folder / "valid.jsonl", valid_lines)


class RecordingReporter:
    """Keeps every report; asks to stop once `stop_after` steps were reported."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.messages: list[tuple[str, str]] = []
        self.metrics_events: list[tuple[int, int, dict[str, float]]] = []
        self.checkpoints: list[tuple[int, Path, dict[str, float]]] = []
        self.stop_after = stop_after

    def message(self, text: str, level: str = "info") -> None:
        self.messages.append((level, text))

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        self.metrics_events.append((step, total_steps, dict(data)))

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        assert (model_dir / "config.json").is_file() or (model_dir / "adapter_config.json").is_file()
        self.checkpoints.append((step, model_dir, dict(metrics)))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.metrics_events) >= self.stop_after


def weights_digest(model_dir: Path) -> str:
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no weights in {model_dir}"
    digest = hashlib.sha256()
    for file in files:
        for name, tensor in sorted(load_file(str(file)).items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def spec_for(base: Path, files: tuple[Path, Path | None], out: Path, **overrides: Any) -> TrainingSpec:
    values: dict[str, Any] = {
        "base_model_dir": base,
        "train_file": files[0],
        "validation_file": files[1],
        "output_dir": out,
        "hyperparameters": Hyperparameters(2, 4, 1.0),
        "seed": 7,
        "cpu_threads": 1,
        "validation_every": 2,
    }
    values.update(overrides)
    return TrainingSpec(**values)


# -- hyperparameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch"),
    [(10, 1), (399, 1), (400, 2), (799, 2), (800, 4), (1076, 4), (1600, 8), (6400, 32), (50000, 32)],
)
def test_auto_batch_size_is_the_largest_power_of_two_up_to_n_over_200(n: int, batch: int) -> None:
    assert auto_batch_size(n) == batch


def test_resolve_hyperparameters_uses_the_cookbook_epochs_and_keeps_explicit_values() -> None:
    for n in (10, 20, 700, 20000):
        assert resolve_hyperparameters(n, "auto", "auto", "auto") == Hyperparameters(
            default_epochs(n), auto_batch_size(n), 1.0
        )
    assert resolve_hyperparameters(700, 5, 3, 0.5) == Hyperparameters(5, 3, 0.5)
    assert resolve_hyperparameters(20, 4, "auto", "2.5") == Hyperparameters(4, 1, 2.5)
    with pytest.raises(ValueError, match="out of range"):
        resolve_hyperparameters(20, 0, 1, 1.0)


def test_epoch_batches_cover_every_example_once_and_depend_only_on_seed_and_epoch() -> None:
    lengths = [((i * 37) % 50) + 1 for i in range(103)]
    batches = epoch_batches(lengths, 4, seed=3, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) <= 4 for b in batches)
    assert batches == epoch_batches(lengths, 4, seed=3, epoch=0)
    assert batches != epoch_batches(lengths, 4, seed=3, epoch=1)
    assert batches != epoch_batches(lengths, 4, seed=4, epoch=0)


# -- label masking -------------------------------------------------------------------------------


def trained_text(fmt: ChatFormat, example: dict[str, Any], limit: int = 512) -> str:
    encoded = fmt.encode_example(example, limit)
    return fmt.tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_only_assistant_turns_with_weight_are_trained(tiny_dir: Path) -> None:
    fmt = ChatFormat(load_tokenizer(tiny_dir))
    example = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello there.", "weight": 0},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    assert trained_text(fmt, example) == "Paris.<|end|>"
    example["messages"][2]["weight"] = 1
    assert trained_text(fmt, example) == "Hello there.<|end|>Paris.<|end|>"
    encoded = fmt.encode_example(example, 512)
    assert fmt.tokenizer.decode(encoded.input_ids) == fmt.render(
        example["messages"], add_generation_prompt=False
    )


def test_legacy_prompt_completion_lines_train_on_the_completion(tiny_dir: Path) -> None:
    fmt = ChatFormat(load_tokenizer(tiny_dir))
    assert trained_text(fmt, {"prompt": "2 plus 2? ", "completion": " Four. "}) == "Four.<|end|>"


def test_over_long_examples_are_truncated_from_the_end(tiny_dir: Path) -> None:
    fmt = ChatFormat(load_tokenizer(tiny_dir))
    example = support_line("refund", 1)
    full = fmt.encode_example(example, 512)
    cut = fmt.encode_example(example, 10)
    assert cut.input_ids == full.input_ids[:10] and cut.labels == full.labels[:10]


# -- training the built-in model -----------------------------------------------------------------


def test_train_reports_metrics_checkpoints_and_learns(tiny_dir: Path, support_files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    outcome = train(spec_for(tiny_dir, support_files, tmp_path / "run"), reporter)

    assert not outcome.stopped and outcome.steps == 6  # 12 examples / batch 4 x 2 epochs
    steps = [step for step, _, _ in reporter.metrics_events]
    assert steps == list(range(1, 7)) and all(total == 6 for _, total, _ in reporter.metrics_events)
    for _, _, data in reporter.metrics_events:
        assert {"train_loss", "train_mean_token_accuracy"} <= data.keys()
    with_validation = [d for s, _, d in reporter.metrics_events if "valid_loss" in d]
    assert len(with_validation) == 3 and all("valid_mean_token_accuracy" in d for d in with_validation)
    epoch_ends = {s: d for s, _, d in reporter.metrics_events if "full_valid_loss" in d}
    assert sorted(epoch_ends) == [3, 6]
    assert [s for s, _, _ in reporter.checkpoints] == [3, 6]
    for step, directory, metrics in reporter.checkpoints:
        assert metrics["full_valid_loss"] == epoch_ends[step]["full_valid_loss"] and metrics["step"] == step
        assert set(metrics) == {
            "step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
            "full_valid_loss", "full_valid_mean_token_accuracy",
        }  # fmt: skip
        assert (directory / STATE_FILE).is_file()
    first, last = reporter.metrics_events[0][2], reporter.metrics_events[-1][2]
    assert last["train_loss"] < first["train_loss"]
    assert epoch_ends[6]["full_valid_loss"] < epoch_ends[3]["full_valid_loss"]

    tokenizer = load_tokenizer(tiny_dir)
    fmt = ChatFormat(tokenizer)
    billable = sum(len(fmt.encode_example(e, 512).input_ids) for e in read_examples(support_files[0]))
    assert outcome.trained_tokens == billable * 2
    assert outcome.model_dir is not None and not (outcome.model_dir / STATE_FILE).exists()
    assert weights_digest(outcome.model_dir) == weights_digest(reporter.checkpoints[-1][1])
    assert weights_digest(outcome.model_dir) != weights_digest(tiny_dir)
    assert ChatModel.load(outcome.model_dir).generate([{"role": "user", "content": "Hi"}], max_tokens=3).text


def test_same_seed_same_weights_and_another_seed_other_weights(
    tiny_dir: Path, support_files, tmp_path
) -> None:
    digests = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        outcome = train(spec_for(tiny_dir, support_files, tmp_path / name, seed=seed), RecordingReporter())
        assert outcome.model_dir is not None
        digests.append(weights_digest(outcome.model_dir))
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]


def test_resuming_from_an_epoch_checkpoint_ends_where_an_uninterrupted_run_ends(
    tiny_dir: Path, support_files, tmp_path: Path
) -> None:
    first = RecordingReporter()
    whole = train(spec_for(tiny_dir, support_files, tmp_path / "whole"), first)
    checkpoint = first.checkpoints[0][1]  # after epoch 1, step 3
    resumed_reporter = RecordingReporter()
    resumed = train(
        spec_for(tiny_dir, support_files, tmp_path / "resumed", resume_from=checkpoint), resumed_reporter
    )
    assert [s for s, _, _ in resumed_reporter.metrics_events] == [4, 5, 6]
    assert resumed.steps == 6 and resumed.trained_tokens == whole.trained_tokens
    assert whole.model_dir is not None and resumed.model_dir is not None
    assert weights_digest(resumed.model_dir) == weights_digest(whole.model_dir)


def test_a_stop_mid_epoch_leaves_a_state_that_resumes_exactly(
    tiny_dir: Path, support_files, tmp_path
) -> None:
    whole = train(spec_for(tiny_dir, support_files, tmp_path / "whole"), RecordingReporter())
    stopping = RecordingReporter(stop_after=2)
    stopped = train(spec_for(tiny_dir, support_files, tmp_path / "stopped"), stopping)
    assert stopped.stopped and stopped.steps == 2 and stopping.checkpoints == []
    assert stopped.model_dir is not None and (stopped.model_dir / STATE_FILE).is_file()
    resumed = train(
        spec_for(tiny_dir, support_files, tmp_path / "resumed", resume_from=stopped.model_dir),
        RecordingReporter(),
    )
    assert resumed.model_dir is not None and whole.model_dir is not None
    assert weights_digest(resumed.model_dir) == weights_digest(whole.model_dir)


def test_a_stop_is_honoured_before_the_next_step_within_seconds(
    tiny_dir: Path, support_files, tmp_path
) -> None:
    reporter = RecordingReporter(stop_after=1)
    started = time.monotonic()
    outcome = train(spec_for(tiny_dir, support_files, tmp_path / "run"), reporter)
    assert outcome.stopped and outcome.steps == 1 and len(reporter.metrics_events) == 1
    assert time.monotonic() - started < 60


def test_resuming_with_other_data_is_refused(tiny_dir: Path, support_files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    train(
        spec_for(tiny_dir, support_files, tmp_path / "run", hyperparameters=Hyperparameters(1, 4, 1.0)),
        reporter,
    )
    other = write_jsonl(tmp_path / "other.jsonl", [support_line("late", i) for i in range(12)])
    with pytest.raises(ValueError, match="other data"):
        train(
            spec_for(
                tiny_dir,
                (other, support_files[1]),
                tmp_path / "again",
                resume_from=reporter.checkpoints[0][1],
            ),
            RecordingReporter(),
        )


def test_a_diverging_run_fails_naming_the_step_and_the_multiplier_and_saves_nothing(
    tiny_dir: Path, support_files, tmp_path: Path
) -> None:
    reporter = RecordingReporter()
    spec = spec_for(tiny_dir, support_files, tmp_path / "run", hyperparameters=Hyperparameters(2, 4, 1e6))
    with pytest.raises(TrainingDiverged) as caught:
        train(spec, reporter)
    assert caught.value.code == "training_diverged"
    message = str(caught.value)
    step = len(reporter.metrics_events) + 1  # the steps before it were reported, finite
    assert f"at step {step} of 6" in message and "learning_rate_multiplier 1e+06" in message
    assert "lower learning_rate_multiplier" in message
    assert reporter.checkpoints == []
    assert not list((tmp_path / "run").glob("ckpt-*")) and not (tmp_path / "run" / "model").exists()


def test_the_dry_run_leaves_no_gradient_optimizer_state_or_rng_draw(tiny_dir: Path, support_files) -> None:
    from tuneline.server.modeling import load_causal_lm

    model = load_causal_lm(tiny_dir, torch.device("cpu"), torch.float32)
    examples = read_examples(support_files[0])
    trainer = Trainer(
        model,
        load_tokenizer(tiny_dir),
        examples,
        [],
        Hyperparameters(2, 4, 1.0),
        7,
        1e-3,
        torch.device("cpu"),
    )
    largest = trainer.largest_batch()
    rows, width = trainer.batch_shape(largest)
    for epoch in range(2):
        for indices in epoch_batches(trainer.lengths, 4, 7, epoch):
            other_rows, other_width = trainer.batch_shape([trainer.train_data[i] for i in indices])
            assert other_rows * other_width <= rows * width
    rng = torch.get_rng_state()
    trainer.dry_run()
    assert all(p.grad is None for p in model.parameters())
    assert not trainer.optimizer.state
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_gpu_auto_batch_size_follows_the_data_unless_memory_is_short() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    params = 1_500_000_000
    gib = 2**30
    # Plenty of memory: the data rule alone, without the CPU's cap of 32.
    assert auto_gpu_batch_size(100_000, 110, config, 0, False, 10_000 * gib) == 256
    assert (
        auto_gpu_batch_size(1000, 110, config, params, False, 140 * gib) == 4
    )  # the demo's 200 steps an epoch
    # A full fine-tune of 1.5B on 80 GB: about 30k tokens of activations fit, ~256 examples of 110 tokens.
    on_80 = auto_gpu_batch_size(1_000_000, 110, config, params, False, 78 * gib)
    assert 64 <= on_80 <= 256
    assert auto_gpu_batch_size(1_000_000, 110, config, params, True, 78 * gib) > on_80  # checkpointing
    assert auto_gpu_batch_size(1_000_000, 110, config, params, False, 24 * gib) == 1  # barely fits
    # Two GPUs sharding the states: each holds half, the global batch is the sum of both.
    assert auto_gpu_batch_size(1_000_000, 110, config, params, False, 78 * gib, 2, True) >= 2 * on_80


# -- Hugging Face checkpoints: full fine-tuning and LoRA -----------------------------------------


# Randomly initialised weights need a higher rate than the 5e-5 / 2e-4 meant for pretrained checkpoints.
GPT2_HYPERPARAMETERS = Hyperparameters(2, 4, 20.0)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer and no chat template, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("gpt2-tiny")
    texts = [
        support_line(k, n)["messages"][i]["content"] for k in INTENTS for n in range(5) for i in range(3)
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tokenizer.train_from_iterator(texts, bpe)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(wrapped), n_positions=128, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=wrapped.eos_token_id, eos_token_id=wrapped.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    wrapped.save_pretrained(str(folder))
    return folder


def test_full_fine_tuning_of_a_hugging_face_checkpoint(gpt2_dir: Path, support_files, tmp_path: Path) -> None:
    reporter = RecordingReporter()
    outcome = train(
        spec_for(gpt2_dir, support_files, tmp_path / "run", hyperparameters=GPT2_HYPERPARAMETERS), reporter
    )
    assert outcome.model_dir is not None and (outcome.model_dir / "config.json").is_file()
    assert weights_digest(outcome.model_dir) != weights_digest(gpt2_dir)
    assert "full fine-tuning" in reporter.messages[0][1]
    chat = ChatModel.load(outcome.model_dir)
    generation = chat.generate(
        [{"role": "user", "content": "Where is my refund?"}], temperature=0, max_tokens=4
    )
    assert generation.prompt_tokens == len(
        chat.format.encode_prompt([{"role": "user", "content": "Where is my refund?"}])
    )


def test_lora_above_the_size_threshold_saves_a_loadable_adapter(
    gpt2_dir: Path, support_files, tmp_path
) -> None:
    reporter = RecordingReporter()
    spec = spec_for(
        gpt2_dir, support_files, tmp_path / "run", lora_above_params=0, hyperparameters=GPT2_HYPERPARAMETERS
    )
    outcome = train(spec, reporter)
    assert "LoRA" in reporter.messages[0][1]
    assert outcome.model_dir is not None
    adapter = json.loads((outcome.model_dir / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == gpt2_dir.resolve()
    assert not (outcome.model_dir / "config.json").exists()
    first, last = reporter.metrics_events[0][2], reporter.metrics_events[-1][2]
    assert last["train_loss"] < first["train_loss"]
    tuned = ChatModel.load(outcome.model_dir)
    base = ChatModel.load(gpt2_dir)
    question = [{"role": "user", "content": "Parcel 5 has not arrived yet."}]
    with torch.no_grad():
        ids = torch.tensor([tuned.format.encode_prompt(question)])
        assert not torch.allclose(tuned.model(input_ids=ids).logits, base.model(input_ids=ids).logits)
    # A LoRA run resumes from its adapter checkpoint as exactly as a full one.
    resumed = train(
        spec_for(
            gpt2_dir,
            support_files,
            tmp_path / "resumed",
            lora_above_params=0,
            hyperparameters=GPT2_HYPERPARAMETERS,
            resume_from=reporter.checkpoints[0][1],
        ),
        RecordingReporter(),
    )
    assert resumed.model_dir is not None
    assert weights_digest(resumed.model_dir) == weights_digest(outcome.model_dir)


# -- the demo target, on a slice -----------------------------------------------------------------


@pytest.mark.slow
def test_fine_tuning_raises_exact_match_on_a_slice_of_the_demo_data(tiny_dir: Path, tmp_path: Path) -> None:
    raw = DATA_DIR / "raw" / "support"
    if not raw.is_dir():
        pytest.skip(f"the demo data {raw} is not generated (tuneline demo-data)")
    lines = demo_training_lines(raw, [])
    examples = [json.loads(line) for line in lines]
    answers = [
        json.dumps(e.get("messages", [{}])[-1].get("content") or e.get("completion")) for e in examples
    ]
    chosen = sorted({a for a in answers if a.startswith('"Category:')})[:3]
    picked = [line for line, answer in zip(lines, answers, strict=True) if answer in chosen]
    train_lines, held_out = picked[12:], picked[:12]
    train_file = tmp_path / "train.jsonl"
    train_file.write_bytes(b"\n".join(train_lines) + b"\n")
    held_out_examples = [json.loads(line) for line in held_out]
    base_em = exact_match(ChatModel.load(tiny_dir), held_out_examples, max_tokens=160)
    # About 130 examples: batch 2 for three epochs (the auto batch size would be 1: twice the steps).
    hyperparameters = Hyperparameters(3, 2, 1.0)
    outcome = train(
        TrainingSpec(tiny_dir, train_file, None, tmp_path / "run", hyperparameters, 42), RecordingReporter()
    )
    assert outcome.model_dir is not None
    tuned_em = exact_match(ChatModel.load(outcome.model_dir), held_out_examples, max_tokens=160)
    assert base_em == 0.0
    assert tuned_em >= 0.75, f"exact match {base_em:.2f} -> {tuned_em:.2f}"
