"""One shared async `openai` client per upstream provider, with a large connection pool.

The client's HTTP layer is the SDK's aiohttp transport (`openai.DefaultAioHttpClient`) when aiohttp is
installed, else its httpx2 default.

Clients are made on first use per (kind, base URL, API version) and kept for the gateway's life: a
request reuses pooled keep-alive connections instead of opening one (the largest share of a naive
proxy's overhead). Retries are the SDK's own (`serving.upstream_retries`: 408/409/429/5xx, connection
errors and timeouts, honouring retry-after); what still fails is the gateway's to handle (fallback or
502). The key per kind comes from the environment, as `tuneline run` reads it (tuneline/provider.py):
`provider.api_key_env` when the config's provider is of that kind, else the kind's usual variable
(TUNELINE_API_KEY for local and compatible, OPENAI_API_KEY, AZURE_OPENAI_API_KEY); a local server
without a key set accepts any key on loopback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from tuneline.config import Config
from tuneline.gateway.routing import Upstream
from tuneline.provider import DEFAULT_KEY_ENV, key_env_name


@dataclass(frozen=True)
class PoolSettings:
    retries: int
    timeout_s: float
    max_connections: int


def _http_client(limits: httpx2.Limits) -> httpx2.AsyncClient:
    """The SDK's aiohttp transport when aiohttp is installed (the `gateway` extra): its C HTTP parser
    costs about a third less CPU per request than httpx2's pure-Python one, measured with
    benchmarks/gateway.py; else the SDK's default httpx2 client."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return openai.DefaultAsyncHttpxClient(limits=limits)
    return openai.DefaultAioHttpClient(limits=limits)


class UpstreamPool:
    def __init__(self, config: Config) -> None:
        self.config = config
        serving = config.serving
        self.settings = PoolSettings(
            serving.upstream_retries, serving.upstream_timeout_s, serving.max_connections
        )
        self._clients: dict[Upstream, openai.AsyncOpenAI] = {}

    def key_for(self, kind: str) -> str:
        env = (
            key_env_name(self.config.provider) if self.config.provider.kind == kind else DEFAULT_KEY_ENV[kind]
        )
        key = (os.environ.get(env) or "").strip()
        if key:
            return key
        if kind in {"local", "compatible"}:
            return "tuneline-gateway"  # a loopback server without a key accepts any
        raise KeyError(env)

    def client(self, upstream: Upstream) -> openai.AsyncOpenAI:
        found = self._clients.get(upstream)
        if found is not None:
            return found
        limits = httpx2.Limits(
            max_connections=self.settings.max_connections,
            max_keepalive_connections=self.settings.max_connections,
            keepalive_expiry=60.0,
        )
        http_client = _http_client(limits)
        common: dict[str, Any] = {
            "api_key": self.key_for(upstream.kind),
            "timeout": self.settings.timeout_s,
            "max_retries": self.settings.retries,
            "http_client": http_client,
        }
        client: openai.AsyncOpenAI
        if upstream.kind == "azure" and upstream.azure_api_version:
            client = openai.AsyncAzureOpenAI(
                azure_endpoint=upstream.base_url, api_version=upstream.azure_api_version, **common
            )
        elif upstream.kind == "azure":
            client = openai.AsyncOpenAI(base_url=f"{upstream.base_url}/openai/v1", **common)
        else:
            client = openai.AsyncOpenAI(base_url=upstream.base_url, **common)
        self._clients[upstream] = client
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
