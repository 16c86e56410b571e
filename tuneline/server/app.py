"""The OpenAI-compatible HTTP API of `tuneline serve`: files, fine_tuning/jobs, models, chat/completions.

`create_app` wires one state directory's store, the job scheduler, the services
(tuneline/server/services/) and the routers (tuneline/server/api/), behind the gatekeeper
(tuneline/server/middleware.py). Shapes follow the OpenAPI contract (tuneline/server/protocol.py);
every error is `{"error": {message, type, param, code}}`. Every request under /v1 needs
`Authorization: Bearer <TUNELINE_API_KEY>` when a key is configured; without one (allowed on loopback
only) any key is accepted and a warning is logged at start. One log line per request (method, path,
status, time; never the key) and per job transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneline.server.api import ROUTERS
from tuneline.server.api.common import respond
from tuneline.server.errors import APIError, validation_error
from tuneline.server.logs import printable
from tuneline.server.middleware import Gatekeeper
from tuneline.server.scheduler import JobRunner
from tuneline.server.services.chat import ChatService
from tuneline.server.services.files import FileService
from tuneline.server.services.graders import GraderService
from tuneline.server.services.jobs import JobService
from tuneline.server.services.models import ModelService
from tuneline.server.settings import ServerSettings
from tuneline.server.state_lock import EMBEDDED_ENV, StateDirLock
from tuneline.server.store import Store

log = logging.getLogger("tuneline.server")


def _error_response(exc: APIError) -> Response:
    response = respond(exc.response(), exc.status)
    response.headers.update(exc.headers)
    return response


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app over one state directory. Its lifespan starts and stops the job scheduler."""
    store = Store(settings.state_dir)
    runner = JobRunner(store, settings)
    models = ModelService(store, settings)
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
        await asyncio.to_thread(models.base_ids)
        runner.start()
        if settings.warm_up:
            threading.Thread(target=models.warm_up, name="warm-up", daemon=True).start()
        log.info(
            "serving %s on http://%s:%d/v1 (state %s, %d concurrent job(s), fault rate %g, latency %g ms)",
            ", ".join(models.base_ids()),
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
    app.state.models = models
    app.state.files = FileService(store, settings)
    app.state.jobs = JobService(store, runner, models)
    app.state.chat = ChatService(models, settings, generation_pool)
    app.state.graders = GraderService.for_server(settings)
    for router in ROUTERS:
        app.include_router(router)
    if settings.allowed_origins:  # CORS answers for the pages allowed to call this server
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(Gatekeeper, settings=settings)  # added last: the outermost layer

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(ValidationError)
    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: ValidationError | RequestValidationError) -> Response:
        return _error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405):
            return _error_response(
                APIError(exc.status_code, f"Invalid URL ({request.method} {request.url.path})")
            )
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, printable(request.url.path), exc_info=exc)
        return _error_response(
            APIError(500, "The server had an error while processing your request.", type="server_error")
        )

    return app


def run_server(settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM; jobs still running then resume at the next start.

    Holds the state directory for as long as it runs (tuneline/server/state_lock.py): raises
    StateDirBusy, before touching anything, when another server holds it."""
    import uvicorn

    lock = StateDirLock(settings.state_dir)
    lock.acquire(port=settings.port, embedded=os.environ.get(EMBEDDED_ENV) == "1")
    try:
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
    finally:
        lock.release()
