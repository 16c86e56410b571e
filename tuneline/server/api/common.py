"""What every router shares: reading a JSON body into a request model, query parameters into a query
model, and sending a response model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request, Response
from pydantic import BaseModel

from tuneline.server.errors import invalid_request
from tuneline.server.protocol import ResponseBody, wire

RequestModel = TypeVar("RequestModel", bound=BaseModel)


def respond(body: ResponseBody, status: int = 200) -> Response:
    """A response model as the JSON answer (FastAPI neither re-validates nor re-encodes it)."""
    return Response(wire(body), status_code=status, media_type="application/json")


def decode_json(raw: bytes) -> Any:
    """A request body as JSON, or the 400 that says why it is not."""
    if not raw.strip():
        raise invalid_request("The request body is empty: send a JSON object.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid_request(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None


def json_body(model: type[RequestModel]) -> Callable[[Request], Awaitable[RequestModel]]:
    """A FastAPI dependency: the request's JSON body validated as `model` (a pydantic
    ValidationError goes to the app's one validation-error handler)."""

    async def parse(request: Request) -> RequestModel:
        return model.model_validate(decode_json(await request.body()))

    return parse


def query(model: type[RequestModel]) -> Callable[[Request], RequestModel]:
    """A FastAPI dependency: the query parameters validated as `model`."""

    def parse(request: Request) -> RequestModel:
        return model.model_validate(dict(request.query_params))

    return parse
