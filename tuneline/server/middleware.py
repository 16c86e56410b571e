"""The outermost layer of `tuneline serve`, before any router: the API key, injected faults, and one
log line per request (method, path, status, time; never the key).

Plain ASGI rather than Starlette's BaseHTTPMiddleware: it adds no task or stream per request.
"""

from __future__ import annotations

import hmac
import logging
import random
import threading
import time
from typing import Any

from tuneline.server.errors import APIError, injected_fault, invalid_api_key, missing_api_key
from tuneline.server.protocol import wire
from tuneline.server.settings import ServerSettings

log = logging.getLogger("tuneline.server")


async def send_error(error: APIError, send: Any) -> None:
    """Answer an ASGI request with an error in OpenAI's shape."""
    body = wire(error.response())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gatekeeper:
    """Every request under /v1 passes the API key check and the fault injection; every request is logged."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.key = settings.api_key.encode() if settings.api_key is not None else None
        self.fault_rng = random.Random(settings.fault_seed)
        self.fault_lock = threading.Lock()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope) if scope["path"].startswith("/v1") else None
            if refusal is not None:
                await send_error(refusal, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            log.info(
                "%s %s%s -> %d (%.1f ms)",
                scope["method"],
                scope["path"],
                f"?{query}" if query else "",
                status,
                (time.perf_counter() - started) * 1000,
            )

    def refusal(self, scope: Any) -> APIError | None:
        if self.key is not None:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            scheme, _, key = header.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return missing_api_key()
            if not hmac.compare_digest(key.strip().encode("latin-1"), self.key):
                return invalid_api_key()
        if self.settings.fault_rate > 0:
            with self.fault_lock:
                hit = self.fault_rng.random() < self.settings.fault_rate
                status = self.fault_rng.choice((429, 500, 503))
            if hit:
                return injected_fault(status, self.settings.fault_retry_after_s)
        return None
