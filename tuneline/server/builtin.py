"""The built-in base model `tuneline-tiny`: no download, built once from the general corpus.

The build is deterministic (same corpus, canary set and recipe -> same tokenizer and weights):
1. a byte-level BPE tokenizer (the `tokenizers` library) trained on the corpus's texts, with the chat
   special tokens of tuneline/server/chat_template.py and its chat template;
2. a small Llama-style causal LM (transformers) from seeded random weights, trained on the corpus
   (and on any canary example the corpus lacks) with the very trainer that fine-tunes it later,
   until it answers every canary question exactly under greedy decoding (or `max_epochs`);
3. saved as an ordinary Hugging Face checkpoint directory with a model card (tuneline_model.json:
   recipe, corpus fingerprint, what "auto" hyperparameters mean for its fine-tunes: the base learning
   rate, the batch size it is tuned at and the fewest examples a job shows it; the canary score).

It is cached at state_dir/models/tuneline-tiny and rebuilt only when the corpus, the canary set or the
recipe changes (and, with TUNELINE_MODEL_CACHE set, shared between state directories). Concurrent callers (threads or processes) wait on a file lock; the directory appears
complete or not at all (built aside, then renamed into place).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tuneline import jsonl
from tuneline.config import DataConfig
from tuneline.formats import check_example
from tuneline.paths import resolve
from tuneline.server.catalog import (
    BUILTIN_LEARNING_RATE_BATCH_SIZE,
    BUILTIN_MIN_EXAMPLES_SEEN,
    BUILTIN_MODEL,
    MODEL_CARD,
    CatalogEntry,
    entry_of,
    model_dir_of,
)
from tuneline.server.chat_template import (
    BUILTIN_END,
    BUILTIN_PAD,
    BUILTIN_SPECIAL_TOKENS,
    BUILTIN_TEMPLATE,
    chat_messages,
)
from tuneline.server.hyperparameters import AutoRules, Hyperparameters
from tuneline.server.modeling import ChatModel, cpu_threads
from tuneline.server.training import Trainer

log = logging.getLogger(__name__)

MODEL_CACHE_ENV = "TUNELINE_MODEL_CACHE"


@dataclass(frozen=True)
class BuiltinRecipe:
    """How tuneline-tiny is made. Any change here changes the fingerprint, so caches rebuild."""

    version: int = 1
    vocab_size: int = 2048  # an upper bound: BPE stops early once the corpus has no pair left to merge
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    context_length: int = 512
    tie_embeddings: bool = False
    seed: int = 0
    pretrain_learning_rate: float = 1e-3
    pretrain_batch_size: int = 16
    min_epochs: int = 4
    max_epochs: int = 40
    # What "auto" hyperparameters mean for fine-tunes of this model (tuneline/server/hyperparameters.py, AutoRules):
    # the base learning rate (times the job's learning_rate_multiplier), the batch size that rate is tuned
    # at (the demo's: ~1000 examples at batch 4), and the fewest examples x epochs a job shows the model.
    # A smaller batch gets a proportionally smaller rate: at the tuned rate, batch 1 (the auto batch below
    # 400 examples) is noisy enough that a fresh 4-label task of 120 examples never leaves "always the most
    # frequent label". And a model this small needs about a thousand updates to pick up a new task, where
    # the hosted rule (3 epochs once a job shows 100 examples) is made for large pretrained models: at 3
    # epochs the same task ends at 0.5-0.8 on its own training rows, at ~1000 examples seen at 0.97-1.0.
    fine_tune_learning_rate: float = 2e-3
    fine_tune_batch_size: int = BUILTIN_LEARNING_RATE_BATCH_SIZE
    fine_tune_min_examples_seen: int = BUILTIN_MIN_EXAMPLES_SEEN


DEFAULT_RECIPE = BuiltinRecipe()


def builtin_auto_rules(recipe: BuiltinRecipe = DEFAULT_RECIPE) -> AutoRules:
    """What "auto" hyperparameters mean for tuneline-tiny, known before it is built (its model card
    carries the same figures once it is)."""
    return AutoRules(recipe.fine_tune_batch_size, recipe.fine_tune_min_examples_seen)


def default_general_corpus() -> Path:
    return resolve(DataConfig.model_fields["general_corpus"].default)


def default_canary_set() -> Path:
    return resolve(DataConfig.model_fields["canary_set"].default)


def read_chat_lines(path: Path) -> list[dict[str, Any]]:
    """The valid chat (or legacy prompt/completion, converted) lines of a JSONL file; a line that
    breaks a format rule stops the build with its line number, rule and file."""
    examples = []
    for line in jsonl.read_lines(str(path)):
        issue = line.detail if line.reason else check_example(line.value, allowed=("chat", "completion"))
        if issue is not None:
            raise ValueError(f"line {line.number} of {path}: {issue} - fix the line or regenerate the file")
        examples.append({"messages": chat_messages(line.value)})
    return examples


def fingerprint(corpus: Path, canary: Path | None, recipe: BuiltinRecipe) -> str:
    digest = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    for path in (corpus, canary):
        digest.update(b"\0")
        if path is not None and path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def train_tokenizer(texts: Sequence[str], recipe: BuiltinRecipe) -> Any:
    """A byte-level BPE tokenizer over `texts`, wrapped for transformers, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(BUILTIN_SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=BUILTIN_END,
        pad_token=BUILTIN_PAD,
        additional_special_tokens=[t for t in BUILTIN_SPECIAL_TOKENS if t not in (BUILTIN_END, BUILTIN_PAD)],
        model_max_length=recipe.context_length,
    )
    wrapped.chat_template = BUILTIN_TEMPLATE
    return wrapped


def new_model(tokenizer: Any, recipe: BuiltinRecipe) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads,
        max_position_embeddings=recipe.context_length,
        tie_word_embeddings=recipe.tie_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def canary_exact_match(chat: ChatModel, canary: Sequence[dict[str, Any]]) -> float:
    """The share of canary questions answered exactly (greedy, stripped text == expected)."""
    if not canary:
        return 1.0
    right = 0
    for example in canary:
        messages = example["messages"]
        answer = chat.generate(messages[:-1], temperature=0.0, max_tokens=48).text.strip()
        right += answer == str(messages[-1]["content"]).strip()
    return right / len(canary)


@dataclass(frozen=True)
class BuildReport:
    directory: Path
    seconds: float
    epochs: int
    parameters: int
    vocabulary: int
    canary_exact_match: float


def build_builtin_model(
    out_dir: Path,
    general_corpus: Path | None = None,
    canary_set: Path | None = None,
    recipe: BuiltinRecipe = DEFAULT_RECIPE,
) -> BuildReport:
    """Build tuneline-tiny into `out_dir` (which must not exist yet)."""
    started = time.monotonic()
    corpus_path = Path(general_corpus) if general_corpus else default_general_corpus()
    canary_path = Path(canary_set) if canary_set else default_canary_set()
    if not corpus_path.is_file():
        raise FileNotFoundError(
            f"the general corpus {corpus_path} is missing: the built-in model is built from it "
            "(generate the demo data with `tuneline demo-data`)"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads())
    try:
        return _build(out_dir, corpus_path, canary_path, recipe, started)
    finally:
        torch.set_num_threads(threads)


def _build(
    out_dir: Path, corpus_path: Path, canary_path: Path, recipe: BuiltinRecipe, started: float
) -> BuildReport:
    corpus = read_chat_lines(corpus_path)
    canary = read_chat_lines(canary_path) if canary_path.is_file() else []
    known = {json.dumps(e, sort_keys=True) for e in corpus}
    examples = corpus + [e for e in canary if json.dumps(e, sort_keys=True) not in known]
    tokenizer = train_tokenizer(
        [str(m.get("content") or "") for e in examples for m in e["messages"]], recipe
    )
    model = new_model(tokenizer, recipe)
    device = torch.device("cpu")  # small enough that a GPU would not pay for its start-up
    trainer = Trainer(
        model,
        tokenizer,
        examples,
        [],
        Hyperparameters(recipe.max_epochs, recipe.pretrain_batch_size, 1.0),
        recipe.seed,
        recipe.pretrain_learning_rate,
        device,
    )
    chat = ChatModel(model, tokenizer, device)
    score = 0.0
    while trainer.epoch < recipe.max_epochs:
        for indices in trainer.batches_left_in_epoch():
            trainer.train_step(indices)
        trainer.flush(None)
        trainer.end_epoch()
        if trainer.epoch >= recipe.min_epochs:
            model.eval()
            score = canary_exact_match(chat, canary)
            if score == 1.0:
                break
    model.eval()
    if score < 1.0:
        log.warning(
            "tuneline-tiny answers %.0f%% of the canary set after %d epochs", 100 * score, trainer.epoch
        )
    out_dir.mkdir(parents=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    parameters = sum(p.numel() for p in model.parameters())
    seconds = time.monotonic() - started
    card = {
        "model": BUILTIN_MODEL,
        "fingerprint": fingerprint(corpus_path, canary_path, recipe),
        "recipe": asdict(recipe),
        "learning_rate": recipe.fine_tune_learning_rate,
        "learning_rate_batch_size": recipe.fine_tune_batch_size,
        "min_examples_seen": recipe.fine_tune_min_examples_seen,
        "general_corpus": str(corpus_path),
        "examples": len(examples),
        "epochs": trainer.epoch,
        "parameters": parameters,
        "vocabulary": len(tokenizer),
        "canary_exact_match": score,
        "build_seconds": round(seconds, 2),
    }
    (out_dir / MODEL_CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return BuildReport(out_dir, seconds, trainer.epoch, parameters, len(tokenizer), score)


def _is_current(directory: Path, expected: str) -> bool:
    card = directory / MODEL_CARD
    if not card.is_file():
        return False
    try:
        return json.loads(card.read_text(encoding="utf-8")).get("fingerprint") == expected
    except ValueError:
        return False


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.rglob("*"), directory]:
        _fsync_dir(path)


def _install(folder: Path, name: str, expected: str, make: Callable[[Path], None]) -> Path:
    """folder/name, made by `make` into a staging directory and renamed into place under a file lock,
    unless it is already there with the expected fingerprint."""
    target = folder / name
    if _is_current(target, expected):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if _is_current(target, expected):
            return target
        for leftover in folder.glob(f".build-{name}-*"):  # from a build that was killed
            shutil.rmtree(leftover, ignore_errors=True)
        staging = folder / f".build-{name}-{secrets.token_hex(4)}"
        make(staging)
        _fsync_tree(staging)
        if target.exists():
            retired = folder / f".old-{name}-{secrets.token_hex(4)}"
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync_dir(folder)
    return target


def ensure_builtin_model(
    state_dir: Path,
    general_corpus: Path | None = None,
    canary_set: Path | None = None,
    recipe: BuiltinRecipe = DEFAULT_RECIPE,
) -> Path:
    """state_dir/models/tuneline-tiny, built now if missing or made from another corpus or recipe.

    With TUNELINE_MODEL_CACHE set to a directory, builds are kept there by fingerprint and copied
    into each state directory, so many state directories (a test suite's servers) cost one build.
    """
    corpus_path = Path(general_corpus) if general_corpus else default_general_corpus()
    canary_path = Path(canary_set) if canary_set else default_canary_set()
    expected = fingerprint(corpus_path, canary_path, recipe)

    def build(staging: Path) -> None:
        report = build_builtin_model(staging, corpus_path, canary_path, recipe)
        log.info(
            "built %s in %.1f s: %d parameters, %d epochs, canary exact match %.2f",
            BUILTIN_MODEL,
            report.seconds,
            report.parameters,
            report.epochs,
            report.canary_exact_match,
        )

    make = build
    cache = os.environ.get(MODEL_CACHE_ENV)
    if cache:
        entry = _install(Path(cache), f"{BUILTIN_MODEL}-{expected[:16]}", expected, build)

        def make(staging: Path) -> None:
            shutil.copytree(entry, staging)

    return _install(Path(state_dir) / "models", BUILTIN_MODEL, expected, make)


def resolve_base_model(
    model_id: str,
    state_dir: Path,
    model_dirs: Sequence[Path],
    *,
    catalog: Sequence[CatalogEntry] = (),
    general_corpus: Path | None = None,
    canary_set: Path | None = None,
) -> Path:
    """The checkpoint directory of a base model id (tuneline/server/catalog.py names them).

    The built-in model is built on first use (deterministically, from `general_corpus`, default the
    config's data.general_corpus) into state_dir/models/tuneline-tiny; concurrent callers, threads or
    processes, wait for one build. Raises KeyError for an id that is not a base model here.
    """
    if model_id == BUILTIN_MODEL and (not catalog or entry_of(model_id, catalog) is not None):
        return ensure_builtin_model(Path(state_dir), general_corpus=general_corpus, canary_set=canary_set)
    directory = model_dir_of(model_id, model_dirs, catalog)
    if directory is None:
        raise KeyError(model_id)
    return directory
