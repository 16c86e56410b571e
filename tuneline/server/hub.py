"""Base models named by Hugging Face hub id, kept in the server's model cache. Imports no torch.

A base model is named by a checkpoint directory on this machine, or by a hub id (`org/name`) with an
optional revision (a branch, tag or commit: `org/name@v1.0`, or `revision=`). `resolve_model` returns
the directory that holds its files:
- a directory is used where it is (it must hold config.json or adapter_config.json);
- a hub id is looked up in the model cache, a folder in huggingface_hub's cache layout
  (`models--org--name/` with `blobs/`, `snapshots/<commit>/` and `refs/<branch or tag>`). With network
  access it is first brought there by huggingface_hub's `snapshot_download`, which shows progress,
  resumes an interrupted download (partial blobs are kept), skips what is already cached and fetches
  only the files a causal LM needs (MODEL_FILES: config, safetensors weights, tokenizer, templates);
- offline (`offline=True`, or HF_HUB_OFFLINE set) nothing is fetched, and a model that is not cached
  fails with ModelNotCached: one line naming the id, the cache folder and `--model-dir`.

Every snapshot is verified once before it is used: each file against the name of the blob it points to,
which the cache layout makes its checksum (the sha256 of an LFS file, the git blob id of any other), so
a truncated or altered download is caught without asking the hub again. The verified commit is
recorded (`models--org--name/tuneline-verified/<commit>`), so later resolutions do not hash gigabytes.

huggingface_hub does the downloading, resuming and caching; this module adds only what it lacks: the
naming rules, the one-line errors, and that check of cached files (huggingface_hub's own
`verify_repo_checksums` asks the hub for the checksums again, which an offline server cannot).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tuneline.server.catalog import BUILTIN_MODEL, CatalogEntry, is_model_dir

# What a causal LM checkpoint needs (and nothing of the other formats a repo may also carry).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
SKIPPED_FOLDERS = ["original/*", "onnx/*", "openvino/*", "gguf/*", "*/original/*"]
VERIFIED_DIR = "tuneline-verified"
MODEL_DIR_HINT = "--model-dir"
_OFF = {"", "0", "false", "no", "off"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelNotCached(LookupError):
    """A hub model that is not in the model cache while the hub may not be asked (one-line message)."""


class ModelUnavailable(RuntimeError):
    """A model that cannot be had: unknown on the hub, gated, a revision it lacks, the hub unreachable,
    or files that fail their checksums (one-line message)."""


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for no hub traffic (read when asked, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _OFF


def parse_hub_id(name: str, revision: str | None = None) -> HubModel:
    """`org/name` or `org/name@revision` as a HubModel; ValueError (one line) for anything else."""
    repo_id, _, pinned = name.partition("@")
    if pinned and revision and pinned != revision:
        raise ValueError(f"model {name!r} names revision {pinned!r} but revision {revision!r} was asked for")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    if not _HUB_ID.fullmatch(repo_id):
        raise ValueError(
            f"model {name!r} is neither a checkpoint directory on this machine nor a hub id like "
            "'Qwen/Qwen2.5-0.5B-Instruct' (optionally '@revision')"
        )
    return HubModel(repo_id, pinned or revision or None)


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors"))


def resolve_model(
    name: str | Path,
    cache_dir: Path,
    *,
    revision: str | None = None,
    offline: bool | None = None,
) -> Path:
    """The directory of a base model named by a local directory or a hub id (see the module docstring).

    Raises ValueError for a name that is neither, ModelNotCached when offline and not cached, and
    ModelUnavailable when the hub refuses it, cannot be reached or its files fail their checksums.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        if not is_model_dir(local):
            raise ValueError(f"{local} holds no config.json or adapter_config.json: not a model checkpoint")
        return local.resolve()
    model = parse_hub_id(str(name), revision)
    cache = Path(cache_dir).expanduser().resolve()
    offline = hub_offline() if offline is None else offline
    snapshot = _cached(model, cache) if offline else _download(model, cache)
    verify_snapshot(model, snapshot)
    return snapshot


def default_cache(state_dir: Path) -> Path:
    """The model cache when the config names none: HF_HUB_CACHE when set, else <state_dir>/hub."""
    configured = os.environ.get("HF_HUB_CACHE")
    return Path(configured).expanduser() if configured else Path(state_dir) / "hub"


def resolve_catalog(
    entries: tuple[CatalogEntry, ...] | list[CatalogEntry], cache_dir: Path, *, offline: bool | None = None
) -> tuple[CatalogEntry, ...]:
    """Every catalog entry with the directory of its files (downloading hub models when online); the
    built-in model is left to be built where the state directory says. Raises what resolve_model
    raises, with the entry's name in front."""
    resolved = []
    for entry in entries:
        if entry.source == BUILTIN_MODEL:
            resolved.append(entry)
            continue
        try:
            path = resolve_model(entry.source, cache_dir, revision=entry.revision, offline=offline)
        except (ValueError, ModelNotCached, ModelUnavailable) as exc:
            raise type(exc)(f"server.models.{entry.name}: {exc}") from None
        resolved.append(entry.resolved(path))
    return tuple(resolved)


def _not_cached(model: HubModel, cache: Path, why: str) -> ModelNotCached:
    return ModelNotCached(
        f"model {model} is not in the model cache {cache} and {why}: run once with network access to "
        f"download it there, or give a checkpoint directory with {MODEL_DIR_HINT}"
    )


def _cached(model: HubModel, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        found = snapshot_download(
            model.repo_id,
            revision=model.revision,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=MODEL_FILES,
            ignore_patterns=SKIPPED_FOLDERS,
        )
    except IncompleteSnapshotError:
        raise _not_cached(model, cache, "its download is incomplete while the hub is offline") from None
    except LocalEntryNotFoundError:
        raise _not_cached(model, cache, "the hub is offline (HF_HUB_OFFLINE)") from None
    path = Path(found)
    if not is_model_dir(path) or not has_weights(path):
        raise _not_cached(model, cache, "its cached snapshot is incomplete while the hub is offline")
    return path


def _download(model: HubModel, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        found = snapshot_download(
            model.repo_id,
            revision=model.revision,
            cache_dir=cache,
            allow_patterns=MODEL_FILES,
            ignore_patterns=SKIPPED_FOLDERS,
        )
    except GatedRepoError:
        raise ModelUnavailable(
            f"model {model} is gated on the hub: accept its licence on its page and log in "
            "(`hf auth login` or HF_TOKEN), or give a checkpoint directory with " + MODEL_DIR_HINT
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(
            f"model {model.repo_id} is not on the hub (or is private: log in with `hf auth login` or HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ModelUnavailable(
            f"model {model.repo_id} has no revision {model.revision!r} on the hub"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise _not_cached(model, cache, "the hub cannot be reached") from None
    except HfHubHTTPError as exc:
        reason = " ".join(str(exc).split())
        raise ModelUnavailable(f"model {model} could not be downloaded from the hub: {reason}") from None
    path = Path(found)
    if not is_model_dir(path):
        raise ModelUnavailable(f"model {model} on the hub has no config.json: not a transformers checkpoint")
    if not has_weights(path):
        raise ModelUnavailable(
            f"model {model} on the hub has no safetensors weights (only other formats, which are not loaded)"
        )
    return path


# -- verification --------------------------------------------------------------------------------


def _blob_checksum(path: Path, expected: str) -> str:
    """The checksum of a file in the form `expected` has: sha256 (64 hex digits) or git blob sha1."""
    if len(expected) == 64:
        digest = hashlib.sha256()
    else:
        digest = hashlib.sha1()
        digest.update(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_snapshot(model: HubModel, snapshot: Path) -> None:
    """Check every file of a cached snapshot against the name of its blob (see the module docstring);
    once per commit. ModelUnavailable names the files that fail."""
    marker = snapshot.parent.parent / VERIFIED_DIR / snapshot.name
    if marker.is_file():
        return
    failed = []
    for file in sorted(p for p in snapshot.rglob("*") if p.is_symlink() or p.is_file()):
        if not file.is_symlink():
            continue  # not a cache link (copied in by hand): nothing to check it against
        expected = Path(os.readlink(file)).name
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", expected):
            continue
        if not file.exists() or _blob_checksum(file, expected) != expected:
            failed.append(str(file.relative_to(snapshot)))
    if failed:
        raise ModelUnavailable(
            f"model {model}: {len(failed)} cached file(s) fail their checksums ({', '.join(failed[:3])}) in "
            f"{snapshot}: delete {snapshot.parent.parent} and download it again"
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{model.repo_id} {snapshot.name}\n", encoding="utf-8")
