"""Helpers of the gateway tests: a real MLflow store (SQLite in a temp dir), real upstreams (the echo server,
tuneline/gateway/echo.py, on uvicorn over loopback HTTP) and the gateway itself on uvicorn, driven by the
unmodified `openai` SDK and httpx."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import uvicorn

from tuneline import tracking
from tuneline.config import Config, parse_config
from tuneline.gateway.echo import EchoState
from tuneline.tracking import TrackingConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerThread:
    """An ASGI app served by uvicorn on a loopback port, in a thread of the test process."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Upstream:
    state: EchoState
    server: ServerThread

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"


def make_config(store: Path, tmp: Path, model: str, **serving: Any) -> Config:
    return parse_config(
        {
            "data": {"sources": [{"name": "s", "uri": str(tmp / "raw")}]},
            "tracking": {
                "tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
                "artifact_location": str(store / "artifacts"),
                "experiment": "gateway-tests",
                "registered_model": model,
            },
            "serving": {"feedback_spool": str(tmp / "spool"), "alias_ttl_s": 0.5, **serving},
        }
    )


class Registry:
    """Registers versions of one registered model that point at echo upstreams, and moves aliases."""

    def __init__(self, config: TrackingConfig) -> None:
        self.config = config
        self.run_id: str | None = None

    def register(
        self, upstream: Upstream | str, model_id: str, *aliases: str, kind: str = "compatible"
    ) -> str:
        if self.run_id is None:
            self.run_id = tracking.RunLog.start(self.config, flow="gateway-test", name="register").run_id
        base_url = upstream if isinstance(upstream, str) else upstream.base_url
        record = tracking.register_external_model(
            self.config,
            self.run_id,
            model_id,
            params={"model_id": model_id},
            tags={"tuneline.provider_kind": kind, "tuneline.base_url": base_url, "tuneline.provider": kind},
            metrics={},
        )
        for alias in aliases:
            tracking.set_alias(self.config, alias, record.version)
        return record.version

    def move(self, alias: str, version: str) -> None:
        tracking.set_alias(self.config, alias, version)


@dataclass
class Gateway:
    config: Config
    server: ServerThread
    registry: Registry
    _client: openai.OpenAI | None = None

    @property
    def base_url(self) -> str:
        return f"{self.server.url}/v1"

    @property
    def name(self) -> str:
        return self.config.tracking.registered_model

    @property
    def app_state(self) -> Any:
        return self.server.server.config.app.state.gateway

    def client(self, **options: Any) -> openai.OpenAI:
        """One SDK client per gateway (building one reads the CA bundle: tens of milliseconds)."""
        if self._client is None:
            self._client = openai.OpenAI(base_url=self.base_url, api_key="test-key", max_retries=0)
        return self._client.with_options(**options) if options else self._client

    def ask(
        self, model: str | None = None, user: str | None = None, text: str = "hello", **extra: Any
    ) -> Any:
        """The raw SDK response (headers and parsed body) of one chat completion."""
        body: dict[str, Any] = {"model": model or self.name, "messages": [{"role": "user", "content": text}]}
        if user is not None:
            body["user"] = user
        return self.client().chat.completions.with_raw_response.create(**body, **extra)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 20.0, step_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(step_s)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)
