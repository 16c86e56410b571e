"""The models `tuneline serve` trains and answers with: base model ids, loading, and generation.

Base models are the built-in `tuneline-tiny` (built from the general corpus on first use, see
tuneline/server/builtin.py) and every Hugging Face causal-LM checkpoint directory given with
`--model-dir`, named by its folder. Checkpoints are read from disk only (`local_files_only`, and the
hub is switched off for the whole process). A model directory is either a full checkpoint
(config.json + safetensors + tokenizer files) or a LoRA adapter directory (adapter_config.json) whose
`base_model_name_or_path` is the directory of the model it adapts (itself possibly an adapter).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import queue
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Never reach a hub: every model is a directory on this machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from tuneline.server.chat_template import ChatFormat

log = logging.getLogger(__name__)

BUILTIN_MODEL = "tuneline-tiny"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "tuneline_model.json"  # written by the built-in build: recipe, learning rate, canary score


class ContextLengthExceeded(ValueError):
    """The prompt does not fit the model's context (the API answers 400 context_length_exceeded)."""


def base_model_ids(model_dirs: Sequence[Path]) -> list[str]:
    """`tuneline-tiny` and the folder name of every checkpoint directory given with --model-dir.

    Directories without config.json or adapter_config.json are left out (with a warning); a folder
    named like an earlier id is shadowed by it.
    """
    ids = [BUILTIN_MODEL]
    for directory in model_dirs:
        path = Path(directory)
        if not is_model_dir(path):
            log.warning(
                "--model-dir %s holds no config.json or %s: not a model, ignored", path, ADAPTER_CONFIG
            )
            continue
        if path.name in ids:
            log.warning("--model-dir %s: the id %r is taken, ignored", path, path.name)
            continue
        ids.append(path.name)
    return ids


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def resolve_base_model(
    model_id: str,
    state_dir: Path,
    model_dirs: Sequence[Path],
    *,
    general_corpus: Path | None = None,
    canary_set: Path | None = None,
) -> Path:
    """The checkpoint directory of a base model id.

    The built-in model is built on first use (deterministically, from `general_corpus`, default the
    config's data.general_corpus) into state_dir/models/tuneline-tiny; concurrent callers, threads or
    processes, wait for one build. Raises KeyError for an id that is not a base model here.
    """
    if model_id == BUILTIN_MODEL:
        from tuneline.server.builtin import ensure_builtin_model

        return ensure_builtin_model(Path(state_dir), general_corpus=general_corpus, canary_set=canary_set)
    for directory in model_dirs:
        path = Path(directory)
        if path.name == model_id and is_model_dir(path):
            return path.resolve()
    raise KeyError(model_id)


# -- loading -------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def inference_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved with a model (an adapter directory falls back to its base's)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not _has_tokenizer(path) and (path / ADAPTER_CONFIG).is_file():
        return load_tokenizer(adapter_base(path))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def adapter_base(path: Path) -> Path:
    """The directory of the model a LoRA adapter directory adapts."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / ADAPTER_CONFIG} names no base_model_name_or_path")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = (Path(path) / base_path).resolve()
    if not is_model_dir(base_path):
        raise FileNotFoundError(f"the base model {base_path} of the adapter {path} is not on this machine")
    return base_path


def load_causal_lm(path: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """A causal LM from a directory, on `device`, in eval mode; adapters are merged into their base."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        from peft import PeftModel

        base = load_causal_lm(adapter_base(path), device, dtype)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=False).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    model.to(device)
    model.eval()
    return model


def parameter_count(path: Path) -> int:
    """The number of parameters of the model in a directory, counted without loading its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        return parameter_count(adapter_base(path))
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def context_length(config: Any, default: int = 2048) -> int:
    """The longest sequence the model's positions allow."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def cache_keyword(model: Any) -> str:
    """The forward() keyword of the KV cache: `cache` in transformers 5, `past_key_values` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# -- generation ----------------------------------------------------------------------------------


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class _Progress:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    text: list[str] = field(default_factory=list)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(eq=False)
class _Row:
    """One request's token loop inside a batch: its prompt, sampling settings and the queue its tokens
    go to (None ends it, an exception is raised in the reader)."""

    prompt: list[int]
    temperature: float
    top_p: float
    budget: int
    generator: torch.Generator
    # Whole: its tokens are handed over once, at its end (no reader wakes up for each token).
    whole: bool = False
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    produced: list[int] = field(default_factory=list)


class BatchedDecoder:
    """Decodes the concurrent requests to one model together: requests that wait while a batch runs
    form the next batch (up to MAX_BATCH rows, prompts left-padded, one forward pass per token for all
    of them), so a server answering an evaluation's concurrent requests pays a small model's per-step
    overhead once per batch instead of once per request. Each row keeps its own temperature, top_p,
    seed and budget; a row ends at a stop token, its budget, or when its reader stops reading. The
    worker thread runs only while there is work."""

    MAX_BATCH = 16

    def __init__(self, model: Any, device: torch.device, pad_id: int, stop_ids: frozenset[int]) -> None:
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self._cache_keyword = cache_keyword(model)
        # Only the last position's logits are needed: a large vocabulary's prefill logits for a whole
        # batch of prompts would take gigabytes.
        parameters = inspect.signature(model.forward).parameters
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self._waiting: list[_Row] = []
        self._lock = threading.Lock()
        self._working = False

    def tokens(
        self,
        prompt: list[int],
        temperature: float,
        top_p: float,
        budget: int,
        seed: int | None,
        whole: bool = False,
    ) -> Iterator[int]:
        """The row's tokens as they come, or with `whole` all at its end (for a reader that needs none
        before then: fewer thread switches while the batch decodes)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        row = _Row(prompt, temperature, top_p, budget, generator, whole)
        with self._lock:
            self._waiting.append(row)
            if not self._working:
                self._working = True
                threading.Thread(target=self._work, name="tuneline-decode", daemon=True).start()
        try:
            while (item := row.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, list):
                    yield from item
                else:
                    yield item
        finally:
            row.cancelled = True

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    self._working = False
                    return
                batch = self._waiting[: self.MAX_BATCH]
                del self._waiting[: self.MAX_BATCH]
            try:
                self._decode(batch)
            except BaseException as exc:  # handed to every reader of the batch, never lost
                for row in batch:
                    row.out.put(exc)

    @torch.inference_mode()
    def _decode(self, batch: list[_Row]) -> None:
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            cache = DynamicCache()
        width = max(len(row.prompt) for row in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for index, row in enumerate(batch):
            ids[index, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[index, width - len(row.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        active = [row.budget > 0 for row in batch]

        def end(row: _Row) -> None:
            if row.whole:
                row.out.put(row.produced)
            row.out.put(None)

        for index, row in enumerate(batch):
            if not active[index]:
                end(row)
        while any(active):
            output = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_keyword: cache},
                **self._last_logits_only,
            )
            logits = output.logits[:, -1].float()
            greedy = logits.argmax(dim=-1).tolist()
            chosen = []
            for index, row in enumerate(batch):
                token = self.pad_id
                if active[index] and row.cancelled:
                    active[index] = False
                    end(row)
                elif active[index]:
                    token = (
                        greedy[index]
                        if row.temperature <= 0
                        else _sample(logits[index], row.temperature, row.top_p, row.generator)
                    )
                    row.produced.append(token)
                    if not row.whole:
                        row.out.put(token)
                    if token in self.stop_ids or len(row.produced) >= row.budget:
                        active[index] = False
                        end(row)
                chosen.append(token)
            ids = torch.tensor(chosen, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1


class ChatModel:
    """A loaded model that answers chat messages: greedy at temperature 0, seeded sampling otherwise,
    stopping at the end-of-turn token, a `stop` string or `max_tokens`; usage counts are real tokens.
    Concurrent requests are decoded together (BatchedDecoder)."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        self.format = ChatFormat(tokenizer)
        self.context_length = context_length(model.config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.decoder = BatchedDecoder(
            model, self.device, int(pad or 0), frozenset(self.format.stop_token_ids)
        )

    @classmethod
    def load(cls, path: Path) -> ChatModel:
        """A model directory (full checkpoint or LoRA adapter) on CUDA when present, else CPU."""
        device = pick_device()
        model = load_causal_lm(Path(path), device, inference_dtype(device))
        return cls(model, load_tokenizer(Path(path)), device)

    def count_tokens(self, messages: Sequence[Mapping[str, Any]], text: str) -> tuple[int, int]:
        """(prompt tokens, completion tokens) of a prompt and an answer text, with this tokenizer."""
        completion = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        return len(self.format.encode_prompt(messages)), completion

    def generate(
        self,
        messages: list[dict[str, Any]],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Generation:
        progress = _Progress()
        pieces = self._pieces(messages, temperature, top_p, max_tokens, stop, seed, progress, streaming=False)
        for piece in pieces:
            progress.text.append(piece)
        return Generation(
            "".join(progress.text), progress.prompt_tokens, progress.completion_tokens, progress.finish_reason
        )

    def stream(
        self,
        messages: list[dict[str, Any]],
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """The answer as text deltas (never splitting a UTF-8 character or emitting part of a stop string)."""
        yield from self._pieces(messages, temperature, top_p, max_tokens, stop, seed, _Progress())

    def _pieces(
        self,
        messages: Sequence[Mapping[str, Any]],
        temperature: float,
        top_p: float,
        max_tokens: int | None,
        stop: list[str] | None,
        seed: int | None,
        progress: _Progress,
        streaming: bool = True,
    ) -> Iterator[str]:
        prompt = self.format.encode_prompt(messages)
        progress.prompt_tokens = len(prompt)
        room = self.context_length - len(prompt)
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"messages resulted in {len(prompt)} tokens. Please reduce the length of the messages."
            )
        budget = room if max_tokens is None else min(max_tokens, room)
        stops = [s for s in [*(stop or []), *self.format.stop_strings] if s]
        hold = max((len(s) for s in stops), default=1) - 1
        ids: list[int] = []
        emitted = 0
        progress.finish_reason = "length"
        for token in self.decoder.tokens(
            prompt, temperature, top_p, budget, seed, whole=not (streaming or stops)
        ):
            if token in self.format.stop_token_ids:
                progress.finish_reason = "stop"
                break
            ids.append(token)
            progress.completion_tokens = len(ids)
            if not (streaming or stops):
                continue  # nothing to cut or send before the end: the text is decoded once, below
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            cut = _first_stop(text, stops, max(0, emitted - hold))
            if cut is not None:
                progress.finish_reason = "stop"
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text) - hold
            while safe > emitted and text[safe - 1] == "\ufffd":  # an unfinished UTF-8 sequence
                safe -= 1
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        if len(text) > emitted:
            yield text[emitted:]


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    found = [index for s in stops if (index := text.find(s, start)) >= 0]
    return min(found) if found else None
