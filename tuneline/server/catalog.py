"""The names of the models `tuneline serve` knows, without any model code: importing this module never
imports torch, so the API process can list and name its models before it loads any.

- Base models: the built-in `tuneline-tiny` (built from the general corpus on first use, see
  tuneline/server/builtin.py) and every Hugging Face causal-LM checkpoint directory given with
  `--model-dir`, named by its folder. A model directory is either a full checkpoint (config.json +
  weights + tokenizer files) or a LoRA adapter directory (adapter_config.json).
- Models the server makes: `ft:{base}:{org}:{suffix}:{8 letters or digits}` for a fine-tuned model
  (the suffix slot empty when the job has none), `{that}:ckpt-step-{N}` for its checkpoints.
"""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Sequence
from pathlib import Path

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


def is_model_dir(path: Path) -> bool:
    """Whether a directory holds a checkpoint: config.json, or a LoRA adapter's adapter_config.json."""
    return (Path(path) / "config.json").is_file() or (Path(path) / ADAPTER_CONFIG).is_file()


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


def model_dir_of(model_id: str, model_dirs: Sequence[Path]) -> Path | None:
    """The --model-dir directory serving `model_id`, None when no such directory is given."""
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
