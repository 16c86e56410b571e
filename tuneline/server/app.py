"""The OpenAI-compatible HTTP API of `tuneline serve`: files, fine_tuning/jobs, models, chat/completions.

Shapes follow shared/spec/openai-openapi.yaml; errors are `{"error": {message, type, param, code}}`.
Every request under /v1 needs `Authorization: Bearer <TUNELINE_API_KEY>` when a key is configured;
without one (allowed on loopback only) any key is accepted and a warning is logged at start.
One log line per request (method, path, status, time; never the key) and per job transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import re
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneline.formats import message_text
from tuneline.server.catalog import BUILTIN_MODEL, is_model_dir
from tuneline.server.errors import (
    APIError,
    file_not_found,
    injected_fault,
    invalid_api_key,
    invalid_request,
    job_not_found,
    missing_api_key,
    model_not_found,
)
from tuneline.server.jobs import JobRunner, parse_create_request
from tuneline.server.settings import ORGANIZATION, ServerSettings
from tuneline.server.store import UPLOAD_PURPOSES, CursorNotFound, Store, new_id

log = logging.getLogger("tuneline.server")

T = TypeVar("T")

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# Chat parameters accepted and honoured, accepted and without effect here, and refused as unsupported.
CHAT_FIELDS = frozenset(
    {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "n"}
    | {"stream", "stream_options"}
)
CHAT_NO_EFFECT = frozenset(
    {"user", "metadata", "store", "frequency_penalty", "presence_penalty", "logit_bias", "service_tier"}
    | {"parallel_tool_calls", "logprobs", "top_logprobs", "prompt_cache_key", "safety_identifier"}
    | {"response_format", "reasoning_effort", "verbosity"}
)
CHAT_UNSUPPORTED = frozenset(
    {
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
    }
)
BUILTIN_OWNER = ORGANIZATION


# -- models -----------------------------------------------------------------------------------


class ModelCatalog:
    """Which model ids this server knows: base models (built-in and --model-dir), fine-tuned models
    and kept checkpoints; and the chat models loaded in memory (least recently used evicted)."""

    def __init__(self, store: Store, settings: ServerSettings) -> None:
        self.store = store
        self.settings = settings
        self.started = int(time.time())
        self._base_ids: list[str] | None = None
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()

    def base_ids(self) -> list[str]:
        if self._base_ids is None:
            from tuneline.server.catalog import base_model_ids

            self._base_ids = list(base_model_ids(self.settings.model_dirs))
        return self._base_ids

    def base_of(self, model_id: str) -> str | None:
        """The base model a model descends from (itself for a base model), None if unknown."""
        if model_id in self.base_ids():
            return model_id
        own = self.store.get_model(model_id)
        if own is None:
            return None
        job = self.store.get_job(own.job_id)
        return job.base_model if job else None

    def available(self) -> list[str]:
        return [*self.base_ids(), *(m.id for m in self.store.list_models())]

    def describe(self, model_id: str) -> dict[str, Any] | None:
        if model_id in self.base_ids():
            owner = BUILTIN_OWNER if model_id == self._builtin() else "system"
            return {"id": model_id, "object": "model", "created": self._made(model_id), "owned_by": owner}
        own = self.store.get_model(model_id)
        return own.to_api() if own else None

    def _made(self, base_id: str) -> int:
        """When a base model's weights were written (a rebuilt or replaced model gets a new time, as a
        new snapshot would); the server's start while the built-in model is not built yet."""
        if base_id == self._builtin():
            directories = [self.store.state_dir / "models" / base_id]
        else:
            directories = [Path(d) for d in self.settings.model_dirs if Path(d).name == base_id]
        for directory in directories[:1]:
            for name in ("config.json", "adapter_config.json"):
                if (directory / name).is_file():
                    return int((directory / name).stat().st_mtime)
        return self.started

    def listing(self) -> list[dict[str, Any]]:
        base = [self.describe(model_id) for model_id in self.base_ids()]
        return [m for m in base if m] + [m.to_api() for m in self.store.list_models()]

    @staticmethod
    def _builtin() -> str:
        return BUILTIN_MODEL

    def path_of(self, model_id: str) -> Path:
        own = self.store.get_model(model_id)
        if own is not None:
            return Path(own.path)
        if model_id not in self.base_ids():
            raise model_not_found(model_id)
        from tuneline.server.builtin import resolve_base_model

        try:
            return resolve_base_model(model_id, self.store.state_dir, self.settings.model_dirs)
        except KeyError:
            raise model_not_found(model_id) from None

    def loaded(self, model_id: str) -> Any | None:
        """The model if it is in memory (then it exists: a deleted model is forgotten), else None."""
        with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return self._loaded[model_id]
        return None

    def chat_model(self, model_id: str) -> Any:
        """The loaded model (loading it once, in the calling thread, if needed)."""
        if (model := self.loaded(model_id)) is not None:
            return model
        # One load at a time: transformers' lazy imports are not safe to run from two threads at once.
        with self._load_lock:
            with self._lock:
                if model_id in self._loaded:
                    return self._loaded[model_id]
            from tuneline.server.modeling import ChatModel

            path = self.path_of(model_id)
            started = time.monotonic()
            model = ChatModel.load(path)
            log.info("loaded model %s from %s in %.1f s", model_id, path, time.monotonic() - started)
            with self._lock:
                self._loaded[model_id] = model
                while len(self._loaded) > self.settings.model_cache_size:
                    self._loaded.popitem(last=False)
            return model

    def warm_up(self) -> None:
        """Load the built-in model when it is on disk already, so that the first chat request does not
        pay for importing the model code (many seconds). A failure here only logs a warning."""
        try:
            if is_model_dir(self.store.models_dir / BUILTIN_MODEL):
                self.chat_model(BUILTIN_MODEL)
        except Exception:
            log.warning("warm-up of the built-in model failed; it loads on first use", exc_info=True)

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._loaded.pop(model_id, None)


# -- request parsing helpers ------------------------------------------------------------------


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise invalid_request("The request body is empty: send a JSON object.")
    try:
        return json.loads(raw)
    except ValueError:
        raise invalid_request(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None


def query_limit(request: Request, default: int, maximum: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_request(
            f"limit must be an integer between 1 and {maximum}, got {raw!r}.", param="limit"
        ) from None
    if not 1 <= value <= maximum:
        raise invalid_request(f"limit must be between 1 and {maximum}, got {value}.", param="limit")
    return value


def page(items: Sequence[dict[str, Any]], has_more: bool, *, ids: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"object": "list", "data": list(items), "has_more": has_more}
    if ids:
        body["first_id"] = items[0]["id"] if items else None
        body["last_id"] = items[-1]["id"] if items else None
    return body


def stale_cursor(exc: CursorNotFound, what: str) -> APIError:
    return invalid_request(
        f"after={exc.cursor} does not name a {what} of this list (it may have been deleted): "
        "list again without `after`.",
        param="after",
        code="invalid_cursor",
    )


METADATA_QUERY = re.compile(r"^metadata\[(.+)\]$")


# -- chat -------------------------------------------------------------------------------------


def chat_arguments(body: Any) -> tuple[str, list[dict[str, str]], dict[str, Any], bool, bool]:
    """(model, messages, generation options, stream, include_usage) of a chat request, checked."""
    if not isinstance(body, dict):
        raise invalid_request("The request body must be a JSON object.")
    for key in body:
        if key in CHAT_UNSUPPORTED and body[key] not in (None, [], {}):
            raise invalid_request(
                f"'{key}' is not supported by this server.", param=key, code="unsupported_parameter"
            )
        if key not in CHAT_FIELDS and key not in CHAT_NO_EFFECT and key not in CHAT_UNSUPPORTED:
            raise invalid_request(
                f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter"
            )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid_request(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise invalid_request(
            "Missing required parameter: 'messages' (a non-empty list of messages).",
            param="messages",
            code="missing_required_parameter",
        )
    messages = []
    for index, message in enumerate(raw_messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise invalid_request(
                f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}.",
                param=f"messages[{index}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid_request(
                f"messages[{index}].content must be a string or a list of content parts.",
                param=f"messages[{index}].content",
            )
        messages.append({"role": message["role"], "content": message_text(message)})
    options: dict[str, Any] = {}
    temperature = body.get("temperature")
    if temperature is not None:
        options["temperature"] = _number(temperature, "temperature", 0.0, 2.0)
    top_p = body.get("top_p")
    if top_p is not None:
        options["top_p"] = _number(top_p, "top_p", 0.0, 1.0)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise invalid_request(f"{param} must be an integer >= 1, got {max_tokens!r}.", param=param)
        options["max_tokens"] = max_tokens
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= 4
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise invalid_request(
                "stop must be a string or a list of 1 to 4 non-empty strings.", param="stop"
            )
        options["stop"] = stops
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise invalid_request(f"seed must be an integer, got {seed!r}.", param="seed")
        options["seed"] = seed
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid_request("n must be 1: this server returns one choice per request.", param="n")
    if body.get("logprobs"):
        raise invalid_request("logprobs are not supported by this server.", param="logprobs")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid_request(
            "Only response_format {'type': 'text'} is supported by this server.", param="response_format"
        )
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise invalid_request("stream must be true or false.", param="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise invalid_request("stream_options must be an object.", param="stream_options")
    include_usage = bool(stream_options.get("include_usage"))
    return model, messages, options, stream, include_usage


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid_request(
            f"{name} must be a number between {low:g} and {high:g}, got {value!r}.", param=name
        )
    return float(value)


def completion_body(
    completion_id: str, created: int, model: str, text: str, finish_reason: str, prompt: int, completion: int
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt, completion),
        "service_tier": "default",
        "system_fingerprint": "fp_tuneline",
    }


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chunk(
    completion_id: str, created: int, model: str, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_tuneline",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def sse(data: Mapping[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


# -- the app ----------------------------------------------------------------------------------


class Gatekeeper:
    """Outermost layer for /v1: the API key, injected faults, and one log line per request.

    Plain ASGI rather than Starlette's BaseHTTPMiddleware: it adds no task or stream per request.
    """

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
                await _error_response(refusal)(scope, receive, send_and_note)
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


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app over one state directory. Its lifespan starts and stops the job runner."""
    store = Store(settings.state_dir)
    runner = JobRunner(store, settings)
    catalog = ModelCatalog(store, settings)
    generation_pool = ThreadPoolExecutor(
        max_workers=settings.generation_threads, thread_name_prefix="generate"
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.api_key is None:
            log.warning(
                "TUNELINE_API_KEY is not set: requests with any key (or none) are accepted on %s",
                settings.host,
            )
        await asyncio.to_thread(catalog.base_ids)
        runner.start()
        if settings.warm_up:
            threading.Thread(target=catalog.warm_up, name="warm-up", daemon=True).start()
        log.info(
            "serving %s on http://%s:%d/v1 (state %s, %d concurrent job(s), fault rate %g, latency %g ms)",
            ", ".join(catalog.base_ids()),
            settings.host,
            settings.port,
            settings.state_dir,
            settings.concurrent_jobs,
            settings.fault_rate,
            settings.latency_ms,
        )
        try:
            yield
        finally:
            runner.stop()
            generation_pool.shutdown(wait=False, cancel_futures=True)
            store.close()

    app = FastAPI(title="tuneline", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    app.state.runner = runner
    app.state.catalog = catalog

    async def in_thread(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # -- middleware: request log, auth, injected faults --

    app.add_middleware(Gatekeeper, settings=settings)

    # -- error shapes --

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return _error_response(
            invalid_request(f"{where or 'request'}: {first.get('msg', 'invalid')}", param=where or None)
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(
            APIError(500, "The server had an error while processing your request.", type="server_error")
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405):
            message = f"Invalid URL ({request.method} {request.url.path})"
            return _error_response(APIError(exc.status_code, message))
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    # -- files --

    @app.post("/v1/files")
    async def upload_file(request: Request) -> Any:
        declared = request.headers.get("content-length")
        # Multipart framing adds a little to the file itself; refuse clearly oversized bodies unread.
        if declared and declared.isdigit() and int(declared) > settings.max_upload_bytes + 64 * 1024:
            raise _too_large(int(declared))
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:
            raise invalid_request(f"Could not parse the multipart form: {exc}.") from None
        purpose = form.get("purpose")
        upload = form.get("file")
        if not isinstance(purpose, str) or not purpose:
            raise invalid_request(
                "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
            )
        if upload is None or isinstance(upload, str):
            raise invalid_request(
                "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        if purpose not in UPLOAD_PURPOSES:
            raise invalid_request(
                f"'{purpose}' is not one of {list(UPLOAD_PURPOSES)} - 'purpose'",
                param="purpose",
                code="invalid_purpose",
            )
        filename = Path(upload.filename or "upload").name
        if purpose == "fine-tune" and not filename.lower().endswith(".jsonl"):
            raise invalid_request(
                "Invalid file format for Fine-Tuning API. Must be .jsonl",
                param="file",
                code="invalid_file_format",
            )
        size = upload.size if upload.size is not None else None
        if size is not None and size > settings.max_upload_bytes:
            raise _too_large(size)
        record = await in_thread(store.add_file, filename, purpose, upload.file)
        await upload.close()
        if record.bytes > settings.max_upload_bytes:
            await in_thread(store.delete_file, record.id)
            raise _too_large(record.bytes)
        if record.bytes == 0:
            await in_thread(store.delete_file, record.id)
            raise invalid_request("The uploaded file is empty.", param="file", code="empty_file")
        log.info("stored %s (%s, %d bytes, purpose %s)", record.id, filename, record.bytes, purpose)
        return record.to_api()

    def _too_large(size: int) -> APIError:
        return APIError(
            413,
            f"File is too large: {size} bytes; this server accepts files up to {settings.max_upload_bytes} bytes "
            "(server.max_upload_bytes in the config).",
            param="file",
            code="file_too_large",
        )

    @app.get("/v1/files")
    def list_files(request: Request) -> Any:
        params = request.query_params
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid_request(f"order must be 'asc' or 'desc', got {order!r}.", param="order")
        limit = query_limit(request, default=10000, maximum=10000)
        try:
            records, has_more = store.list_files(
                purpose=params.get("purpose"),
                after=params.get("after"),
                limit=limit,
                order=order,  # type: ignore[arg-type]
            )
        except CursorNotFound as exc:
            raise stale_cursor(exc, "file") from None
        return page([r.to_api() for r in records], has_more, ids=True)

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str) -> Any:
        record = store.get_file(file_id)
        if record is None:
            raise file_not_found(file_id)
        return record.to_api()

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> Any:
        record = store.get_file(file_id)
        path = store.file_path(file_id)
        if record is None or not path.is_file():
            raise file_not_found(file_id)
        return FileResponse(path, media_type="application/octet-stream", filename=record.filename)

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> Any:
        if not store.delete_file(file_id):
            raise file_not_found(file_id)
        log.info("deleted %s", file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- fine-tuning jobs --

    @app.post("/v1/fine_tuning/jobs")
    def create_job(body: Any = Depends(json_body)) -> Any:
        job = parse_create_request(
            body, store=store, base_of=catalog.base_of, available_models=catalog.available
        )
        store.create_job(job)
        log.info(
            "job %s: created -> validating_files (model %s, file %s)", job.id, job.model, job.training_file
        )
        runner.wake()
        return job.to_api()

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(request: Request) -> Any:
        limit = query_limit(request, default=20, maximum=1000)
        metadata: dict[str, str] = {}
        for key, value in request.query_params.multi_items():
            match = METADATA_QUERY.match(key)
            if match:
                metadata[match.group(1)] = value
        try:
            jobs, has_more = store.list_jobs(
                after=request.query_params.get("after"), limit=limit, metadata=metadata
            )
        except CursorNotFound as exc:
            raise stale_cursor(exc, "fine-tuning job") from None
        return page([j.to_api() for j in jobs], has_more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve_job(job_id: str) -> Any:
        job = store.get_job(job_id)
        if job is None:
            raise job_not_found(job_id)
        return job.to_api()

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str) -> Any:
        return runner.cancel(job_id).to_api()

    @app.post("/v1/fine_tuning/jobs/{job_id}/pause")
    def pause_job(job_id: str) -> Any:
        return runner.pause(job_id).to_api()

    @app.post("/v1/fine_tuning/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> Any:
        return runner.resume(job_id).to_api()

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, request: Request) -> Any:
        if store.get_job(job_id) is None:
            raise job_not_found(job_id)
        limit = query_limit(request, default=20, maximum=1000)
        try:
            events, has_more = store.list_events(job_id, after=request.query_params.get("after"), limit=limit)
        except CursorNotFound as exc:
            raise stale_cursor(exc, "event") from None
        return page([e.to_api() for e in events], has_more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, request: Request) -> Any:
        if store.get_job(job_id) is None:
            raise job_not_found(job_id)
        limit = query_limit(request, default=10, maximum=1000)
        try:
            records, has_more = store.list_checkpoints(
                job_id, after=request.query_params.get("after"), limit=limit
            )
        except CursorNotFound as exc:
            raise stale_cursor(exc, "checkpoint") from None
        return page([c.to_api() for c in records], has_more, ids=True)

    # -- models --

    @app.get("/v1/models")
    def list_models() -> Any:
        return {"object": "list", "data": catalog.listing()}

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str) -> Any:
        described = catalog.describe(model_id)
        if described is None:
            raise model_not_found(model_id)
        return described

    @app.delete("/v1/models/{model_id:path}")
    def delete_model(model_id: str) -> Any:
        if model_id in catalog.base_ids():
            raise APIError(
                403,
                f"The base model `{model_id}` cannot be deleted: only fine-tuned models and checkpoints "
                "made by this server can.",
                param="model",
                code="model_not_deletable",
            )
        deleted = store.delete_model(model_id)
        if deleted is None:
            raise model_not_found(model_id)
        catalog.forget(model_id)
        log.info("deleted model %s", model_id)
        return {"id": model_id, "object": "model", "deleted": True}

    # -- chat completions --

    @app.post("/v1/chat/completions")
    async def chat_completions(body: Any = Depends(json_body)) -> Any:
        model_id, messages, options, stream, include_usage = chat_arguments(body)
        loop = asyncio.get_running_loop()
        chat_model: Any = catalog.loaded(model_id)
        if chat_model is None:
            if await in_thread(catalog.describe, model_id) is None:
                raise model_not_found(model_id)
            chat_model = await loop.run_in_executor(generation_pool, catalog.chat_model, model_id)
        if settings.latency_ms:
            await asyncio.sleep(settings.latency_ms / 1000)
        completion_id = new_id("chatcmpl-")
        created = int(time.time())
        done = object()
        try:
            if not stream:
                generation = await chat_model.generate_async(messages, generation_pool, **options)
            else:
                # The first piece is computed before answering, so a prompt that does not fit gets a
                # 400 instead of a stream that breaks off.
                pieces: Iterator[str] = iter(chat_model.stream(messages, **options))
                first = await loop.run_in_executor(generation_pool, next, pieces, done)
        except ValueError as exc:
            from tuneline.server.modeling import ContextLengthExceeded

            if isinstance(exc, ContextLengthExceeded):
                raise invalid_request(str(exc), param="messages", code="context_length_exceeded") from None
            raise
        if not stream:
            return completion_body(
                completion_id,
                created,
                model_id,
                generation.text,
                generation.finish_reason,
                generation.prompt_tokens,
                generation.completion_tokens,
            )

        async def events() -> AsyncIterator[bytes]:
            yield sse(chunk(completion_id, created, model_id, {"role": "assistant", "content": ""}, None))
            text: list[str] = []
            piece = first
            while piece is not done:
                text.append(str(piece))
                yield sse(chunk(completion_id, created, model_id, {"content": str(piece)}, None))
                piece = await loop.run_in_executor(generation_pool, next, pieces, done)
            prompt_tokens, completion_tokens = await loop.run_in_executor(
                generation_pool, chat_model.count_tokens, messages, "".join(text)
            )
            limit = options.get("max_tokens")
            finish = "length" if limit is not None and completion_tokens >= limit else "stop"
            yield sse(chunk(completion_id, created, model_id, {}, finish))
            if include_usage:
                final = chunk(completion_id, created, model_id, {}, None)
                final["choices"] = []
                final["usage"] = usage(prompt_tokens, completion_tokens)
                yield sse(final)
            yield sse("[DONE]")

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    return app


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def run_server(settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM; jobs still running then resume at the next start."""
    import uvicorn

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
