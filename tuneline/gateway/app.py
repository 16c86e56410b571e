"""`tuneline gateway`: one OpenAI-compatible endpoint that serves the registered model's champion.

- `POST /v1/chat/completions`: `model` is a registered model name (tuneline/gateway/routing.py): the
  request goes to the version holding `champion`, or `challenger` for the sticky share of users
  (tuneline/gateway/ab.py), or the pinned `NAME@ALIAS` / `NAME@VERSION`, on the provider recorded on
  that version, through one shared async `openai` client per provider. The upstream's answer (JSON or
  the server-sent event stream) is passed through unchanged, with the headers `x-tuneline-trace-id`,
  `x-tuneline-variant` and `x-tuneline-model-version`.
- The upstream failing past its retries: an unpinned request is answered by the version holding
  `previous` (`serving.fallback_to_previous`; header `x-tuneline-fallback-from: VARIANT:VERSION`),
  else a 502 in OpenAI's error shape. A streamed answer falls back only before its first byte.
- Every answer, fallbacks and failures included, is traced (tuneline/gateway/tracing.py: off the
  request path, bounded, drops counted).
- `POST /v1/feedback {trace_id, value, comment?, correction?, user?}`: acknowledged once spooled on
  disk, then written to MLflow (tuneline/gateway/feedback.py).
- `GET /v1/models`: each served registered model and its aliases (`NAME@ALIAS`);
  `GET /gateway/stats`: trace and feedback counters; `GET /health`.

Security as `tuneline serve`: loopback by default; with an API key set (TUNELINE_GATEWAY_API_KEY, else
TUNELINE_API_KEY) every /v1 and /gateway request needs `Authorization: Bearer <key>`, and without one
the gateway only binds loopback; a loopback-bound gateway refuses a non-loopback Host header (DNS
rebinding) and any browser Origin.

The module is longer than most (about 700 lines) because the request path of a chat completion (plain,
streamed, fallback, 502, trace) reads best in one place; routing, A/B, upstream clients, tracing and
feedback live in their own modules.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tuneline.config import Config, load_config
from tuneline.gateway import ab
from tuneline.gateway.feedback import FeedbackSpool
from tuneline.gateway.routing import (
    CHALLENGER,
    PINNED,
    VARIANTS,
    Resolver,
    RoutingError,
    Target,
    parse_model,
)
from tuneline.gateway.tracing import TraceExporter, TraceRecord, new_trace_id
from tuneline.gateway.upstream import UpstreamPool
from tuneline.paths import resolve
from tuneline.provider import is_transient
from tuneline.server.errors import APIError
from tuneline.tracking import CHAMPION, PREVIOUS, artifact_uri, tracking_uri

log = logging.getLogger("tuneline.gateway")

API_KEY_ENVS = ("TUNELINE_GATEWAY_API_KEY", "TUNELINE_API_KEY")
TRACE_HEADER = "x-tuneline-trace-id"
VARIANT_HEADER = "x-tuneline-variant"
VERSION_HEADER = "x-tuneline-model-version"
FALLBACK_HEADER = "x-tuneline-fallback-from"
# A streamed answer is kept for its trace up to this many bytes (the client gets all of it).
MAX_TRACED_STREAM = 1 << 20
TRACE_ID_LENGTH = len("tr-") + 32


@dataclass(frozen=True)
class GatewaySettings:
    config: Config
    api_key: str | None
    host: str
    port: int

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self.config.serving.models) or (self.config.tracking.registered_model,)


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def _is_loopback_host(header: str) -> bool:
    from tuneline.server.middleware import is_loopback_host

    return is_loopback_host(header)


class Gateway:
    """The gateway's state: resolver, upstream clients, trace exporter, feedback spool."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        config = settings.config
        serving = config.serving
        self.serving = serving
        store = tracking_uri(config.tracking)
        local = serving.local_base_url or f"http://{config.server.host}:{config.server.port}/v1"
        self.resolver = Resolver(store, ttl_s=serving.alias_ttl_s, local_base_url=local)
        self.pool = UpstreamPool(config)
        trace_store = serving.trace_uri or store
        self.tracer = (
            TraceExporter(
                trace_store,
                artifact_uri(config.tracking),
                queue_size=serving.trace_queue_size,
                mode=serving.trace_export,
            )
            if serving.tracing
            else None
        )
        self.feedback = FeedbackSpool(resolve(serving.feedback_spool), trace_store)
        self.key = settings.api_key.encode() if settings.api_key else None
        self.loopback = _bound_to_loopback(settings.host)
        self._hosts: dict[str, bool] = {}
        self.requests = 0
        self.fallbacks = 0
        self.upstream_failures = 0

    def start(self) -> None:
        if self.tracer is not None:
            self.tracer.start()
        self.feedback.start()

    async def stop(self) -> None:
        await self.pool.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.stop)
        await asyncio.to_thread(self.feedback.stop)

    # --- checks --------------------------------------------------------------------------------------

    def _loopback_host(self, host: str) -> bool:
        known = self._hosts.get(host)
        if known is None:
            known = _is_loopback_host(host)
            if len(self._hosts) < 1024:  # a few names in practice; bounded against hostile Host headers
                self._hosts[host] = known
        return known

    def refused(self, request: Request) -> Response | None:
        headers = request.headers
        if headers.get("origin") is not None:
            return error_response(
                403,
                "Requests from web pages (an Origin header) are not accepted by the gateway.",
                code="origin_not_allowed",
            )
        if self.loopback and not self._loopback_host(headers.get("host", "")):
            return error_response(
                403,
                "This gateway listens on loopback and answers only loopback host names.",
                code="host_not_allowed",
            )
        if self.key is None:
            return None
        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            return error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY): the key is the value "
                "of TUNELINE_GATEWAY_API_KEY (or TUNELINE_API_KEY) where the gateway runs.",
                code="missing_api_key",
            )
        if not hmac.compare_digest(auth[7:].strip().encode(), self.key):
            return error_response(
                401,
                "Incorrect API key provided. Use the value of TUNELINE_GATEWAY_API_KEY (or "
                "TUNELINE_API_KEY) that the gateway was started with.",
                code="invalid_api_key",
            )
        return None

    async def json_body(self, request: Request) -> dict[str, Any]:
        limit = self.serving.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(
                413,
                f"The request body is too large: {declared} bytes; this gateway accepts JSON bodies up to "
                f"{limit} bytes (serving.max_request_bytes in the config).",
                code="request_too_large",
            )
        # Read as it streams in, so a body without a declared length is cut off at the limit.
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(
                    413, f"The request body is too large (over {limit} bytes).", code="request_too_large"
                )
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise APIError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
                "using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
            ) from None
        if not isinstance(payload, dict):
            raise APIError(400, "The request body must be a JSON object.")
        return payload

    # --- routing -------------------------------------------------------------------------------------

    async def route(self, model: str, user: str | None) -> tuple[Target, str, bool]:
        """(target, variant, pinned) for a request's `model` and user."""
        wanted = parse_model(model)
        if wanted.registered_model not in self.settings.models:
            served = ", ".join(self.settings.models)
            raise RoutingError(
                404,
                f"The model `{model}` does not exist or you do not have access to it: this gateway serves "
                f"{served} (serving.models in the config)",
                "model_not_found",
            )
        name = wanted.registered_model
        if wanted.selector is not None:
            target = await self.resolver.pinned(wanted)
            variant = wanted.selector if wanted.selector in VARIANTS else PINNED
            return target, variant, True
        aliases = await self.resolver.aliases(name)
        champion = aliases.get(CHAMPION)
        if champion is None:
            raise RoutingError(
                503,
                f"{name!r} has no champion yet: no version holds the alias `champion` (promote one with "
                "`tuneline run`)",
                "no_champion",
            )
        challenger = aliases.get(CHALLENGER)
        share = self.serving.challenger_share
        if (
            challenger is not None
            and challenger != champion
            and ab.to_challenger(user, share, ab.salt_for(name, challenger))
        ):
            return await self.resolver.version(name, challenger), CHALLENGER, False
        return await self.resolver.version(name, champion), CHAMPION, False

    # --- the upstream call ---------------------------------------------------------------------------

    # Through the SDK's generic `post` with the body as sent (only `model` replaced by the provider's
    # model id): the typed `chat.completions.create` would walk every message through its param
    # transform, milliseconds of CPU per request (measured, benchmarks/gateway.py), to send the same
    # JSON. The SDK still does the retries, timeouts and error mapping.
    async def call(self, target: Target, payload: dict[str, Any]) -> tuple[int, bytes, str]:
        """(status, body, content type) from the upstream; raises the SDK's errors past retries."""
        client = self.pool.client(target.upstream)
        response = await client.post(
            "/chat/completions", cast_to=httpx2.Response, body={**payload, "model": target.model_id}
        )
        return (
            response.status_code,
            response.content,
            response.headers.get("content-type", "application/json"),
        )

    async def open_stream(self, target: Target, payload: dict[str, Any]) -> httpx2.Response:
        """The upstream's streamed answer, headers read and body not yet: the caller closes it."""
        client = self.pool.client(target.upstream)
        response: Any = await client.post(
            "/chat/completions",
            cast_to=httpx2.Response,
            body={**payload, "model": target.model_id},
            stream=True,
            stream_cls=openai.AsyncStream[httpx2.Response],
        )
        # With cast_to=httpx2.Response the SDK hands back the response itself, its body unread.
        assert isinstance(response, httpx2.Response)
        return response

    def trace(self, record: TraceRecord) -> None:
        if self.tracer is not None:
            record.end_ns = record.end_ns or time.time_ns()
            self.tracer.submit(record)

    def stats(self) -> dict[str, Any]:
        # The spool is listed before the counters are read (the sender counts a delivery before it
        # deletes the file), so an empty spool in these stats comes with every delivery counted.
        spooled = len(self.feedback.pending())
        feedback = self.feedback.stats
        return {
            "requests": self.requests,
            "fallbacks": self.fallbacks,
            "upstream_failures": self.upstream_failures,
            "traces": self.tracer.stats.as_dict() if self.tracer is not None else None,
            "trace_queue_depth": self.tracer.depth() if self.tracer is not None else 0,
            "feedback": {
                "accepted": feedback.accepted,
                "delivered": feedback.delivered,
                "retries": feedback.retries,
                "dead": feedback.dead,
                "spooled": spooled,
            },
        }


def _bound_to_loopback(host: str) -> bool:
    from tuneline.server.settings import is_loopback

    return is_loopback(host)


def _upstream_failure(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (401, 403):
        return f"the upstream refused the gateway's API key for it ({exc.status_code})"
    if isinstance(exc, openai.APIStatusError):
        return f"the upstream answered {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "the upstream timed out"
    if isinstance(exc, openai.APIConnectionError):
        return "could not connect to the upstream"
    return f"the upstream call failed ({type(exc).__name__})"


def create_app(settings: GatewaySettings) -> FastAPI:
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.start()
        # Everything imported and built so far (MLflow, SQLAlchemy, the SDK: millions of objects) moves
        # out of the collector's reach: a full collection then walks only what requests allocate, not a
        # 100 ms-plus pause in the middle of serving (p99 at 50 clients: +182 ms -> +50 ms over direct,
        # benchmarks/gateway.py).
        gc.freeze()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(
        title="tuneline gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = gateway

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/gateway/stats")
    async def stats(request: Request) -> Response:
        refused = gateway.refused(request)
        if refused is not None:
            return refused
        return Response(orjson.dumps(gateway.stats()), media_type="application/json")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        refused = gateway.refused(request)
        if refused is not None:
            return refused
        data: list[dict[str, Any]] = []
        for name in settings.models:
            try:
                aliases = await gateway.resolver.aliases(name)
            except RoutingError:
                continue
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "tuneline-gateway"})
            for alias in sorted(aliases):
                data.append(
                    {"id": f"{name}@{alias}", "object": "model", "created": 0, "owned_by": "tuneline-gateway"}
                )
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def chat(request: Request) -> Response:
        refused = gateway.refused(request)
        if refused is not None:
            return refused
        gateway.requests += 1
        try:
            payload = await gateway.json_body(request)
            model = payload.get("model")
            if not isinstance(model, str) or not model.strip():
                raise APIError(400, "you must provide a model parameter", param="model")
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise APIError(400, "'messages' must be a non-empty array of messages", param="messages")
            user = payload.get("user")
            if user is not None and not isinstance(user, str):
                raise APIError(400, "'user' must be a string", param="user")
            user = user or request.headers.get(gateway.serving.user_header) or None
            target, variant, pinned = await gateway.route(model, user)
        except APIError as exc:
            return error_response(exc.status, exc.message, type=exc.type, code=exc.code, param=exc.param)
        except RoutingError as exc:
            return error_response(
                exc.status,
                exc.message,
                type="invalid_request_error" if exc.status < 500 else "server_error",
                code=exc.code,
                param="model" if exc.status < 500 else None,
            )
        session = request.headers.get(gateway.serving.session_header)
        record = TraceRecord(
            trace_id=new_trace_id(),
            registered_model=target.registered_model,
            variant=variant,
            version=target.version,
            model_id=target.model_id,
            user=user,
            session=session,
            request=payload,
            start_ns=time.time_ns(),
            streamed=bool(payload.get("stream")),
        )
        if record.streamed:
            return await stream(record, target, pinned, payload)
        try:
            status, body, content_type = await gateway.call(target, payload)
        except openai.APIStatusError as exc:
            if not is_transient(exc) and exc.status_code not in (401, 403):
                # The request itself was refused (400, 404, 413, 422): the client's to fix, as the
                # upstream said it.
                record.status, record.response = exc.status_code, exc.response.content
                record.error = f"upstream refused: {exc.status_code}"
                gateway.trace(record)
                return Response(
                    exc.response.content,
                    exc.status_code,
                    headers=headers_of(record),
                    media_type=exc.response.headers.get("content-type", "application/json"),
                )
            return await fallback(record, target, pinned, payload, exc)
        except (openai.APIError, KeyError) as exc:
            return await fallback(record, target, pinned, payload, exc)
        record.status, record.response = status, body
        gateway.trace(record)
        return Response(body, status, headers=headers_of(record), media_type=content_type)

    def headers_of(record: TraceRecord) -> dict[str, str]:
        headers = {
            VARIANT_HEADER: record.variant,
            VERSION_HEADER: record.version,
        }
        if gateway.tracer is not None:
            headers[TRACE_HEADER] = record.trace_id
        if record.fallback_from:
            headers[FALLBACK_HEADER] = record.fallback_from
        return headers

    async def previous_for(record: TraceRecord, target: Target, pinned: bool) -> Target | None:
        if pinned or not gateway.serving.fallback_to_previous or record.variant == PREVIOUS:
            return None
        try:
            previous = await gateway.resolver.alias(target.registered_model, PREVIOUS)
        except RoutingError:
            return None
        return previous if previous is not None and previous.version != target.version else None

    async def fallback(
        record: TraceRecord, target: Target, pinned: bool, payload: dict[str, Any], exc: Exception
    ) -> Response:
        gateway.upstream_failures += 1
        failure = _upstream_failure(exc)
        previous = await previous_for(record, target, pinned)
        if previous is not None:
            log.warning(
                "version %s of %r failed (%s); answering from `previous` (version %s)",
                target.version,
                target.registered_model,
                failure,
                previous.version,
            )
            gateway.fallbacks += 1
            record.fallback_from = f"{record.variant}:{record.version}"
            record.variant, record.version, record.model_id = PREVIOUS, previous.version, previous.model_id
            try:
                status, body, content_type = await gateway.call(previous, payload)
            except (openai.APIError, KeyError) as second:
                failure = f"{failure}; `previous` (version {previous.version}): {_upstream_failure(second)}"
            else:
                record.status, record.response = status, body
                gateway.trace(record)
                return Response(body, status, headers=headers_of(record), media_type=content_type)
        message = (
            f"The upstream of {target.registered_model!r} version {record.fallback_from or record.version} "
            f"failed after {gateway.serving.upstream_retries} retries ({failure}); "
            + ("no `previous` version could answer instead." if not pinned else "the request pinned it.")
        )
        if isinstance(exc, KeyError):
            message = (
                f"The gateway has no API key for the upstream of {target.registered_model!r} version "
                f"{target.version} ({target.upstream.kind}): set {exc.args[0]} where the gateway runs."
            )
        record.status, record.error = 502, message
        gateway.trace(record)
        return error_response(
            502, message, type="server_error", code="upstream_failed", headers=headers_of(record)
        )

    async def stream(record: TraceRecord, target: Target, pinned: bool, payload: dict[str, Any]) -> Response:
        try:
            response = await gateway.open_stream(target, payload)
        except openai.APIStatusError as exc:
            if not is_transient(exc) and exc.status_code not in (401, 403):
                record.status, record.error = exc.status_code, f"upstream refused: {exc.status_code}"
                record.response = None
                gateway.trace(record)
                return Response(
                    exc.response.content,
                    exc.status_code,
                    headers=headers_of(record),
                    media_type="application/json",
                )
            return await stream_fallback(record, target, pinned, payload, exc)
        except (openai.APIError, KeyError) as exc:
            return await stream_fallback(record, target, pinned, payload, exc)
        return streamed(record, response)

    async def stream_fallback(
        record: TraceRecord, target: Target, pinned: bool, payload: dict[str, Any], exc: Exception
    ) -> Response:
        previous = await previous_for(record, target, pinned)
        if previous is None:  # the 502 (fallback finds no `previous` either)
            return await fallback(record, target, pinned, payload, exc)
        gateway.upstream_failures += 1
        gateway.fallbacks += 1
        record.fallback_from = f"{record.variant}:{record.version}"
        record.variant, record.version, record.model_id = PREVIOUS, previous.version, previous.model_id
        try:
            response = await gateway.open_stream(previous, payload)
        except (openai.APIError, KeyError) as second:
            message = (
                f"The upstream of {target.registered_model!r} failed after retries ({_upstream_failure(exc)}), "
                f"and so did `previous` (version {previous.version}: {_upstream_failure(second)})."
            )
            record.status, record.error = 502, message
            gateway.trace(record)
            return error_response(
                502, message, type="server_error", code="upstream_failed", headers=headers_of(record)
            )
        return streamed(record, response)

    def streamed(record: TraceRecord, response: httpx2.Response) -> Response:
        kept: list[bytes] = []
        size = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal size
            try:
                async for chunk in response.aiter_bytes():
                    if size < MAX_TRACED_STREAM:
                        kept.append(chunk)
                        size += len(chunk)
                    yield chunk
            except Exception as exc:  # the upstream broke off mid-stream: the client sees the cut
                record.error = f"the upstream stream broke off: {type(exc).__name__}"
                raise
            finally:
                await response.aclose()
                record.status, record.response = response.status_code, b"".join(kept)
                gateway.trace(record)

        return StreamingResponse(
            body(),
            response.status_code,
            headers=headers_of(record),
            media_type=response.headers.get("content-type", "text/event-stream"),
        )

    # A plain Starlette route: the handler takes the raw Request and builds its Response, so FastAPI's
    # per-request dependency and response machinery would do nothing here but cost CPU on the hot path
    # (p50 added at 50 clients: +7.5 ms -> +5.0 ms, benchmarks/gateway.py, same machine, same hour).
    app.router.add_route("/v1/chat/completions", chat, methods=["POST"])

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        refused = gateway.refused(request)
        if refused is not None:
            return refused
        try:
            payload = await gateway.json_body(request)
        except APIError as exc:
            return error_response(exc.status, exc.message, code=exc.code)
        trace_id = payload.get("trace_id")
        if (
            not isinstance(trace_id, str)
            or len(trace_id) != TRACE_ID_LENGTH
            or not trace_id.startswith("tr-")
            or any(c not in "0123456789abcdef" for c in trace_id[3:])
        ):
            return error_response(
                400,
                "'trace_id' must be the trace id a chat completion returned in the x-tuneline-trace-id "
                "header (tr- and 32 hex digits)",
                param="trace_id",
            )
        value = payload.get("value")
        if value is None or not isinstance(value, bool | int | float | str):
            return error_response(
                400, "'value' must be a boolean, a number or a string (the user's verdict)", param="value"
            )
        comment = payload.get("comment")
        if comment is not None and not isinstance(comment, str):
            return error_response(400, "'comment' must be a string", param="comment")
        user = payload.get("user")
        if user is not None and not isinstance(user, str):
            return error_response(400, "'user' must be a string", param="user")
        user = user or request.headers.get(gateway.serving.user_header) or None
        correction = payload.get("correction")
        extra = set(payload) - {"trace_id", "value", "comment", "correction", "user"}
        if extra:
            name = sorted(extra)[0]
            return error_response(400, f"Unrecognized request argument supplied: {name}", param=name)
        try:
            feedback_id = await asyncio.to_thread(
                gateway.feedback.accept, trace_id, value, user, comment, correction
            )
        except OSError as exc:
            log.error("feedback spool write failed: %s", exc)
            return error_response(
                503, "The feedback could not be stored; it was not kept: send it again.", type="server_error"
            )
        return Response(
            orjson.dumps(
                {"id": feedback_id, "object": "feedback", "trace_id": trace_id, "status": "accepted"}
            ),
            202,
            media_type="application/json",
        )

    return app


WORKER_SETTINGS_ENV = "TUNELINE_GATEWAY_WORKER_SETTINGS"


def api_key_from_env() -> str | None:
    for name in API_KEY_ENVS:
        value = os.environ.get(name)
        if value is not None:
            return value.strip() or None
    return None


def worker_app() -> FastAPI:
    """The app of one uvicorn worker process (`serving.workers` > 1), from the settings `run_gateway`
    left in the environment: each worker has its own registry cache, upstream clients and trace
    exporter; they share the feedback spool (one of them delivers it at a time)."""
    raw = json.loads(os.environ[WORKER_SETTINGS_ENV])
    config = load_config(raw["config"] or None)
    return create_app(GatewaySettings(config, api_key_from_env(), raw["host"], int(raw["port"])))


def run_gateway(settings: GatewaySettings, *, config_path: Path | None = None, workers: int = 1) -> None:
    """Serve the gateway with uvicorn (uvloop and httptools when installed), access log off: one log
    line per request would cost more than the gateway's own work. `workers` > 1: that many processes
    on the one port (one event loop is one core: about 600 requests/s, benchmarks/gateway.py)."""
    import uvicorn

    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "auto",
        "http": "auto",
        "access_log": False,
        "log_level": "info",
        "timeout_keep_alive": 30,
    }
    if workers > 1:
        os.environ[WORKER_SETTINGS_ENV] = json.dumps(
            {"config": str(config_path or ""), "host": settings.host, "port": settings.port}
        )
        uvicorn.run("tuneline.gateway.app:worker_app", factory=True, workers=workers, **common)
        return
    uvicorn.run(create_app(settings), **common)


def spool_folder(config: Config) -> Path:
    return resolve(config.serving.feedback_spool)
