"""Errors the server answers with, in the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.

The `openai` SDK maps the HTTP status to its exception class (400 BadRequestError, 401, 403, 404,
409, 413, 429 RateLimitError, >=500 InternalServerError) and shows `message`, so each message names
what was wrong and how to fix it, in the wording the hosted service uses where it has one.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from tuneline.server.protocol import ErrorObject, ErrorResponse, error_of


class APIError(Exception):
    """An error answered to the client; `status` is the HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def response(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorObject(message=self.message, type=self.type, param=self.param, code=self.code)
        )

    def body(self) -> dict[str, Any]:
        return self.response().model_dump()


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A request that failed its protocol model's validation, as the 400 the client sees."""
    model = exc.title if isinstance(exc, ValidationError) else None
    error = error_of(exc.errors(), model).error
    return APIError(400, error.message, type=error.type, param=error.param, code=error.code)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def file_too_large(size: int, limit: int, partial: bool = False) -> APIError:
    """An upload over server.max_upload_bytes (`partial`: `size` is what was read before refusing)."""
    return APIError(
        413,
        f"File is too large: {'more than ' if partial else ''}{size} bytes; this server accepts files up to "
        f"{limit} bytes (server.max_upload_bytes in the config).",
        param="file",
        code="file_too_large",
    )


def request_too_large(size: int, limit: int, partial: bool = False) -> APIError:
    """A JSON body over server.max_request_bytes (`partial`: `size` is what was read before refusing)."""
    return APIError(
        413,
        f"The request body is too large: {'more than ' if partial else ''}{size} bytes; this server accepts "
        f"JSON bodies up to {limit} bytes (server.max_request_bytes in the config).",
        code="request_too_large",
    )


def file_not_found(file_id: str, param: str = "id") -> APIError:
    return APIError(404, f"No such File object: {file_id}", param=param, code="file_not_found")


def job_not_found(job_id: str) -> APIError:
    return APIError(
        404, f"Could not find fine tune: {job_id}", param="fine_tune_id", code="fine_tune_not_found"
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def missing_api_key() -> APIError:
    return APIError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header "
        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY): the key is the value of "
        "TUNELINE_API_KEY where the server runs.",
        code="missing_api_key",
    )


def invalid_api_key() -> APIError:
    # Never echo the key back: not even a masked form of it.
    return APIError(
        401,
        "Incorrect API key provided. Use the value of TUNELINE_API_KEY that the server was started with.",
        code="invalid_api_key",
    )


def injected_fault(status: int, retry_after_s: float) -> APIError:
    """A fault answered on purpose (`--fault-rate`), so that clients can test their retry logic."""
    kinds = {
        429: (
            "Rate limit reached for requests (injected by --fault-rate).",
            "requests",
            "rate_limit_exceeded",
        ),
        500: (
            "The server had an error while processing your request (injected by --fault-rate).",
            "server_error",
            None,
        ),
        503: ("The server is overloaded or not ready yet (injected by --fault-rate).", "server_error", None),
    }
    message, type_, code = kinds[status]
    seconds = max(retry_after_s, 0.0)
    return APIError(
        status,
        message,
        type=type_,
        code=code,
        headers={"retry-after": str(max(1, round(seconds))), "retry-after-ms": str(round(seconds * 1000))},
    )
