"""Fixtures of the gateway tests (gateway_harness.py holds the helpers)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from gateway_harness import Gateway, Registry, ServerThread, Upstream, make_config

from tuneline.gateway.app import GatewaySettings, create_app
from tuneline.gateway.echo import EchoState, create_echo_app


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the gateway tests (each test registers its own model name): creating an MLflow
    SQLite schema takes seconds on a shared machine."""
    root = tmp_path_factory.mktemp("gateway-store")
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").search_experiments()
    return root


@pytest.fixture
def upstreams() -> Iterator[Callable[..., Upstream]]:
    """upstreams(answer=...): a new echo upstream, stopped after the test."""
    started: list[ServerThread] = []

    def make(answer: str | None = None, latency_ms: float = 0.0) -> Upstream:
        state = EchoState(latency_ms=latency_ms, answer=answer)
        server = ServerThread(create_echo_app(state)).start()
        started.append(server)
        return Upstream(state, server)

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def gateways(store: Path, tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """gateways(**serving): a gateway on a fresh registered model in the module's store."""
    started: list[ServerThread] = []

    def make(model: str | None = None, **serving: Any) -> Gateway:
        name = model or f"support-{uuid.uuid4().hex[:8]}"
        config = make_config(store, tmp_path / name, name, **serving)
        server = ServerThread(create_app(GatewaySettings(config, None, "127.0.0.1", 0))).start()
        started.append(server)
        return Gateway(config, server, Registry(config.tracking))

    yield make
    for server in started:
        server.stop()
