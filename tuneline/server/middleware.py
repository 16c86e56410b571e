"""The outermost layer of `tuneline serve`, before any router.

For every request, in this order:
- browsers are kept out: a request with an `Origin` header (a web page's fetch) is refused unless that
  origin is listed in `allowed_origins` (server.allowed_origins), and a server bound to loopback
  refuses a `Host` that is not a loopback name or address (a page that rebinds its own DNS name to
  127.0.0.1 still sends its own name): 403, OpenAI's error shape;
- the API key (under /v1), then the injected faults (--fault-rate);
- the body is bounded while it streams in: a declared length over the limit is refused before a byte
  is read, and a body that grows past it is cut off with a 413 (uploads: server.max_upload_bytes plus
  the multipart framing; JSON: server.max_request_bytes);
- every response carries an `x-request-id` header (`req_` + 32 hex digits, as the hosted service sends
  and the SDK shows as `_request_id`), also in the request's log line, so a client's report can be
  matched to the server's log;
- one log line per request: method, path (control characters escaped), status, time; never the query
  string, which is where a key sent the wrong way (`?api_key=...`) would be, and never the key.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: it adds no task or stream per request.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from tuneline.server.errors import (
    APIError,
    file_too_large,
    injected_fault,
    invalid_api_key,
    missing_api_key,
    request_too_large,
)
from tuneline.server.logs import printable
from tuneline.server.protocol import wire
from tuneline.server.settings import ServerSettings, is_loopback

log = logging.getLogger("tuneline.server")

# Multipart framing (boundaries, part headers) around an uploaded file.
MULTIPART_FRAMING = 64 * 1024


async def send_error(error: APIError, send: Any) -> None:
    """Answer an ASGI request with an error in OpenAI's shape."""
    body = wire(error.response())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_loopback_host(header: str) -> bool:
    """Whether a Host header names this machine's loopback: `localhost` (or a name under it, which
    browsers never resolve through DNS), 127.0.0.0/8 or ::1, with or without a port."""
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gatekeeper:
    """Every request passes the browser checks; every request under /v1 the API key and the fault
    injection; every body its size bound; every request is logged."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.key = settings.api_key.encode() if settings.api_key is not None else None
        self.fault_rng = random.Random(settings.fault_seed)
        self.fault_lock = threading.Lock()
        self.loopback = is_loopback(settings.host)
        self.allowed_origins = frozenset(settings.allowed_origins)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        request_id = "req_" + secrets.token_hex(16)

        async def send_and_note(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is not None:
                await send_error(refusal, send_and_note)
            else:
                await self.app(scope, self.bounded(scope, receive), send_and_note)
        finally:
            log.info(
                "%s %s -> %d (%.1f ms) %s",
                scope["method"],
                printable(scope["path"]),
                status,
                (time.perf_counter() - started) * 1000,
                request_id,
            )

    def refusal(self, scope: Any) -> APIError | None:
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1") not in self.allowed_origins:
            return APIError(
                403,
                "Requests from web pages are refused: this request carries the Origin "
                f"{printable(origin.decode('latin-1'), 80)!r}, which server.allowed_origins does not list.",
                code="origin_not_allowed",
            )
        host = headers.get(b"host")
        if self.loopback and host is not None and not is_loopback_host(host.decode("latin-1")):
            return APIError(
                403,
                f"This server listens on loopback only and answers requests for localhost or 127.0.0.1, "
                f"not for {printable(host.decode('latin-1'), 80)!r}.",
                code="host_not_allowed",
            )
        if not scope["path"].startswith("/v1"):
            return None
        if (
            origin is not None
            and scope["method"] == "OPTIONS"
            and b"access-control-request-method" in headers
        ):
            return (
                None  # a CORS preflight of an allowed origin: answered without a key, as browsers send none
            )
        if self.key is not None:
            header = headers.get(b"authorization", b"")
            scheme, _, key = header.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                return missing_api_key()
            if not hmac.compare_digest(key.strip().encode("latin-1"), self.key):
                return invalid_api_key()
        declared = headers.get(b"content-length", b"")
        limit, too_large = self.body_limit(scope)
        if declared.isdigit() and int(declared) > limit:
            return too_large(int(declared), False)
        if self.settings.fault_rate > 0:
            with self.fault_lock:
                hit = self.fault_rng.random() < self.settings.fault_rate
                status = self.fault_rng.choice((429, 500, 503))
            if hit:
                return injected_fault(status, self.settings.fault_retry_after_s)
        return None

    def body_limit(self, scope: Any) -> tuple[int, Callable[[int, bool], APIError]]:
        """The most bytes this request's body may have, and the error that refuses a larger one
        (given the size, and whether it is only what was read so far)."""
        if scope["path"].rstrip("/") == "/v1/files" and scope["method"] == "POST":
            limit = self.settings.max_upload_bytes + MULTIPART_FRAMING
            return limit, lambda size, partial: file_too_large(size, self.settings.max_upload_bytes, partial)
        limit = self.settings.max_request_bytes
        return limit, lambda size, partial: request_too_large(size, limit, partial)

    def bounded(self, scope: Any, receive: Any) -> Any:
        """`receive` that raises the 413 as soon as the body read so far passes the limit."""
        limit, too_large = self.body_limit(scope)
        seen = 0

        async def receive_bounded() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(seen, True)
            return message

        return receive_bounded
