"""The names of the models `tuneline serve` knows, without any model code: importing this module never
imports torch, so the API process can list and name its models before it loads any.

- Base models: the catalog (`server.models` in the config, and `tuneline serve --model`): a name for
  each model, the hub id or directory it comes from, and its settings (CatalogEntry: LoRA or full
  training, context length, dtype). Without a catalog the built-in `tuneline-tiny` (built from the
  general corpus on first use, see tuneline/server/builtin.py) is served; with one, only when the
  catalog lists it. Every checkpoint directory given with `--model-dir` is added, named by its
  folder. A model directory is either a full checkpoint (config.json + weights + tokenizer files) or a
  LoRA adapter directory (adapter_config.json). Hub ids are resolved to directories of the model cache
  before the server starts (tuneline/server/hub.py), so the server itself only ever reads directories.
- Models the server makes: `ft:{base}:{org}:{suffix}:{8 letters or digits}` for a fine-tuned model
  (the suffix slot empty when the job has none), `{that}:ckpt-step-{N}` for its checkpoints.
"""

from __future__ import annotations

import json
import logging
import secrets
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from tuneline.server.settings import ORGANIZATION

log = logging.getLogger(__name__)

BUILTIN_MODEL = "tuneline-tiny"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD = "tuneline_model.json"  # written by the built-in build: recipe, learning rate, canary score
# What "auto" hyperparameters mean for fine-tunes of tuneline-tiny (hyperparameters.AutoRules: the batch
# size its base learning rate is tuned at, the fewest examples x epochs a job shows it); its recipe
# (builtin.py) writes them into its card, and the scheduler reads them here before it is ever built.
BUILTIN_LEARNING_RATE_BATCH_SIZE = 4
BUILTIN_MIN_EXAMPLES_SEEN = 1000

_NAME_ALPHABET = string.ascii_letters + string.digits


TRAINING_CHOICES = ("auto", "lora", "full")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# What "lora" and "full" mean for the worker's parameter threshold (above it, LoRA).
ALWAYS_LORA, NEVER_LORA = 0, 1 << 62


@dataclass(frozen=True)
class CatalogEntry:
    """One base model of the catalog: its name (the id clients use), where it comes from (a hub id,
    `org/name` or `org/name@revision`, a checkpoint directory, or `tuneline-tiny`), and its settings:
    `training` lora | full | auto (auto: LoRA above server.lora_above_params parameters), the context
    length it is trained and served with (None: the checkpoint's own; a larger value is capped at it),
    and the dtype it is served in (auto: bfloat16 or float16 on a GPU, float32 on a CPU). `path` is the
    directory its files are in, once resolved."""

    name: str
    source: str
    revision: str | None = None
    training: str = "auto"
    context_length: int | None = None
    dtype: str = "auto"
    path: str | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name) or self.name.startswith("ft:"):
            raise ValueError(
                f"server.models: {self.name!r} is not a usable model name (no spaces, not ft:...)"
            )
        if self.training not in TRAINING_CHOICES:
            raise ValueError(
                f"server.models.{self.name}.training must be one of {', '.join(TRAINING_CHOICES)}, "
                f"got {self.training!r}"
            )
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(
                f"server.models.{self.name}.dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}"
            )
        if self.context_length is not None and self.context_length < 16:
            raise ValueError(
                f"server.models.{self.name}.context_length must be >= 16, got {self.context_length}"
            )
        if self.source == BUILTIN_MODEL and self.name != BUILTIN_MODEL:
            raise ValueError(f"server.models.{self.name}: the built-in model is named {BUILTIN_MODEL}")

    def resolved(self, path: Path) -> CatalogEntry:
        return replace(self, path=str(path))

    def lora_above(self, default: int) -> int:
        """The parameter threshold above which its fine-tunes train LoRA adapters."""
        return {"lora": ALWAYS_LORA, "full": NEVER_LORA}.get(self.training, default)


def catalog_json(entries: Sequence[CatalogEntry]) -> str:
    """The catalog as one JSON string (how the server hands it to a training worker)."""
    return json.dumps([asdict(entry) for entry in entries])


def catalog_from_json(text: str) -> tuple[CatalogEntry, ...]:
    loaded: list[dict[str, Any]] = json.loads(text) if text else []
    return tuple(CatalogEntry(**entry) for entry in loaded)


def entry_of(model_id: str, catalog: Sequence[CatalogEntry]) -> CatalogEntry | None:
    """The catalog entry named `model_id`, None when the catalog has none."""
    return next((entry for entry in catalog if entry.name == model_id), None)


def is_model_dir(path: Path) -> bool:
    """Whether a directory holds a checkpoint: config.json, or a LoRA adapter's adapter_config.json."""
    return (Path(path) / "config.json").is_file() or (Path(path) / ADAPTER_CONFIG).is_file()


def base_model_ids(model_dirs: Sequence[Path], catalog: Sequence[CatalogEntry] = ()) -> list[str]:
    """The catalog's names (`tuneline-tiny` first when there is no catalog), then the folder name of
    every checkpoint directory given with --model-dir.

    Directories without config.json or adapter_config.json are left out (with a warning); a folder
    named like an earlier id is shadowed by it.
    """
    ids = [BUILTIN_MODEL] if not catalog else []
    for entry in catalog:
        if entry.name not in ids:
            ids.append(entry.name)
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


def model_dir_of(
    model_id: str, model_dirs: Sequence[Path], catalog: Sequence[CatalogEntry] = ()
) -> Path | None:
    """The directory serving `model_id` (a resolved catalog entry, or a --model-dir), None when none is
    given (the built-in model is built where its state directory says, see builtin.py)."""
    entry = entry_of(model_id, catalog)
    if entry is not None and entry.path is not None:
        return Path(entry.path)
    for directory in model_dirs:
        path = Path(directory)
        if path.name == model_id and is_model_dir(path):
            return path.resolve()
    return None


def fine_tuned_model_name(base: str, suffix: str | None) -> str:
    """The name a job's model will have: `ft:{base}:{org}:{suffix}:{8 random letters or digits}`."""
    tail = "".join(secrets.choice(_NAME_ALPHABET) for _ in range(8))
    return f"ft:{base}:{ORGANIZATION}:{suffix or ''}:{tail}"


def checkpoint_model_name(model_name: str, step: int) -> str:
    """The model id of a job's checkpoint at `step`."""
    return f"{model_name}:ckpt-step-{step}"
