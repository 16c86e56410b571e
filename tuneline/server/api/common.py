"""What every router shares: reading a JSON body into a request model, query parameters into a query
model, and sending a response model."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request, Response
from pydantic import BaseModel

from tuneline.formats import MAX_JSON_DEPTH, json_depth_exceeds
from tuneline.server.errors import invalid_request
from tuneline.server.protocol import ResponseBody, wire

RequestModel = TypeVar("RequestModel", bound=BaseModel)


def respond(body: ResponseBody, status: int = 200) -> Response:
    """A response model as the JSON answer (FastAPI neither re-validates nor re-encodes it)."""
    return Response(wire(body), status_code=status, media_type="application/json")


def decode_json(raw: bytes) -> Any:
    """A request body as JSON, or the 400 that says why it is not: empty, not UTF-8 JSON, or nested
    deeper than MAX_JSON_DEPTH levels (no request of this API needs more; deeper bodies only cost)."""
    if not raw.strip():
        raise invalid_request("The request body is empty: send a JSON object.")
    too_deep = invalid_request(
        f"The JSON body of your request nests deeper than {MAX_JSON_DEPTH} levels.", code="json_too_deep"
    )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in exc.msg:
            raise too_deep from None
        raise invalid_request(
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise too_deep
    return body


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
