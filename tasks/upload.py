"""upload: put the exported training and validation files on the provider, at most once per content.

Guarantees:
- a file is named after its content (`{dataset_hash}-{train|validation}.jsonl`) and an identical file
  already on the provider (same name, same size, purpose fine-tune, not in `error` status) is reused:
  a rerun never uploads (or pays to store) the same data twice;
- an upload whose response was lost is found again before it is retried, never sent twice;
- the file is `processed` when this returns, or the run fails with the provider's status details; the
  wait is bounded by `provider.file_processing_timeout_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from openai.types import FileObject
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneline.config import ProviderConfig
from tuneline.provider import Provider, ProviderError, retrying

PURPOSE: Final[Literal["fine-tune"]] = "fine-tune"


@dataclass(frozen=True)
class UploadedFile:
    split: str  # train | validation
    file_id: str
    filename: str
    bytes: int
    reused: bool


@dataclass(frozen=True)
class UploadedFiles:
    training: UploadedFile
    validation: UploadedFile | None  # None when the export has no validation examples

    @property
    def uploaded_count(self) -> int:
        """How many files this run actually sent (0 on a rerun with the same data)."""
        return sum(1 for f in (self.training, self.validation) if f is not None and not f.reused)


def content_filename(dataset_hash: str, split: str) -> str:
    """The name a split is stored under: the dataset hash makes equal names mean equal content."""
    return f"{dataset_hash}-{split}.jsonl"


def find_uploaded(provider: Provider, filename: str, size: int) -> FileObject | None:
    """The newest usable file on the provider with this name and size (purpose fine-tune, not errored)."""
    for candidate in provider.client.files.list(purpose=PURPOSE, order="desc", limit=100):
        if (
            candidate.filename == filename
            and candidate.bytes == size
            and candidate.purpose == PURPOSE
            and candidate.status != "error"
        ):
            return candidate
    return None


def wait_until_processed(
    provider: Provider, file: FileObject, filename: str, settings: ProviderConfig
) -> FileObject:
    """Polls (bounded backoff, bounded total time) until the file is processed; `error` raises with details."""
    deadline = time.monotonic() + settings.file_processing_timeout_s
    interval = settings.poll_interval_s
    file_id = file.id
    while True:
        if file.status == "processed":
            return file
        if file.status == "error":
            details = file.status_details or "no details given"
            raise ProviderError(
                f"{provider.base_url} could not process {filename} ({file.id}): {details}",
                code="file_error",
            )
        if time.monotonic() + interval > deadline:
            raise ProviderError(
                f"{filename} ({file.id}) still {file.status!r} after {settings.file_processing_timeout_s:g}s "
                "(raise provider.file_processing_timeout_s, or rerun later: the upload is reused)"
            )
        time.sleep(interval)
        interval = min(interval * 2, settings.max_poll_interval_s)
        file = retrying(provider, f"check file {file_id}", lambda: provider.client.files.retrieve(file_id))


def upload_split(
    provider: Provider, path: Path, *, dataset_hash: str, split: str, settings: ProviderConfig
) -> UploadedFile:
    """Find-or-upload one exported split and wait until the provider has processed it."""
    data = path.read_bytes()
    filename = content_filename(dataset_hash, split)
    existing = retrying(provider, "list files", lambda: find_uploaded(provider, filename, len(data)))
    if existing is not None:
        provider.log.info(
            "%s already on the provider as %s: reusing it, nothing uploaded", filename, existing.id
        )
        file, reused = existing, True
    else:
        file = retrying(
            provider,
            f"upload {filename}",
            lambda: provider.without_retries().files.create(
                file=(filename, data, "application/jsonl"), purpose=PURPOSE
            ),
            landed=lambda: find_uploaded(provider, filename, len(data)),
        )
        provider.log.info("uploaded %s (%d bytes) as %s", filename, len(data), file.id)
        reused = False
    if file.bytes is not None and file.bytes != len(data):
        raise ProviderError(
            f"{filename}: the provider stored {file.bytes} bytes of {len(data)} ({file.id}); delete it and rerun"
        )
    file = wait_until_processed(provider, file, filename, settings)
    return UploadedFile(split=split, file_id=file.id, filename=filename, bytes=len(data), reused=reused)


def upload_dataset(
    provider: Provider, export_dir: Path, *, dataset_hash: str, settings: ProviderConfig
) -> UploadedFiles:
    """Find-or-upload train.jsonl and (when it has examples) validation.jsonl from an export folder."""
    training = upload_split(
        provider, export_dir / "train.jsonl", dataset_hash=dataset_hash, split="train", settings=settings
    )
    validation_path = export_dir / "validation.jsonl"
    validation = None
    if validation_path.is_file() and validation_path.stat().st_size > 0:
        validation = upload_split(
            provider, validation_path, dataset_hash=dataset_hash, split="validation", settings=settings
        )
    return UploadedFiles(training=training, validation=validation)


@task(name="upload", cache_policy=NO_CACHE)
def upload(
    provider: Provider, export_dir: Path, dataset_hash: str, settings: ProviderConfig
) -> UploadedFiles:
    """Prefect wrapper: provider messages go to this task's log."""
    provider.log_to(get_run_logger())
    return upload_dataset(provider, export_dir, dataset_hash=dataset_hash, settings=settings)
