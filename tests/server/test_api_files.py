"""/v1/files through the real `openai` SDK against a real server process, bodies checked against
the OpenAPI contract."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

UPLOAD_LIMIT = 20_000


@pytest.fixture(scope="module")
def server(server_state: Path) -> Iterator[Any]:
    """This module's server takes uploads up to 20 kB (server.max_upload_bytes in its config)."""
    import yaml

    from tuneline.config import DEFAULT_CONFIG
    from tuneline.server.launcher import start_server

    config = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    config.setdefault("server", {})["max_upload_bytes"] = UPLOAD_LIMIT
    config_path = server_state / "small-limit.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with start_server(
        server_state, api_key="sk-files-test", extra_args=["--config", str(config_path)]
    ) as process:
        yield process


def raw(client: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """The same request the SDK makes, to see the exact body and status on the wire."""
    headers = {"Authorization": f"Bearer {client.api_key}", **kwargs.pop("headers", {})}
    return httpx.request(
        method, f"{client.base_url}{path.lstrip('/')}", headers=headers, timeout=30, **kwargs
    )


def test_upload_retrieve_content_and_delete(client: Any, validate: Any, training_bytes: bytes) -> None:
    created = client.files.create(file=("train.jsonl", io.BytesIO(training_bytes)), purpose="fine-tune")
    processed = client.files.wait_for_processing(created.id, poll_interval=0.1, max_wait_seconds=30)
    assert processed.status == "processed" and processed.bytes == len(training_bytes)
    assert processed.filename == "train.jsonl" and processed.purpose == "fine-tune"
    assert created.id.startswith("file-") and len(created.id) == len("file-") + 24
    validate("OpenAIFile", raw(client, "GET", f"files/{created.id}").json())

    assert client.files.content(created.id).content == training_bytes

    deleted = raw(client, "DELETE", f"files/{created.id}")
    validate("DeleteFileResponse", deleted.json())
    assert deleted.json() == {"id": created.id, "object": "file", "deleted": True}
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(created.id)
    assert caught.value.body["message"] == f"No such File object: {created.id}"  # type: ignore[index]
    validate("ErrorResponse", caught.value.response.json())


def test_list_filters_by_purpose_and_pages_in_both_orders(client: Any, validate: Any) -> None:
    ids = [
        client.files.create(file=(f"b{i}.jsonl", io.BytesIO(b"{}\n")), purpose="batch").id for i in range(5)
    ]
    listed = [f.id for f in client.files.list(purpose="batch", limit=2, order="asc")]  # auto-paginates
    assert listed == ids
    listed_desc = [f.id for f in client.files.list(purpose="batch", limit=2, order="desc")]
    assert listed_desc == ids[::-1]
    first_page = raw(client, "GET", "files", params={"purpose": "batch", "limit": 2})
    validate("ListFilesResponse", first_page.json())
    body = first_page.json()
    assert body["has_more"] is True and body["first_id"] == ids[-1] and body["last_id"] == ids[-2]
    empty = raw(client, "GET", "files", params={"purpose": "vision"}).json()
    validate("ListFilesResponse", empty)
    assert empty["data"] == [] and empty["has_more"] is False
    for file_id in ids:
        client.files.delete(file_id)


def test_fine_tune_files_must_be_jsonl(client: Any, validate: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("train.csv", io.BytesIO(b"a,b\n")), purpose="fine-tune")
    assert caught.value.body["message"] == "Invalid file format for Fine-Tuning API. Must be .jsonl"  # type: ignore[index]
    validate("ErrorResponse", caught.value.response.json())
    # Other purposes take other formats.
    other = client.files.create(file=("notes.csv", io.BytesIO(b"a,b\n")), purpose="user_data")
    assert other.status == "processed"


@pytest.mark.parametrize(
    ("files", "data", "needle"),
    [
        ({"file": ("x.jsonl", b"{}\n")}, {"purpose": "nonsense"}, "'nonsense' is not one of"),
        ({"file": ("x.jsonl", b"{}\n")}, {}, "Missing required parameter: 'purpose'."),
        (None, {"purpose": "fine-tune"}, "Missing required parameter: 'file'."),
        ({"file": ("x.jsonl", b"")}, {"purpose": "fine-tune"}, "The uploaded file is empty."),
    ],
)
def test_bad_uploads_are_refused_with_a_clear_message(
    client: Any, validate: Any, files: Any, data: dict[str, str], needle: str
) -> None:
    response = raw(client, "POST", "files", files=files or {"other": ("o", b"x")}, data=data)
    assert response.status_code == 400, response.text
    validate("ErrorResponse", response.json())
    assert needle in response.json()["error"]["message"]


def test_uploads_over_the_size_limit_get_413(client: Any) -> None:
    ok = client.files.create(file=("ok.jsonl", io.BytesIO(b"{}\n" * 3000)), purpose="fine-tune")
    assert ok.bytes == 9000
    with pytest.raises(openai.APIStatusError) as caught:
        client.files.create(file=("too-big.jsonl", io.BytesIO(b"{}\n" * 7000)), purpose="fine-tune")
    assert caught.value.status_code == 413
    assert (
        f"{UPLOAD_LIMIT} bytes" in caught.value.message and "server.max_upload_bytes" in caught.value.message
    )
    assert "too-big.jsonl" not in {f.filename for f in client.files.list()}


def test_unknown_ids_and_stale_cursors_are_404_and_400(client: Any, validate: Any) -> None:
    for call in (lambda: client.files.content("file-nope"), lambda: client.files.delete("file-nope")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["message"] == "No such File object: file-nope"  # type: ignore[index]
    stale = raw(client, "GET", "files", params={"after": "file-gone"})
    assert stale.status_code == 400 and "list again without `after`" in stale.json()["error"]["message"]
    validate("ErrorResponse", stale.json())
    unknown = raw(client, "GET", "nowhere")
    assert (
        unknown.status_code == 404 and unknown.json()["error"]["message"] == "Invalid URL (GET /v1/nowhere)"
    )
