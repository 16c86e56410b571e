"""Auth, the loopback rule, injected faults and added latency, against real server processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tuneline.server.launcher import free_port, start_server


def test_missing_or_wrong_key_gets_401_in_the_openai_shape(
    server: Any, client: Any, validate: Any, wait_for: Any
) -> None:
    missing = httpx.get(f"{server.base_url}/models", timeout=30)
    assert missing.status_code == 401
    validate("ErrorResponse", missing.json())
    assert "You didn't provide an API key" in missing.json()["error"]["message"]

    wrong_key = "sk-wrong-" + "z" * 20
    wrong = httpx.get(
        f"{server.base_url}/models", headers={"Authorization": f"Bearer {wrong_key}"}, timeout=30
    )
    assert wrong.status_code == 401
    validate("ErrorResponse", wrong.json())
    assert wrong.json()["error"]["code"] == "invalid_api_key" and wrong_key not in wrong.text

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key=wrong_key, max_retries=0).models.list()
    assert [m.id for m in client.models.list()]  # the right key works

    # A request's line is written once its response has gone: wait for the last one, bounded.
    log = wait_for(
        lambda: (text := server.log_path.read_text(encoding="utf-8")).count("GET /v1/models -> 200") and text,
        timeout_s=10,
        what="the successful request's log line",
    )
    assert "GET /v1/models -> 401" in log
    assert server.api_key not in log and wrong_key not in log


LATENCY_MS = 300


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory, seeded_state: Any) -> Iterator[Any]:
    """A server started without TUNELINE_API_KEY (loopback), adding 300 ms to chat completions."""
    state = seeded_state(tmp_path_factory.mktemp("open-server"))
    with start_server(state, api_key=None, latency_ms=LATENCY_MS) as process:
        yield process


def test_without_a_key_loopback_accepts_any_key_and_warns(open_server: Any) -> None:
    answer = httpx.get(
        f"{open_server.base_url}/models", headers={"Authorization": "Bearer anything"}, timeout=30
    )
    assert answer.status_code == 200
    assert httpx.get(f"{open_server.base_url}/models", timeout=30).status_code == 200
    assert "TUNELINE_API_KEY is not set" in open_server.log_tail(200)


def test_a_non_loopback_address_without_a_key_refuses_to_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TUNELINE_API_KEY"}
    command = [sys.executable, "-m", "tuneline.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    started = time.monotonic()
    result = subprocess.run(
        [*command, "--state-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to listen on 0.0.0.0 without an API key" in lines[0], result.stderr
    assert time.monotonic() - started < 120


def test_injected_faults_carry_retry_after_and_the_sdk_rides_them_out(tmp_path: Path) -> None:
    with start_server(tmp_path, api_key="k", fault_rate=0.5, extra_args=["--fault-seed", "7"]) as faulty:
        headers = {"Authorization": "Bearer k"}
        statuses: list[int] = []
        with httpx.Client(timeout=30) as http:
            for _ in range(40):
                response = http.get(f"{faulty.base_url}/models", headers=headers)
                statuses.append(response.status_code)
                if response.status_code != 200:
                    assert response.status_code in (429, 500, 503)
                    assert int(response.headers["retry-after"]) >= 1
                    assert response.json()["error"]["message"].endswith("(injected by --fault-rate).")
        faults = sum(s != 200 for s in statuses)
        assert 8 <= faults <= 32, statuses  # about half of 40
        assert {429, 500, 503} & set(statuses)

        patient = openai.OpenAI(base_url=faulty.base_url, api_key="k", max_retries=8)
        for _ in range(10):
            assert patient.models.list().data


def test_latency_is_added_without_serialising_requests(open_server: Any) -> None:
    body = {"model": "tuneline-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    headers = {"Authorization": "Bearer any"}

    async def one(http: httpx.AsyncClient) -> float:
        started = time.perf_counter()
        response = await http.post(f"{open_server.base_url}/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return time.perf_counter() - started

    async def run(n: int) -> tuple[float, list[float]]:
        async with httpx.AsyncClient(timeout=120) as http:
            await one(http)  # the model is loaded once
            started = time.perf_counter()
            each = await asyncio.gather(*(one(http) for _ in range(n)))
            return time.perf_counter() - started, list(each)

    total, each = asyncio.run(run(16))
    assert min(each) >= LATENCY_MS / 1000
    # 16 requests one after another would take at least 16 x 0.3 s = 4.8 s.
    assert total < 16 * LATENCY_MS / 1000 / 3, f"16 concurrent requests took {total:.2f} s"
