"""Loading the models `tuneline serve` trains and answers with, and generation.

Which models exist and what they are called is tuneline/server/catalog.py (no torch there). Checkpoints
are read from disk only (`local_files_only`, and the hub is switched off for the whole process). A
model directory is either a full checkpoint (config.json + safetensors + tokenizer files) or a LoRA
adapter directory (adapter_config.json) whose `base_model_name_or_path` is the directory of the model
it adapts (itself possibly an adapter).

Hub ids never reach this module: `tuneline serve` resolves them to directories of its model cache before
it starts (tuneline/server/hub.py). A LoRA adapter over a full checkpoint is served over a shared copy
of its base (tuneline/server/adapters.py); an adapter over another adapter is merged.

Loading and generation share one module (~860 lines, most of it the batched decoder, with its per-row
sampling, logprobs and adapters, and ChatModel's whole, streamed and scored answers): a loaded model is
only ever used through the decoder built around it here, and splitting the two would expose the
decoder's rows and batches to a second module. Turning scores into the hosted shape is logprobs.py.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import queue
import secrets
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# Never reach a hub: every model is a directory on this machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from tuneline.server.catalog import ADAPTER_CONFIG, is_model_dir
from tuneline.server.chat_template import ChatFormat
from tuneline.server.logprobs import Scored, hosted_logprobs

log = logging.getLogger(__name__)


class ContextLengthExceeded(ValueError):
    """The prompt does not fit the model's context (the API answers 400 context_length_exceeded)."""


# -- loading -------------------------------------------------------------------------------------


def pick_device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# torch's intra-op threads when this process started: OMP_NUM_THREADS, else one per core.
TORCH_THREADS = torch.get_num_threads()


def cpu_threads(requested: int | None = None) -> int:
    """Threads for torch on the CPU (training, building, decoding): `requested`, else
    TUNELINE_CPU_THREADS, else the cores not already busy by the 1-minute load average (at least 1).
    On a shared machine, threads that wait on a core someone else holds stall every parallel op,
    which costs far more than they bring."""
    if requested:
        return max(1, requested)
    configured = os.environ.get("TUNELINE_CPU_THREADS")
    if configured:
        return max(1, int(configured))
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, TORCH_THREADS, cores - round(busy)))


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


def is_adapter_of_checkpoint(path: Path) -> bool:
    """A LoRA adapter directory whose base is a full checkpoint (not itself an adapter)."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or (path / "config.json").is_file():
        return False
    try:
        base = adapter_base(path)
    except (ValueError, FileNotFoundError):
        return False
    return (base / "config.json").is_file()


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


def context_length_of(path: Path) -> int:
    """The context of the model in a directory (an adapter's is its base's), without loading weights."""
    from transformers import AutoConfig

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        return context_length_of(adapter_base(path))
    return context_length(AutoConfig.from_pretrained(str(path), local_files_only=True))


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
    # With logprobs asked for: one entry per answer token, {token, logprob, bytes, top_logprobs}.
    logprobs: list[dict[str, Any]] | None = None


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
    """One request's token loop inside a batch: its prompt, sampling settings and where its tokens
    go, by put(): each token, or with `whole` the list of them at its end; then None, which ends it
    (an exception instead is raised in the reader)."""

    prompt: list[int]
    temperature: float
    top_p: float
    budget: int
    generator: torch.Generator
    out: queue.SimpleQueue[Any] | _FutureSink
    # Whole: its tokens are handed over once, at its end (no reader wakes up for each token).
    whole: bool = False
    cancelled: bool = False
    produced: list[int] = field(default_factory=list)
    # Where the logprob of each chosen token goes (with `top` alternatives), None when not asked for.
    scores: list[Scored] | None = None
    top: int = 0
    # The LoRA adapter this row decodes with, on a decoder over a shared base (adapters.py); None: none.
    adapter: str | None = None


class _FutureSink:
    """The out of a whole row read by an asyncio task: settles the task's future from the decoder
    thread, so that no thread waits for the row."""

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[list[int]]) -> None:
        self.loop = loop
        self.future = future
        self.tokens: list[int] = []

    def put(self, item: Any) -> None:
        if isinstance(item, list):
            self.tokens = item
        elif item is None or isinstance(item, BaseException):
            self.loop.call_soon_threadsafe(self._settle, item)

    def _settle(self, item: BaseException | None) -> None:
        if self.future.done():  # cancelled by its reader, or settled by an earlier end
            return
        if item is None:
            self.future.set_result(self.tokens)
        else:
            self.future.set_exception(item)


class BatchedDecoder:
    """Decodes the concurrent requests to one model together, with continuous batching: one forward
    pass per token for all running rows (up to MAX_BATCH), and a request that arrives while they run
    joins them between two tokens (the prompts that arrived meanwhile prefilled together,
    left-padded, then merged into the batch), instead of waiting for the batch to end. So a server
    answering an evaluation's concurrent requests pays a small model's per-pass overhead once per
    batch instead of once per request, and a short answer never waits for a long one. Each row keeps
    its own temperature, top_p, seed and budget; a row leaves at a stop token, its budget, or when its
    reader stops reading. The worker thread runs only while there is work."""

    MAX_BATCH = 16

    def __init__(
        self,
        model: Any,
        device: torch.device,
        pad_id: int,
        stop_ids: frozenset[int],
        per_row_adapters: bool = False,
    ) -> None:
        """`per_row_adapters`: `model` is a peft model over a shared base whose rows each name their
        adapter (peft's mixed-adapter batches; a row naming none decodes with the base alone)."""
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.multi_adapter = per_row_adapters
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_keyword = cache_keyword(inner)
        # Held around each forward pass, and by whoever adds an adapter to the model meanwhile.
        self.forward_lock = threading.Lock()
        # Only the last position's logits are needed: a large vocabulary's prefill logits for a whole
        # batch of prompts would take gigabytes.
        parameters = inspect.signature(inner.forward).parameters
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
        scores: list[Scored] | None = None,
        top: int = 0,
        adapter: str | None = None,
    ) -> Iterator[int]:
        """The row's tokens as they come, or with `whole` all at its end (for a reader that needs none
        before then: fewer thread switches while the batch decodes). With `scores`, each token's
        logprob (and `top` alternatives) is appended there before the token is handed over."""
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        row = _Row(
            prompt,
            temperature,
            top_p,
            budget,
            self._generator(seed),
            out,
            whole,
            scores=scores,
            top=top,
            adapter=adapter,
        )
        self._enqueue(row)
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, list):
                    yield from item
                else:
                    yield item
        finally:
            row.cancelled = True

    async def whole_tokens(
        self,
        prompt: list[int],
        temperature: float,
        top_p: float,
        budget: int,
        seed: int | None,
        scores: list[Scored] | None = None,
        top: int = 0,
        adapter: str | None = None,
    ) -> list[int]:
        """All of the row's tokens, awaited in the event loop: the decoder thread settles the future,
        no thread of the caller's waits (one thread switch per answer instead of two or more)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        sink = _FutureSink(loop, future)
        row = _Row(
            prompt,
            temperature,
            top_p,
            budget,
            self._generator(seed),
            sink,
            whole=True,
            scores=scores,
            top=top,
            adapter=adapter,
        )
        self._enqueue(row)
        try:
            return await future
        finally:
            row.cancelled = True

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        return generator

    def _enqueue(self, row: _Row) -> None:
        with self._lock:
            self._waiting.append(row)
            if not self._working:
                self._working = True
                threading.Thread(target=self._work, name="tuneline-decode", daemon=True).start()

    @torch.inference_mode()
    def _work(self) -> None:
        if self.device.type == "cpu":
            # Sized when a burst of requests starts: the HTTP side and local clients need cores too.
            torch.set_num_threads(cpu_threads())
        running: _Running | None = None
        while True:
            with self._lock:
                joining: list[_Row] = []
                if running is None or running.joinable:
                    room = self.MAX_BATCH - (len(running.rows) if running else 0)
                    joining = self._waiting[:room]
                    del self._waiting[:room]
                if running is None and not joining:
                    self._working = False
                    return
            try:
                running = self._advance(running, joining)
            except BaseException as exc:  # handed to every reader of the batch, never lost
                for row in dict.fromkeys([*(running.rows if running else []), *joining]):
                    row.out.put(exc)
                running = None

    def _advance(self, batch: _Running | None, joining: list[_Row]) -> _Running | None:
        """The joining rows' prompts in one prefill pass of their own (left-padded to the longest),
        merged into the running batch between two of its tokens; then one decode pass: the next token
        of every row. None when no row is left."""
        for row in joining:
            if row.budget <= 0:
                _end(row)
        joining = [row for row in joining if row.budget > 0]
        if joining:
            joined = self._prefill(joining)  # rows that ended at their first token have left it
            if batch is None:
                batch = joined
            elif joined.rows:
                batch.merge(joined)
        if batch is None or not batch.rows:
            return None
        ids = batch.pending
        mask = torch.cat([batch.mask, torch.ones_like(ids)], dim=1)
        self._forward(batch, ids, mask, batch.positions)
        return batch if batch.rows else None

    def _prefill(self, rows: list[_Row]) -> _Running:
        """A batch of these rows with their prompts run through the model and their first token chosen."""
        width = max(len(row.prompt) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row.prompt)
            ids[index, width - length :] = torch.tensor(row.prompt)
            mask[index, width - length :] = 1
            positions[index, width - length :] = torch.arange(length)
        batch = _Running(self._new_cache(), self.device)
        batch.rows = list(rows)
        self._forward(batch, ids.to(self.device), mask.to(self.device), positions.to(self.device))
        return batch

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # transformers 4.x
            return DynamicCache()

    def _forward(
        self, batch: _Running, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Runs `ids` through the model into the batch's cache, samples each row's next token, hands
        it over, and drops the rows that ended (stop token, budget, or a reader that left)."""
        adapters = (
            {"adapter_names": [row.adapter or "__base__" for row in batch.rows]} if self.multi_adapter else {}
        )
        with self.forward_lock:
            output = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_keyword: batch.cache},
                **self._last_logits_only,
                **adapters,
            )
        batch.mask = mask
        batch.positions = positions[:, -1:] + 1
        logits = output.logits[:, -1].float()
        greedy = logits.argmax(dim=-1).tolist()
        # The model's own distribution (before temperature and top_p), as the hosted logprobs are.
        scored = [index for index, row in enumerate(batch.rows) if row.scores is not None]
        logprobs = torch.log_softmax(logits[scored], dim=-1) if scored else None
        chosen: list[int] = []
        kept: list[int] = []
        for index, row in enumerate(batch.rows):
            if row.cancelled:
                _end(row)
                continue
            token = (
                greedy[index]
                if row.temperature <= 0
                else _sample(logits[index], row.temperature, row.top_p, row.generator)
            )
            if row.scores is not None and logprobs is not None:
                own = logprobs[scored.index(index)]
                best = torch.topk(own, row.top) if row.top > 0 else None
                row.scores.append(
                    (
                        token,
                        float(own[token]),
                        best.indices.tolist() if best is not None else [],
                        best.values.tolist() if best is not None else [],
                    )
                )
            row.produced.append(token)
            if not row.whole:
                row.out.put(token)
            if token in self.stop_ids or len(row.produced) >= row.budget:
                _end(row)
                continue
            chosen.append(token)
            kept.append(index)
        batch.pending = torch.tensor(chosen, dtype=torch.long, device=self.device).unsqueeze(1)
        batch.keep(kept)


def _end(row: _Row) -> None:
    if row.whole:
        row.out.put(row.produced)
    row.out.put(None)


class _Running:
    """A batch being decoded: its rows, their KV cache, the attention mask over the cache (0 where a
    row has nothing: its left padding, or columns from before it joined), the position of each row's
    pending token, and the pending tokens themselves (chosen, not yet run through the model)."""

    def __init__(self, cache: Any, device: torch.device) -> None:
        self.rows: list[_Row] = []
        self.cache = cache
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.positions = torch.zeros((0, 1), dtype=torch.long, device=device)
        self.pending = torch.zeros((0, 1), dtype=torch.long, device=device)

    @property
    def joinable(self) -> bool:
        """Whether new rows can join this batch between two tokens: its cache is a plain dynamic
        cache per layer (transformers >= 4.54) that another batch's rows can be merged into.
        Sliding-window and older caches decode to their end first (new rows wait for the next batch)."""
        layers: list[Any] = getattr(self.cache, "layers", None) or []
        return bool(layers) and all(_plain_layer(layer) for layer in layers)

    def merge(self, other: _Running) -> None:
        """Takes in the rows of another batch (their prompts prefilled, first tokens pending): both
        caches end at the same column, the right edge, so the shorter one gets empty (masked) columns
        on its left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_padded(mine.keys, width, 2), _left_padded(theirs.keys, width, 2)])
            mine.values = torch.cat(
                [_left_padded(mine.values, width, 2), _left_padded(theirs.values, width, 2)]
            )
        self.mask = torch.cat([_left_padded(self.mask, width, 1), _left_padded(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.pending = torch.cat([self.pending, other.pending])
        self.rows = [*self.rows, *other.rows]

    def keep(self, indices: list[int]) -> None:
        """Keeps only these rows (ended rows leave the batch; `pending` holds the kept rows' tokens
        already), then cuts the cache columns that are empty for every row left."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not indices:
            return
        selected = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(selected)
        self.mask = self.mask[selected]
        self.positions = self.positions[selected]
        empty = int(self.mask.argmax(dim=1).min())  # leading columns no row attends to
        if empty > 0 and self.joinable:
            self.mask = self.mask[:, empty:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, empty:]
                layer.values = layer.values[:, :, empty:]


def _plain_layer(layer: Any) -> bool:
    return type(layer).__name__ == "DynamicLayer" and isinstance(getattr(layer, "keys", None), torch.Tensor)


def _left_padded(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class ChatModel:
    """A loaded model that answers chat messages: greedy at temperature 0, seeded sampling otherwise,
    stopping at the end-of-turn token, a `stop` string or `max_tokens`; usage counts are real tokens.
    Concurrent requests are decoded together (BatchedDecoder)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device | None = None,
        decoder: BatchedDecoder | None = None,
        adapter: str | None = None,
    ) -> None:
        """`decoder` and `adapter`: a LoRA fine-tune answering through the decoder of its shared base
        (tuneline/server/adapters.py) with its adapter, instead of a decoder of its own."""
        self.model = model
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        self.format = ChatFormat(tokenizer)
        # The checkpoint's own stop ids too (Llama 3.1: <|end_of_text|>, <|eom_id|>, <|eot_id|>).
        stops = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.format.stop_token_ids.update(
            t for t in ([stops] if isinstance(stops, int) else stops or []) if isinstance(t, int) and t >= 0
        )
        self.context_length = context_length(model.config)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.decoder = decoder or BatchedDecoder(
            model, self.device, int(pad or 0), frozenset(self.format.stop_token_ids)
        )
        self._token_bytes: dict[int, bytes] = {}

    @classmethod
    def load(cls, path: Path, dtype: str = "auto", context_length: int | None = None) -> ChatModel:
        """A model directory (full checkpoint or LoRA adapter) on CUDA when present, else CPU, in
        `dtype` (auto: inference_dtype), answering within `context_length` tokens when that is below
        the checkpoint's own."""
        device = pick_device()
        chosen = inference_dtype(device) if dtype == "auto" else getattr(torch, dtype)
        loaded: ChatModel
        if is_adapter_of_checkpoint(Path(path)):
            from tuneline.server.adapters import adapter_chat_model  # LoRA over a base held once

            loaded = adapter_chat_model(Path(path), device, chosen)
        else:
            loaded = cls(load_causal_lm(Path(path), device, chosen), load_tokenizer(Path(path)), device)
        if context_length is not None:
            loaded.context_length = min(loaded.context_length, context_length)
        return loaded

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
        top_logprobs: int | None = None,
    ) -> Generation:
        """The whole answer; with `top_logprobs` (0 or more) each answer token's logprob too."""
        progress = _Progress()
        scores: list[Scored] | None = [] if top_logprobs is not None else None
        pieces = self._pieces(
            messages,
            temperature,
            top_p,
            max_tokens,
            stop,
            seed,
            progress,
            streaming=False,
            scores=scores,
            top=top_logprobs or 0,
        )
        for piece in pieces:
            progress.text.append(piece)
        return Generation(
            "".join(progress.text),
            progress.prompt_tokens,
            progress.completion_tokens,
            progress.finish_reason,
            self.scored_tokens(scores[: progress.completion_tokens], top_logprobs or 0)
            if scores is not None
            else None,
        )

    async def generate_async(
        self,
        messages: list[dict[str, Any]],
        executor: Executor | None = None,
        *,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        top_logprobs: int | None = None,
    ) -> Generation:
        """generate() for an asyncio caller: the answer is awaited, not waited for in a thread. An
        answer that must be watched for stop strings as it grows runs generate() in `executor`."""
        prompt, budget, stops = self._prepared(messages, max_tokens, stop)
        if stops:
            call = partial(
                self.generate,
                messages,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_tokens,
                stop=stop,
                seed=seed,
                top_logprobs=top_logprobs,
            )
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        scores: list[Scored] | None = [] if top_logprobs is not None else None
        ids = await self.decoder.whole_tokens(
            prompt,
            temperature,
            top_p,
            budget,
            seed,
            scores=scores,
            top=top_logprobs or 0,
            adapter=self.adapter,
        )
        finish = "length"
        for index, token in enumerate(ids):
            if token in self.format.stop_token_ids:
                ids, finish = ids[:index], "stop"
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        logprobs = self.scored_tokens(scores[: len(ids)], top_logprobs or 0) if scores is not None else None
        return Generation(text, len(prompt), len(ids), finish, logprobs)

    def scored_tokens(self, scores: Sequence[Scored], top: int) -> list[dict[str, Any]]:
        """Decoder scores in the hosted logprobs shape (tuneline/server/logprobs.py)."""
        return hosted_logprobs(self.tokenizer, scores, top, self._token_bytes)

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

    def scored_stream(
        self,
        messages: list[dict[str, Any]],
        *,
        top_logprobs: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> tuple[Iterator[tuple[str, list[dict[str, Any]] | None]], Generation]:
        """stream() with each text delta's logprob entries (the tokens it adds; None without
        `top_logprobs`), and a Generation whose counts and finish_reason are filled in when the
        deltas end."""
        progress = _Progress()
        scores: list[Scored] | None = [] if top_logprobs is not None else None
        result = Generation("", 0, 0, "length")
        top = top_logprobs or 0

        def pairs() -> Iterator[tuple[str, list[dict[str, Any]] | None]]:
            reported = 0
            pieces = self._pieces(
                messages, temperature, top_p, max_tokens, stop, seed, progress, scores=scores, top=top
            )
            for piece in pieces:
                entries = None
                if scores is not None:
                    entries = self.scored_tokens(scores[reported : progress.completion_tokens], top)
                    reported = progress.completion_tokens
                yield piece, entries
            result.prompt_tokens = progress.prompt_tokens
            result.completion_tokens = progress.completion_tokens
            result.finish_reason = progress.finish_reason
            if scores is not None and reported < progress.completion_tokens:
                yield "", self.scored_tokens(scores[reported : progress.completion_tokens], top)

        return pairs(), result

    def _prepared(
        self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None, stop: list[str] | None
    ) -> tuple[list[int], int, list[str]]:
        """(prompt ids, token budget, stop strings to watch for) of a request; ContextLengthExceeded
        when the prompt leaves no room for an answer."""
        prompt = self.format.encode_prompt(messages)
        room = self.context_length - len(prompt)
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context_length} tokens. However, your "
                f"messages resulted in {len(prompt)} tokens. Please reduce the length of the messages."
            )
        budget = room if max_tokens is None else min(max_tokens, room)
        return prompt, budget, [s for s in [*(stop or []), *self.format.stop_strings] if s]

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
        scores: list[Scored] | None = None,
        top: int = 0,
    ) -> Iterator[str]:
        prompt, budget, stops = self._prepared(messages, max_tokens, stop)
        progress.prompt_tokens = len(prompt)
        hold = max((len(s) for s in stops), default=1) - 1
        ids: list[int] = []
        emitted = 0
        progress.finish_reason = "length"
        for token in self.decoder.tokens(
            prompt,
            temperature,
            top_p,
            budget,
            seed,
            whole=not (streaming or stops),
            scores=scores,
            top=top,
            adapter=self.adapter,
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
