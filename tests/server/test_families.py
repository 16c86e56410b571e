"""The model families teams fine-tune - Llama 3.x, Qwen 2.5 and 3, Gemma 2 and 3, Mistral, Phi-3.5 and
Phi-4 - each as a tiny random-weight checkpoint of its real architecture (its transformers config
class), with a small BPE tokenizer that carries the family's special tokens and the family's REAL chat
template (tests/server/data/chat_templates/, sources and licences in its README.md). Per family: the
loss mask covers exactly each trained assistant turn and its end-of-turn token; full fine-tuning and
LoRA train, checkpoint and resume exactly; generation stops on the family's end-of-turn token.

Each checkpoint is built once per test session (a few hundred kilobytes, well under a second)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tuneline.server.chat_template import IGNORE_INDEX, ChatFormat
from tuneline.server.hyperparameters import Hyperparameters
from tuneline.server.modeling import ChatModel, load_causal_lm, load_tokenizer
from tuneline.server.training import STATE_FILE, TrainingSpec, train

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


@dataclass(frozen=True)
class Family:
    name: str
    template: str  # file name in TEMPLATES
    model_type: str  # the transformers config class's model_type
    end_of_turn: str  # the token that closes an assistant turn under the template
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    specials: tuple[str, ...] = ()  # the template's other special tokens
    plain_added: tuple[str, ...] = ()  # added tokens that are not special (Qwen 3's thinking tags)
    config: dict[str, Any] = field(default_factory=dict)


LLAMA_SPECIALS = (
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
)
FAMILIES = [
    Family(
        "llama-3.2", "llama-3.2.jinja", "llama", "<|eot_id|>", eos="<|eot_id|>", bos="<|begin_of_text|>",
        specials=LLAMA_SPECIALS, config={"rope_theta": 500000.0},
    ),
    Family(
        "qwen-2.5", "qwen-2.5.jinja", "qwen2", "<|im_end|>", eos="<|im_end|>", pad="<|endoftext|>",
        specials=("<|im_start|>",), config={"tie_word_embeddings": True},
    ),
    Family(
        "qwen-3", "qwen-3.jinja", "qwen3", "<|im_end|>", eos="<|im_end|>", pad="<|endoftext|>",
        specials=("<|im_start|>",), plain_added=("<think>", "</think>"),
        config={"tie_word_embeddings": True, "head_dim": 16},
    ),
    Family(
        "gemma-2", "gemma-2.jinja", "gemma2", "<end_of_turn>", eos="<eos>", bos="<bos>", pad="<pad>",
        unk="<unk>", specials=("<start_of_turn>",),
        config={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    ),
    Family(
        "gemma-3", "gemma-3.jinja", "gemma3_text", "<end_of_turn>", eos="<eos>", bos="<bos>", pad="<pad>",
        unk="<unk>", specials=("<start_of_turn>", "<start_of_image>"),
        config={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16},
    ),
    Family(
        "mistral-nemo", "mistral-nemo.jinja", "mistral", "</s>", eos="</s>", bos="<s>", unk="<unk>",
        specials=("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]"),
        config={"sliding_window": None},
    ),
    Family(
        "phi-3.5", "phi-3.5.jinja", "phi3", "<|end|>", eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>",
        unk="<unk>", specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    Family(
        # Phi-4's EOS is not its end-of-turn token: generation must stop on what the template writes.
        "phi-4", "phi-4.jinja", "phi3", "<|im_end|>", eos="<|endoftext|>", pad="<|endoftext|>",
        specials=("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    ),
]  # fmt: skip

# Llama 3.1 (and 3.3, the same template) differs from 3.2 in its date line: checked by the template
# tests, trained once as 3.2.
LLAMA_31 = Family(
    "llama-3.1", "llama-3.1.jinja", "llama", "<|eot_id|>", eos="<|eot_id|>", bos="<|begin_of_text|>",
    specials=LLAMA_SPECIALS, config={"rope_theta": 500000.0},
)  # fmt: skip
TEMPLATE_FAMILIES = [*FAMILIES, LLAMA_31]

SYSTEM = "You route tenant requests."
QUESTIONS = [
    f"{problem} in flat {flat}."
    for flat in (4, 9)
    for problem in (
        "The sink leaks", "My radiator is cold", "The fuse box sparks", "I lost the door key",
        "Water drips from the pipe", "The boiler makes noise", "No power in the kitchen", "The latch is stuck",
    )
]  # fmt: skip
ANSWER = "Sent."  # one answer for every question: a tiny random model memorises it in a few steps


def conversation(question: str, answer: str = ANSWER) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def build_checkpoint(family: Family, folder: Path) -> Path:
    """A tiny random-weight checkpoint of the family's architecture with its tokenizer and template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    template = (TEMPLATES / family.template).read_text(encoding="utf-8")
    specials = list(
        dict.fromkeys(t for t in (family.bos, family.eos, family.pad, family.unk, family.end_of_turn) if t)
    )
    specials += [t for t in family.specials if t not in specials]
    tokenizer = Tokenizer(models.BPE(unk_token=family.unk))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [SYSTEM, ANSWER, *QUESTIONS, "user assistant model system Cutting Knowledge Date Today"]
    bpe = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, bpe)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain_added])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        additional_special_tokens=[
            t for t in specials if t not in (family.bos, family.eos, family.pad, family.unk)
        ],
        model_max_length=256,
    )
    wrapped.chat_template = template
    ids = {name: wrapped.convert_tokens_to_ids(token) for name, token in (
        ("bos_token_id", family.bos), ("eos_token_id", family.eos), ("pad_token_id", family.pad)
    ) if token}  # fmt: skip
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(wrapped),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        **{"bos_token_id": None, "pad_token_id": None, **ids, **family.config},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True)
    model.save_pretrained(str(folder))
    wrapped.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family], Path]:
    """checkpoint(family): the family's tiny checkpoint, built on first use in the session."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("families")

    def get(family: Family) -> Path:
        if family.name not in built:
            built[family.name] = build_checkpoint(family, root / family.name)
        return built[family.name]

    return get


by_name = pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
by_template = pytest.mark.parametrize("family", TEMPLATE_FAMILIES, ids=[f.name for f in TEMPLATE_FAMILIES])


def test_the_pinned_templates_are_the_ones_described() -> None:
    readme = (TEMPLATES / "README.md").read_text(encoding="utf-8")
    for path in sorted(TEMPLATES.glob("*.jinja")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"`{path.name}`" in readme and digest in readme, f"{path.name} ({digest}) is not described"
    assert {f.template for f in TEMPLATE_FAMILIES} == {p.name for p in TEMPLATES.glob("*.jinja")}


# -- the loss mask ---------------------------------------------------------------------------------


def trained_pieces(fmt: ChatFormat, example: dict[str, Any]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    encoded = fmt.encode_example(example, 256)
    pieces: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in encoded.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                pieces.append([])
            pieces[-1].append(label)
        previous = label
    return [fmt.tokenizer.decode(piece) for piece in pieces]


@by_template
def test_the_loss_mask_is_each_assistant_turn_and_its_end_of_turn_token(
    family: Family, checkpoint: Callable[[Family], Path]
) -> None:
    fmt = ChatFormat(load_tokenizer(checkpoint(family)))
    assert fmt.end_of_turn == family.end_of_turn  # read off the template, not listed by hand
    eot = family.end_of_turn
    example = {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTIONS[0]},
            {"role": "assistant", "content": "Plumbing, today."},
            {"role": "user", "content": QUESTIONS[1]},
            {"role": "assistant", "content": "Heating, tomorrow.", "weight": 0},
            {"role": "user", "content": QUESTIONS[2]},
            {"role": "assistant", "content": "Electrical."},
        ]
    }
    assert trained_pieces(fmt, example) == [f"Plumbing, today.{eot}", f"Electrical.{eot}"]
    example["messages"][4]["weight"] = 1
    assert trained_pieces(fmt, example) == [
        f"Plumbing, today.{eot}",
        f"Heating, tomorrow.{eot}",
        f"Electrical.{eot}",
    ]
    # The ids are the template's own text: the final answer follows exactly the prompt it is asked
    # with, system message included (Mistral's template drops it from a conversation that ends with
    # an answer; the trainer keeps it where the prompt has it).
    encoded = fmt.encode_example(example, 256)
    text = fmt.tokenizer.decode(encoded.input_ids)
    assert text == fmt.training_text(example["messages"])
    prompt = fmt.render(example["messages"][:-1], add_generation_prompt=True)
    assert text == f"{prompt}Electrical.{eot}" or text.startswith(f"{prompt}Electrical.{eot}")
    assert SYSTEM in text and text.count(eot) >= 3
    if family.name != "mistral-nemo":
        assert text == fmt.render(example["messages"], add_generation_prompt=False)
    # A legacy prompt/completion line trains on its completion alone.
    assert trained_pieces(fmt, {"prompt": "Sink leaks.", "completion": "Plumbing."}) == [f"Plumbing.{eot}"]


@by_template
def test_the_generation_prompt_is_the_template_s_assistant_opener(
    family: Family, checkpoint: Callable[[Family], Path]
) -> None:
    fmt = ChatFormat(load_tokenizer(checkpoint(family)))
    question = conversation(QUESTIONS[3])["messages"][:2]
    prompt = fmt.render(question, add_generation_prompt=True)
    whole = fmt.training_text([*question, {"role": "assistant", "content": "Locks."}])
    assert whole.startswith(prompt) and whole[len(prompt) :].startswith(f"Locks.{family.end_of_turn}")
    assert fmt.tokenizer.decode(fmt.encode_prompt(question)) == prompt
    assert fmt.tokenizer.convert_tokens_to_ids(family.end_of_turn) in fmt.stop_token_ids


# -- training, checkpoints, resume, generation -----------------------------------------------------


def weights_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        for name, tensor in sorted(load_file(str(file)).items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


class Recorder:
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.checkpoints: list[Path] = []
        self.first_message = ""

    def message(self, text: str, level: str = "info") -> None:
        self.first_message = self.first_message or text

    def metrics(self, step: int, total_steps: int, data: dict[str, float]) -> None:
        self.losses.append(data["train_loss"])

    def checkpoint(self, step: int, model_dir: Path, metrics: dict[str, float]) -> None:
        self.checkpoints.append(model_dir)

    def should_stop(self) -> bool:
        return False


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("family-data") / "train.jsonl"
    path.write_text("".join(json.dumps(conversation(q)) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def run(base: Path, train_file: Path, out: Path, lora: bool, epochs: int, resume: Path | None = None):
    # Random weights need far more than the rates meant for pretrained checkpoints (5e-5 full, 2e-4 LoRA);
    # full fine-tuning takes batch 1, so that 3 epochs are the ~50 steps the slowest learner here
    # (Gemma 2, with its logit soft-capping) needs to memorise the answer.
    multiplier, batch = (5.0, 4) if lora else (200.0, 1)
    spec = TrainingSpec(
        base, train_file, None, out, Hyperparameters(epochs, batch, multiplier), seed=3,
        resume_from=resume, lora_above_params=0 if lora else 10**12, cpu_threads=1,
    )  # fmt: skip
    reporter = Recorder()
    return train(spec, reporter), reporter


@by_name
def test_full_fine_tuning_checkpoints_resumes_and_stops_on_the_end_of_turn(
    family: Family, checkpoint: Callable[[Family], Path], train_file: Path, tmp_path: Path
) -> None:
    base = checkpoint(family)
    whole, reporter = run(base, train_file, tmp_path / "whole", lora=False, epochs=3)
    assert "full fine-tuning" in reporter.first_message and len(reporter.checkpoints) == 3
    assert reporter.losses[-1] < reporter.losses[0] / 4
    resumed, _ = run(
        base, train_file, tmp_path / "resumed", lora=False, epochs=3, resume=reporter.checkpoints[1]
    )
    assert whole.model_dir is not None and resumed.model_dir is not None
    assert weights_digest(resumed.model_dir) == weights_digest(whole.model_dir) != weights_digest(base)

    chat = ChatModel.load(whole.model_dir)
    question = conversation("The heater in flat 7 is off.")["messages"][:2]
    answer = chat.generate(question, temperature=0, max_tokens=12)
    assert (answer.text, answer.finish_reason) == (ANSWER, "stop")
    assert answer.completion_tokens == len(chat.tokenizer(ANSWER, add_special_tokens=False)["input_ids"])


@by_name
def test_lora_fine_tuning_saves_an_adapter_that_resumes_exactly(
    family: Family, checkpoint: Callable[[Family], Path], train_file: Path, tmp_path: Path
) -> None:
    base = checkpoint(family)
    whole, reporter = run(base, train_file, tmp_path / "whole", lora=True, epochs=2)
    assert "LoRA" in reporter.first_message and whole.model_dir is not None
    adapter = json.loads((whole.model_dir / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == base.resolve()
    assert not (whole.model_dir / "config.json").exists() and (reporter.checkpoints[0] / STATE_FILE).is_file()
    resumed, _ = run(
        base, train_file, tmp_path / "resumed", lora=True, epochs=2, resume=reporter.checkpoints[0]
    )
    assert resumed.model_dir is not None
    assert weights_digest(resumed.model_dir) == weights_digest(whole.model_dir)
    tuned, plain = ChatModel.load(whole.model_dir), ChatModel.load(base)
    ids = torch.tensor([tuned.format.encode_prompt(conversation(QUESTIONS[0])["messages"][:2])])
    with torch.no_grad():
        assert not torch.allclose(tuned.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
    # Served as its adapter over the shared base (tuneline/server/adapters.py), it answers as the same
    # fine-tune merged into a full copy does: the same greedy tokens, the same logprobs.
    assert tuned.adapter is not None and tuned.decoder.multi_adapter
    merged = ChatModel(load_causal_lm(whole.model_dir, torch.device("cpu"), torch.float32), tuned.tokenizer)
    question = conversation(QUESTIONS[0])["messages"][:2]
    served, alone = (
        m.generate(question, temperature=0, max_tokens=6, top_logprobs=3) for m in (tuned, merged)
    )
    assert served.text == alone.text and served.finish_reason == alone.finish_reason
    assert [e["token"] for e in served.logprobs] == [e["token"] for e in alone.logprobs]  # type: ignore[union-attr]
    assert [e["logprob"] for e in served.logprobs] == pytest.approx(  # type: ignore[union-attr]
        [e["logprob"] for e in alone.logprobs],
        abs=1e-4,  # type: ignore[union-attr]
    )
