"""Many LoRA fine-tunes of one base, the base in memory once.

A LoRA fine-tune is served as its adapter over a shared copy of its base, not merged into a full copy
of its own: the first fine-tune of a base loads the base and wraps it in a peft model, each further one
only adds its adapter to it (`PeftModel.load_adapter`), so N fine-tunes cost the base once plus N
adapters. Their requests go through one BatchedDecoder over that peft model, each row naming its
adapter (peft's mixed-adapter batches, `adapter_names`): requests for different fine-tunes of the same
base decode in the same batch, and moving from one fine-tune to another never reloads the base.

The shared base lives as long as a loaded fine-tune uses it (the registry holds it weakly): when the
model cache has let go of all its fine-tunes, the base goes too. Adapters stay in the peft model while it
lives (an adapter is small; removing one under a running batch would break the batch).
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from pathlib import Path
from typing import Any

import torch

from tuneline.server.chat_template import ChatFormat
from tuneline.server.modeling import BatchedDecoder, ChatModel, adapter_base, load_causal_lm, load_tokenizer


class SharedBase:
    """One base checkpoint in memory, wrapped by peft, with the adapters added to it and one decoder."""

    def __init__(
        self, base_dir: Path, first_adapter: Path, name: str, device: torch.device, dtype: torch.dtype
    ):
        from peft import PeftModel

        self.base_dir = base_dir
        self.tokenizer = load_tokenizer(base_dir)
        base = load_causal_lm(base_dir, device, dtype)
        self.model = PeftModel.from_pretrained(
            base, str(first_adapter), adapter_name=name, is_trainable=False
        )
        self.model.eval()
        fmt = ChatFormat(self.tokenizer)
        stops = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
        fmt.stop_token_ids.update(
            t for t in ([stops] if isinstance(stops, int) else stops or []) if isinstance(t, int) and t >= 0
        )
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        self.decoder = BatchedDecoder(
            self.model, device, int(pad or 0), frozenset(fmt.stop_token_ids), per_row_adapters=True
        )
        self.device = device
        self._lock = threading.Lock()

    def add(self, adapter_dir: Path, name: str) -> None:
        """Adds an adapter (once; between two forward passes of the decoder)."""
        with self._lock:
            if name in self.model.peft_config:
                return
            with self.decoder.forward_lock:
                self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
                self.model.eval()

    def adapter_names(self) -> list[str]:
        return list(self.model.peft_config)


_bases: weakref.WeakValueDictionary[tuple[str, str, str], SharedBase] = weakref.WeakValueDictionary()
_bases_lock = threading.Lock()


def adapter_name(adapter_dir: Path) -> str:
    """The name of an adapter inside the shared peft model (peft names may not hold dots)."""
    return "ft_" + hashlib.sha256(str(Path(adapter_dir).resolve()).encode()).hexdigest()[:16]


def shared_base(adapter_dir: Path, device: torch.device, dtype: torch.dtype) -> SharedBase:
    """The shared base of an adapter directory, with that adapter added (the base loaded if no loaded
    fine-tune holds it yet)."""
    base_dir = adapter_base(adapter_dir).resolve()
    key = (str(base_dir), str(device), str(dtype))
    name = adapter_name(adapter_dir)
    with _bases_lock:
        shared = _bases.get(key)
        if shared is None:
            shared = SharedBase(base_dir, adapter_dir, name, device, dtype)
            _bases[key] = shared
            return shared
    shared.add(adapter_dir, name)
    return shared


def adapter_chat_model(adapter_dir: Path, device: torch.device, dtype: torch.dtype) -> ChatModel:
    """A LoRA fine-tune as a ChatModel that answers with its adapter over its shared base."""
    shared = shared_base(adapter_dir, device, dtype)
    model = ChatModel(
        shared.model,
        load_tokenizer(adapter_dir),
        device,
        decoder=shared.decoder,
        adapter=adapter_name(adapter_dir),
    )
    model.shared_base = shared  # type: ignore[attr-defined]  # keeps the base alive while this model is
    return model


def held_bytes(models: list[Any]) -> int:
    """The bytes of the distinct tensor storages (parameters and buffers) the models hold together."""
    seen: dict[int, int] = {}
    for model in models:
        module = model if isinstance(model, torch.nn.Module) else model.model  # a ChatModel's model
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
