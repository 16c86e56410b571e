"""`tuneline gateway`: the real command in its own process, its API key, and refusals at start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import yaml
from gateway_harness import Registry, free_port, make_config
from typer.testing import CliRunner

from tuneline.cli import app


def test_the_command_serves_with_its_api_key_from_two_workers(store: Path, tmp_path: Path, upstreams) -> None:
    name = "support-cli"
    port = free_port()
    config = make_config(store, tmp_path, name, port=port, tracing=False, workers=2)
    Registry(config.tracking).register(upstreams(answer="from the champion"), "ft:x:v1", "champion")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "TUNELINE_GATEWAY_API_KEY": "gateway-secret"}
    tuneline = Path(sys.executable).with_name("tuneline")
    process = subprocess.Popen(
        [str(tuneline), "gateway", "--config", str(path)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.2)
        base_url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError) as refused:
            openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
        assert refused.value.code == "invalid_api_key"
        assert "gateway-secret" not in refused.value.message
        for _ in range(4):  # new connections: both workers' accept loops take their share
            client = openai.OpenAI(base_url=base_url, api_key="gateway-secret", max_retries=0)
            answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "from the champion"
            client.close()
        children = [" ".join(p.cmdline()) for p in psutil.Process(process.pid).children()]
        assert sum("spawn_main" in command for command in children) == 2  # the two worker processes
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=30)
    assert "gateway-secret" not in errors


def test_refuses_to_listen_beyond_loopback_without_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TUNELINE_GATEWAY_API_KEY", raising=False)
    monkeypatch.delenv("TUNELINE_API_KEY", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data": {"sources": [{"name": "s", "uri": str(tmp_path)}]}}))
    outcome = CliRunner().invoke(app, ["gateway", "--config", str(config), "--host", "0.0.0.0"])
    assert outcome.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without an API key" in outcome.output
    config.write_text(
        yaml.safe_dump(
            {"data": {"sources": [{"name": "s", "uri": str(tmp_path)}]}, "serving": {"challenger_share": 2}}
        )
    )
    outcome = CliRunner().invoke(app, ["gateway", "--config", str(config)])
    assert outcome.exit_code == 2
    assert "serving.challenger_share" in outcome.output
