"""tasks/upload.py against a real `tuneline serve`: find-or-upload by content, size check, validation
file; and against a scripted provider, the waits and failures tuneline's own server never shows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuneline.config import parse_config
from tuneline.provider import Provider, ProviderError, connect
from tuneline.server.launcher import ServerProcess, start_server
from tuneline.tasks.upload import content_filename, upload_dataset

KEY = "sk-upload-tests"


def chat(question: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def export_dir(
    folder: Path, train: list[dict[str, Any]], validation: list[dict[str, Any]]
) -> tuple[Path, str]:
    """An export as prepare writes it: canonical JSONL files; returns (folder, dataset_hash)."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for name, examples in (("train.jsonl", train), ("validation.jsonl", validation)):
        data = b"".join(
            json.dumps(e, sort_keys=True, separators=(",", ":")).encode() + b"\n" for e in examples
        )
        (folder / name).write_bytes(data)
        blobs.append(data)
    return folder, hashlib.sha256(blobs[0] + b"\0" + blobs[1]).hexdigest()


def config_for(base_url: str, **provider: Any) -> Any:
    return parse_config(
        {
            "data": {"sources": [{"name": "s", "uri": "data/none.jsonl"}]},
            "provider": {
                "kind": "local",
                "base_url": base_url,
                "max_retries": 2,
                "poll_interval_s": 0.05,
                **provider,
            },
        }
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(tmp_path_factory.mktemp("upload-server"), api_key=KEY) as process:
        yield process


@pytest.fixture
def provider(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[Provider]:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    with connect(config_for(server.base_url)) as connected:
        yield connected


def files_named(provider: Provider, filename: str) -> list[Any]:
    return [f for f in provider.client.files.list(purpose="fine-tune") if f.filename == filename]


def test_same_content_is_uploaded_once(provider: Provider, tmp_path: Path) -> None:
    train = [chat(f"Where is parcel {n}?", f"shipping: parcel {n} is on its way.") for n in range(12)]
    folder, dataset_hash = export_dir(
        tmp_path / "export", train, [chat("Refund for order 7?", "billing: refund sent.")]
    )
    settings = config_for(provider.base_url).provider

    first = upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=settings)
    assert first.uploaded_count == 2
    assert first.training.filename == f"{dataset_hash}-train.jsonl"
    assert first.validation is not None and first.validation.filename == f"{dataset_hash}-validation.jsonl"

    again = upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=settings)
    assert again.uploaded_count == 0
    assert (again.training.file_id, again.training.reused) == (first.training.file_id, True)
    assert again.validation is not None and again.validation.file_id == first.validation.file_id
    # Counted on the server: one file per split.
    assert len(files_named(provider, first.training.filename)) == 1
    assert len(files_named(provider, first.validation.filename)) == 1
    stored = provider.client.files.content(first.training.file_id).read()
    assert stored == (folder / "train.jsonl").read_bytes()


def test_a_file_with_the_same_name_but_another_size_is_not_reused(provider: Provider, tmp_path: Path) -> None:
    train = [chat(f"Reset password for account {n}?", f"account: reset link {n} sent.") for n in range(12)]
    folder, dataset_hash = export_dir(tmp_path / "export", train, [])
    name = content_filename(dataset_hash, "train")
    truncated = provider.client.files.create(
        file=(name, (folder / "train.jsonl").read_bytes()[:50]), purpose="fine-tune"
    )

    uploaded = upload_dataset(
        provider, folder, dataset_hash=dataset_hash, settings=config_for(provider.base_url).provider
    )
    assert uploaded.training.file_id != truncated.id
    assert not uploaded.training.reused
    assert uploaded.validation is None  # an empty validation split is not uploaded
    sizes = sorted(f.bytes for f in files_named(provider, name))
    assert sizes == sorted([50, (folder / "train.jsonl").stat().st_size])


def file_object(file_id: str, status: str, details: str | None = None, size: int = 10) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": 1,
        "filename": "x.jsonl",
        "purpose": "fine-tune",
        "status": status,
        "status_details": details,
    }


def test_waits_for_processing_and_fails_with_the_providers_details(
    scripted_provider: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    folder, dataset_hash = export_dir(tmp_path / "export", [chat("Hi?", "general: hello.")], [])
    size = (folder / "train.jsonl").stat().st_size
    details = "Invalid file format. Line 1, key 'messages': at least one assistant message is required."
    scripted_provider.answer("POST", "/v1/files", (200, file_object("file-1", "uploaded", size=size), {}))
    scripted_provider.answer(
        "GET",
        "/v1/files/file-1",
        (200, file_object("file-1", "uploaded", size=size), {}),
        (200, file_object("file-1", "error", details, size=size), {}),
    )
    config = config_for(scripted_provider.base_url)
    with connect(config) as provider, pytest.raises(ProviderError) as caught:
        upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=config.provider)
    assert f"{dataset_hash}-train.jsonl (file-1): {details}" in str(caught.value)
    assert scripted_provider.count("GET", "/v1/files/file-1") == 2


def test_processing_wait_is_bounded(
    scripted_provider: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    folder, dataset_hash = export_dir(tmp_path / "export", [chat("Hi?", "general: hello.")], [])
    size = (folder / "train.jsonl").stat().st_size
    scripted_provider.answer("POST", "/v1/files", (200, file_object("file-2", "uploaded", size=size), {}))
    pending = (200, file_object("file-2", "uploaded", size=size), {})
    scripted_provider.answer("GET", "/v1/files/file-2", *[pending] * 50)
    config = config_for(scripted_provider.base_url, file_processing_timeout_s=0.5, max_poll_interval_s=0.1)
    with connect(config) as provider, pytest.raises(ProviderError, match=r"still 'uploaded' after 0.5s"):
        upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=config.provider)


def test_a_lost_upload_response_is_found_instead_of_uploading_again(
    scripted_provider: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNELINE_API_KEY", KEY)
    folder, dataset_hash = export_dir(tmp_path / "export", [chat("Hi?", "general: hello.")], [])
    size = (folder / "train.jsonl").stat().st_size
    landed = {**file_object("file-3", "processed", size=size), "filename": f"{dataset_hash}-train.jsonl"}
    # The upload reached the provider, but its answer was a 502; the file is listed afterwards.
    scripted_provider.answer(
        "POST", "/v1/files", (502, {"error": {"message": "bad gateway"}}, {"retry-after-ms": "5"})
    )
    scripted_provider.answer(
        "GET",
        "/v1/files",
        (200, {"object": "list", "data": [], "has_more": False}, {}),
        (200, {"object": "list", "data": [landed], "has_more": False}, {}),
    )
    config = config_for(scripted_provider.base_url)
    with connect(config) as provider:
        uploaded = upload_dataset(provider, folder, dataset_hash=dataset_hash, settings=config.provider)
    assert uploaded.training.file_id == "file-3"
    assert scripted_provider.count("POST", "/v1/files") == 1
