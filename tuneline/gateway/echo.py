"""A small OpenAI-compatible upstream that answers at once with a canned completion.

For tests, the gateway benchmark and demos: a real HTTP server (FastAPI on uvicorn) whose answer is
known, so that what is measured or checked is the gateway. `POST /v1/chat/completions` answers
`answer` (default: `echo: <last user message>`) after `latency_ms`, streamed when asked, with token usage
counted in words; `fail_status` makes every chat request fail with that status (a down upstream).
`GET /v1/models` lists any model. Run it with `python -m tuneline.gateway.echo --port N [--latency-ms M]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse


class EchoState:
    def __init__(self, latency_ms: float = 0.0, answer: str | None = None) -> None:
        self.latency_ms = latency_ms
        self.answer = answer
        self.fail_status: int | None = None
        self.requests = 0
        self.models_seen: list[str] = []
        self._ids = itertools.count(1)


def create_echo_app(state: EchoState | None = None) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    state = state or EchoState()
    app.state.echo = state

    @app.get("/v1/models")
    async def models() -> Response:
        return Response(b'{"object":"list","data":[]}', media_type="application/json")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        state.requests += 1
        body: dict[str, Any] = orjson.loads(await request.body())
        model = str(body.get("model"))
        if len(state.models_seen) < 10_000:
            state.models_seen.append(model)
        if state.fail_status is not None:
            error = {
                "error": {
                    "message": "upstream down (echo fail_status)",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
            return Response(orjson.dumps(error), state.fail_status, media_type="application/json")
        if state.latency_ms:
            await asyncio.sleep(state.latency_ms / 1000)
        last = ""
        for message in reversed(body.get("messages") or []):
            if isinstance(message, dict) and message.get("role") == "user":
                last = str(message.get("content"))
                break
        text = state.answer if state.answer is not None else f"echo: {last}"
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages") or [])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(text.split()),
            "total_tokens": prompt_tokens + len(text.split()),
        }
        ident = f"chatcmpl-echo{next(state._ids)}"
        created = int(time.time())
        if body.get("stream"):

            def chunks() -> Any:
                for i, word in enumerate(text.split(" ")):
                    piece = word if i == 0 else " " + word
                    chunk = {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                    }
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                final = {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": usage,
                }
                yield b"data: " + orjson.dumps(final) + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream")
        answer = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        return Response(orjson.dumps(answer), media_type="application/json")

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    app = create_echo_app(EchoState(latency_ms=args.latency_ms))
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
