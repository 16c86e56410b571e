"""Against api.openai.com: off unless `pytest --run-openai` with OPENAI_API_KEY set (uploads cost
storage, a job costs money). Checks what no local server can: the real provider's idempotent upload, and
that job creation either starts a job (cancelled at once) or fails with a clear message (the self-serve
fine-tuning wind-down, a daily cap), never a crash or a retry loop."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuneline.config import Config, parse_config
from tuneline.provider import Provider, ProviderError, connect
from tuneline.tasks.train import cancel_job, create_job, find_job, job_request
from tuneline.tasks.upload import upload_dataset

pytestmark = pytest.mark.openai

MODEL = "gpt-4.1-nano-2025-04-14"


def live_config() -> Config:
    return parse_config(
        {
            "data": {"sources": [{"name": "s", "uri": "data/none.jsonl"}]},
            "model": {"base": MODEL},
            "provider": {"kind": "openai", "max_retries": 2, "poll_interval_s": 2.0},
            "training": {"hyperparameters": {"n_epochs": 1}, "suffix": "tuneline-live-test", "seed": 1},
        }
    )


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with connect(live_config()) as connected:
        yield connected


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("live-export")
    examples: list[dict[str, Any]] = [
        {
            "messages": [
                {"role": "system", "content": "Reply with the category and the house reply."},
                {"role": "user", "content": f"My parcel number {n} has not arrived yet."},
                {
                    "role": "assistant",
                    "content": f"shipping: we are tracing parcel {n} and will write within a day.",
                },
            ]
        }
        for n in range(10)
    ]
    train = b"".join(json.dumps(e, sort_keys=True, separators=(",", ":")).encode() + b"\n" for e in examples)
    (folder / "train.jsonl").write_bytes(train)
    (folder / "validation.jsonl").write_bytes(b"")
    return folder, hashlib.sha256(train + b"\0").hexdigest()


def test_upload_is_reused_on_the_hosted_api(provider: Provider, export: tuple[Path, str]) -> None:
    folder, dataset_hash = export
    settings = live_config().provider
    first = upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=settings)
    again = upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=settings)
    assert again.training.file_id == first.training.file_id
    assert again.uploaded_count == 0


def test_job_creation_starts_once_or_fails_clearly(provider: Provider, export: tuple[Path, str]) -> None:
    folder, dataset_hash = export
    config = live_config()
    uploaded = upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=config.provider)
    request = job_request(
        config, dataset_hash=dataset_hash, training_file=uploaded.training.file_id, validation_file=None
    )
    existing = find_job(provider, request)
    try:
        job = existing or create_job(provider, request)
    except ProviderError as refused:
        message = str(refused)
        assert refused.status in {403, 429}, message
        assert (
            "2027-01-06" in message
            or "daily fine-tuning job limit" in message
            or "run again later" in message
        )
        return
    try:
        assert find_job(provider, request) is not None  # found again by its metadata: a rerun would reattach
    finally:
        cancel_job(provider, job.id)
