"""/v1/models: which model ids this server knows, and the chat models it holds in memory.

Base models are named by tuneline/server/catalog.py (the catalog, or the built-in one, and every
--model-dir): a name the catalog does not hold is answered with OpenAI's 404 (model_not_found); the
models the server made (fine-tuned models and kept checkpoints) are rows of the store. Loading a
model (torch) happens only in `chat_model`, on first use; answering which models exist never does.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from tuneline.server.catalog import BUILTIN_MODEL, base_model_ids, entry_of, is_model_dir
from tuneline.server.errors import APIError, model_not_found
from tuneline.server.protocol import DeleteModelResponse, ListModelsResponse, Model
from tuneline.server.settings import ORGANIZATION, ServerSettings
from tuneline.server.store import ModelRecord, Store

log = logging.getLogger("tuneline.server")


# The `created` of each base model, fixed when this server first named it: {"model id": unix seconds}.
CREATED_FILE = "base_models_created.json"


def _read_created(path: Path) -> dict[str, int]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {str(k): int(v) for k, v in loaded.items() if isinstance(v, int) and not isinstance(v, bool)}


def _write_created(path: Path, created: dict[str, int]) -> None:
    """Written whole to a temporary file, then renamed over the old one (never half written)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(created, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        log.warning("could not record base model creation times in %s", path, exc_info=True)


def model_object(record: ModelRecord) -> Model:
    return Model(id=record.id, created=record.created, owned_by=ORGANIZATION)


class ModelService:
    """The model ids of this server (base, fine-tuned, checkpoints) and the chat models loaded in
    memory (least recently used evicted beyond `model_cache_size`)."""

    def __init__(self, store: Store, settings: ServerSettings) -> None:
        self.store = store
        self.settings = settings
        self.started = int(time.time())
        self._base_ids: list[str] | None = None
        self._created: dict[str, int] | None = None
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()

    # -- which models exist --

    def base_ids(self) -> list[str]:
        if self._base_ids is None:
            self._base_ids = list(base_model_ids(self.settings.model_dirs, self.settings.models))
        return self._base_ids

    def base_of(self, model_id: str) -> str | None:
        """The base model a model descends from (itself for a base model), None if unknown."""
        if model_id in self.base_ids():
            return model_id
        own = self.store.get_model(model_id)
        if own is None:
            return None
        job = self.store.get_job(own.job_id)
        return job.base_model if job else None

    def available(self) -> list[str]:
        return [*self.base_ids(), *(m.id for m in self.store.list_models())]

    def describe(self, model_id: str) -> Model | None:
        if model_id in self.base_ids():
            owner = ORGANIZATION if model_id == BUILTIN_MODEL else "system"
            return Model(id=model_id, created=self._made(model_id), owned_by=owner)
        own = self.store.get_model(model_id)
        return model_object(own) if own else None

    def retrieve(self, model_id: str) -> Model:
        described = self.describe(model_id)
        if described is None:
            raise model_not_found(model_id)
        return described

    def listing(self) -> ListModelsResponse:
        base = [self.describe(model_id) for model_id in self.base_ids()]
        own = [model_object(m) for m in self.store.list_models()]
        return ListModelsResponse(data=[m for m in base if m] + own)

    def delete(self, model_id: str) -> DeleteModelResponse:
        if model_id in self.base_ids():
            raise APIError(
                403,
                f"The base model `{model_id}` cannot be deleted: only fine-tuned models and checkpoints "
                "made by this server can.",
                param="model",
                code="model_not_deletable",
            )
        if self.store.delete_model(model_id) is None:
            raise model_not_found(model_id)
        self.forget(model_id)
        log.info("deleted model %s", model_id)
        return DeleteModelResponse(id=model_id, deleted=True)

    def _made(self, base_id: str) -> int:
        """A base model's `created`: fixed the first time this server names it (its config's time when
        its weights are on disk then, else that moment) and kept in the state directory (CREATED_FILE),
        so that it does not change when the weights are first built or downloaded, nor across restarts."""
        with self._lock:
            if self._created is None:
                self._created = _read_created(self.store.state_dir / CREATED_FILE)
            if base_id in self._created:
                return self._created[base_id]
            entry = entry_of(base_id, self.settings.models)
            if entry is not None and entry.path is not None:
                directories = [Path(entry.path)]
            elif base_id == BUILTIN_MODEL:
                directories = [self.store.state_dir / "models" / base_id]
            else:
                directories = [Path(d) for d in self.settings.model_dirs if Path(d).name == base_id]
            made = int(time.time())
            for directory in directories[:1]:
                for name in ("config.json", "adapter_config.json"):
                    if (directory / name).is_file():
                        made = int((directory / name).stat().st_mtime)
                        break
            self._created[base_id] = made
            _write_created(self.store.state_dir / CREATED_FILE, self._created)
            return made

    def path_of(self, model_id: str) -> Path:
        own = self.store.get_model(model_id)
        if own is not None:
            return Path(own.path)
        if model_id not in self.base_ids():
            raise model_not_found(model_id)
        from tuneline.server.builtin import resolve_base_model  # torch: only where a model is loaded

        try:
            return resolve_base_model(
                model_id, self.store.state_dir, self.settings.model_dirs, catalog=self.settings.models
            )
        except KeyError:
            raise model_not_found(model_id) from None

    # -- models in memory --

    def loaded(self, model_id: str) -> Any | None:
        """The model if it is in memory (then it exists: a deleted model is forgotten), else None."""
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
        return None

    def chat_model(self, model_id: str) -> Any:
        """The loaded model (loading it once, in the calling thread, if needed)."""
        if (model := self.loaded(model_id)) is not None:
            return model
        # One load at a time: transformers' lazy imports are not safe to run from two threads at once.
        with self._load_lock:
            with self._lock:
                if model_id in self._loaded:
                    return self._loaded[model_id]
            from tuneline.server.modeling import ChatModel  # torch: only where a model is loaded

            path = self.path_of(model_id)
            base = self.base_of(model_id)
            entry = entry_of(base, self.settings.models) if base is not None else None
            started = time.monotonic()
            model = ChatModel.load(
                path,
                dtype=entry.dtype if entry is not None else "auto",
                context_length=entry.context_length if entry is not None else None,
            )
            log.info("loaded model %s from %s in %.1f s", model_id, path, time.monotonic() - started)
            with self._lock:
                self._loaded[model_id] = model
                while len(self._loaded) > self.settings.model_cache_size:
                    self._loaded.popitem(last=False)
            return model

    def warm_up(self) -> None:
        """Load the built-in model when it is on disk already, so that the first chat request does not
        pay for importing the model code (many seconds). A failure here only logs a warning."""
        try:
            if is_model_dir(self.store.models_dir / BUILTIN_MODEL):
                self.chat_model(BUILTIN_MODEL)
        except Exception:
            log.warning("warm-up of the built-in model failed; it loads on first use", exc_info=True)

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._loaded.pop(model_id, None)
