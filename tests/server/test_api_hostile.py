"""Hostile and careless input against a real server (issue #14): a bad file fails only its own job,
bodies are bounded in depth and size before they are read whole, over-long examples are refused with
their line, the log records neither query strings nor raw control characters, a byte order mark is
read as prepare reads it, and web pages cannot reach a loopback server."""

from __future__ import annotations

import io
import select
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

TERMINAL = {"succeeded", "failed", "cancelled"}
DEEP = b"[" * 10_000 + b"]" * 10_000


def raw(client: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {client.api_key}", **kwargs.pop("headers", {})}
    return httpx.request(
        method, f"{client.base_url}{path.lstrip('/')}", headers=headers, timeout=60, **kwargs
    )


def upload(client: Any, content: bytes, name: str = "train.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(content)), purpose="fine-tune").id


def finished(client: Any, wait_for: Any, job_id: str, timeout_s: float = 300) -> Any:
    def done() -> Any:
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in TERMINAL else None

    return wait_for(done, timeout_s=timeout_s, what=f"{job_id} to finish")


def quick_job(client: Any, training_file: str) -> Any:
    return client.fine_tuning.jobs.create(
        model="tuneline-tiny", training_file=training_file, hyperparameters={"n_epochs": 1, "batch_size": 4}
    )


def test_a_training_file_nested_10000_deep_fails_its_job_and_the_next_job_goes_on(
    client: Any, wait_for: Any, validate: Any, training_bytes: bytes
) -> None:
    bad = quick_job(client, upload(client, DEEP + b"\n" + training_bytes))
    good = quick_job(client, upload(client, training_bytes))

    def validated() -> Any:
        status = client.fine_tuning.jobs.retrieve(good.id).status
        return status if status != "validating_files" else None

    assert wait_for(validated, timeout_s=60, what="the next job to be validated") in (
        "queued",
        "running",
        "succeeded",
    )
    failed = client.fine_tuning.jobs.retrieve(bad.id)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert failed.error.message.startswith("Invalid file format. Line 1: ")
    assert "deeper than 64 levels (too_deep)" in failed.error.message
    validate("FineTuningJob", raw(client, "GET", f"fine_tuning/jobs/{bad.id}").json())
    if client.fine_tuning.jobs.retrieve(good.id).status not in TERMINAL:
        client.fine_tuning.jobs.cancel(good.id)  # it would train; test_api_fuzz.py trains one to the end


def test_request_bodies_nested_10000_deep_are_refused_with_400(client: Any, validate: Any) -> None:
    deep = DEEP.decode()
    training_file = '"file-x"'
    bodies = {
        "fine_tuning/jobs": [
            f'{{"model": "tuneline-tiny", "training_file": {training_file}, "metadata": {{"k": {deep}}}}}',
            f'{{"model": "tuneline-tiny", "training_file": {training_file}, "hyperparameters": {deep}}}',
            f'{{"model": "tuneline-tiny", "training_file": {training_file}, "metadata": {{"k": {"[" * 100 + "]" * 100}}}}}',
        ],
        "chat/completions": [
            f'{{"model": "tuneline-tiny", "messages": [{{"role": "user", "content": {deep}}}]}}',
            f'{{"model": "tuneline-tiny", "messages": [{{"role": "user", "content": "hi"}}], "user": {deep}}}',
        ],
    }
    for path, cases in bodies.items():
        for body in cases:
            response = raw(
                client, "POST", path, content=body.encode(), headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, response.text
            validate("ErrorResponse", response.json())
            assert response.json()["error"]["code"] == "json_too_deep"


def test_the_learning_rate_multiplier_is_bounded(client: Any, validate: Any, training_bytes: bytes) -> None:
    training_file = upload(client, training_bytes)
    for multiplier in (1e6, 10.5):
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(
                model="tuneline-tiny",
                training_file=training_file,
                method={
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"learning_rate_multiplier": multiplier}},
                },
            )
        assert "greater than 0 and at most 10" in caught.value.message
        assert caught.value.body["param"] == "method.supervised.hyperparameters.learning_rate_multiplier"  # type: ignore[index]
        validate("ErrorResponse", caught.value.response.json())


def test_a_line_over_the_example_size_fails_validation_naming_it(
    client: Any, wait_for: Any, examples: Any, to_jsonl: Any
) -> None:
    lines = examples(12)
    lines[2]["messages"][1]["content"] = "x" * (2 << 20)  # 2 MB: over the 1 MiB an example may take
    job = quick_job(client, upload(client, to_jsonl(lines)))
    done = finished(client, wait_for, job.id, timeout_s=60)
    assert done.status == "failed" and done.error.code == "invalid_training_file"
    assert done.error.message.startswith("Invalid file format. Line 3: the line is longer than 1048576 bytes")
    assert done.error.message.endswith("(too_large)")


def test_examples_over_the_context_fail_the_job_and_publish_no_model(
    client: Any, wait_for: Any, examples: Any, to_jsonl: Any, validate: Any
) -> None:
    lines = examples(12)
    long_question = " ".join(f"word{i} and more" for i in range(400))  # far over tuneline-tiny's 512 tokens
    lines[7]["messages"][1]["content"] = long_question
    models_before = {m.id for m in client.models.list()}
    job = quick_job(client, upload(client, to_jsonl(lines)))
    done = finished(client, wait_for, job.id)
    assert done.status == "failed", "an over-long example was trained on (cut silently)"
    assert done.error.code == "invalid_training_file" and done.error.param == "training_file"
    assert done.error.message.startswith("Invalid file format. Line 8: the example is ")
    assert "tuneline-tiny takes at most 512 tokens per example" in done.error.message
    assert done.error.message.endswith("(too_long)")
    assert done.fine_tuned_model is None and done.trained_tokens is None
    assert {m.id for m in client.models.list()} == models_before
    validate("FineTuningJob", raw(client, "GET", f"fine_tuning/jobs/{job.id}").json())


def read_response(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return received


def test_json_bodies_over_the_limit_are_refused_before_they_are_read(server: Any) -> None:
    port = int(server.base_url.split(":")[2].split("/")[0])
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
    )
    # A declared 50 MB body: refused before a byte of it is sent.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall((head + "Content-Length: 52428800\r\n\r\n").encode())
        answer = read_response(sock, 10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A chunked body of unknown length: cut off once it passes the limit, long before 50 MB.
    chunk = b"[" + b"1," * (512 * 1024 - 1) + b"1"  # 1 MiB of (never closed) JSON
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
        try:
            while sent < 50:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += 1
                if select.select([sock], [], [], 0.05)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_response(sock, 10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 20, f"{sent} MiB were sent before the server refused"
    assert httpx.get(
        f"{server.base_url}/models", headers={"Authorization": f"Bearer {server.api_key}"}
    ).is_success


def test_the_log_records_no_query_string_and_no_raw_control_characters(
    server: Any, client: Any, training_bytes: bytes
) -> None:
    assert raw(client, "GET", "models", params={"api_key": "sk-sent-the-wrong-way-123"}).status_code == 200
    assert raw(client, "GET", "files/file-x%0AINJECTED%00line").status_code == 404
    training_file = upload(client, training_bytes)
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(model="tuneline-tiny", training_file=training_file, suffix="a\x00b")
    assert "control characters" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(
            model="tuneline-tiny", training_file=training_file, metadata={"k": "v\x00"}
        )
    log = server.log_path.read_bytes()
    assert b"sk-sent-the-wrong-way-123" not in log and b"api_key" not in log
    assert b"\x00" not in log
    assert b"\nINJECTED" not in log and b"/v1/files/file-x\\nINJECTED\\x00line -> 404" in log


def test_a_training_file_with_a_byte_order_mark_is_accepted_as_prepare_accepts_it(
    client: Any, wait_for: Any, training_bytes: bytes
) -> None:
    job = quick_job(client, upload(client, b"\xef\xbb\xbf" + training_bytes))

    def validated() -> Any:
        status = client.fine_tuning.jobs.retrieve(job.id).status
        return status if status != "validating_files" else None

    status = wait_for(validated, timeout_s=60, what="the file to be validated")
    assert status in ("queued", "running", "succeeded"), client.fine_tuning.jobs.retrieve(job.id).error
    if status != "succeeded":
        client.fine_tuning.jobs.cancel(job.id)


# -- a loopback server without a key, as the issue found it -----------------------------------------

ALLOWED_ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, seeded_state: Any) -> Iterator[Any]:
    """A server without TUNELINE_API_KEY on loopback, allowing one web origin (server.allowed_origins)."""
    import yaml

    from tuneline.config import DEFAULT_CONFIG
    from tuneline.server.launcher import start_server

    state = seeded_state(tmp_path_factory.mktemp("open-hostile"))
    config = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    config.setdefault("server", {})["allowed_origins"] = [ALLOWED_ORIGIN]
    config_path = state / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with start_server(state, api_key=None, extra_args=["--config", str(config_path)]) as process:
        yield process


def test_web_pages_cannot_reach_a_loopback_server(
    open_server: Any, validate: Any, training_bytes: bytes
) -> None:
    base = open_server.base_url
    port = base.split(":")[2].split("/")[0]
    file_id = httpx.post(
        f"{base}/files",
        files={"file": ("t.jsonl", training_bytes)},
        data={"purpose": "fine-tune"},
        timeout=30,
    ).json()["id"]
    job = {"model": "tuneline-tiny", "training_file": file_id}
    jobs_before = httpx.get(f"{base}/fine_tuning/jobs", timeout=30).json()["data"]
    hostile = [
        ({"Host": "evil.example"}, "host_not_allowed"),
        ({"Host": f"evil.example:{port}"}, "host_not_allowed"),
        ({"Origin": "http://evil.example"}, "origin_not_allowed"),
        ({"Origin": "null"}, "origin_not_allowed"),
        ({"Origin": "http://evil.example", "Host": "evil.example"}, "origin_not_allowed"),
    ]
    for headers, code in hostile:
        for method, path, body in (
            ("GET", "/models", None),
            ("GET", f"/files/{file_id}/content", None),
            ("POST", "/fine_tuning/jobs", job),
        ):
            response = httpx.request(method, f"{base}{path}", headers=headers, json=body, timeout=30)
            assert response.status_code == 403, (headers, path, response.text)
            validate("ErrorResponse", response.json())
            assert response.json()["error"]["code"] == code
    assert httpx.get(f"{base}/fine_tuning/jobs", timeout=30).json()["data"] == jobs_before
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert httpx.get(f"{base}/models", headers={"Host": host}, timeout=30).status_code == 200
    allowed = httpx.get(f"{base}/models", headers={"Origin": ALLOWED_ORIGIN}, timeout=30)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = httpx.options(
        f"{base}/fine_tuning/jobs",
        headers={
            "Origin": ALLOWED_ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
        timeout=30,
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
