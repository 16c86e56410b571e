"""/v1/chat/completions: one answer from a base or fine-tuned model, whole or streamed.

A model's concurrent requests are decoded as one batch (tuneline/server/modeling.py BatchedDecoder); a
plain answer is awaited without a thread of its own. A streamed answer computes its first piece before
the stream starts, so a prompt that does not fit gets a 400 instead of a stream that breaks off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from typing import Any

from tuneline.formats import message_text
from tuneline.server.errors import invalid_request, model_not_found
from tuneline.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionMessage,
    CompletionUsage,
    CreateChatCompletionRequest,
    CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse,
    wire,
)
from tuneline.server.services.models import ModelService
from tuneline.server.settings import ServerSettings
from tuneline.server.store import new_id, now


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class ChatService:
    def __init__(self, models: ModelService, settings: ServerSettings, pool: Executor) -> None:
        self.models = models
        self.settings = settings
        self.pool = pool

    async def complete(
        self, request: CreateChatCompletionRequest
    ) -> CreateChatCompletionResponse | AsyncIterator[bytes]:
        """The whole answer, or (stream: true) the server-sent events of a streamed one."""
        loop = asyncio.get_running_loop()
        model_id = request.model
        chat_model: Any = self.models.loaded(model_id)
        if chat_model is None:
            if await loop.run_in_executor(None, self.models.describe, model_id) is None:
                raise model_not_found(model_id)
            chat_model = await loop.run_in_executor(self.pool, self.models.chat_model, model_id)
        if self.settings.latency_ms:
            await asyncio.sleep(self.settings.latency_ms / 1000)
        messages = [
            {"role": m.role, "content": message_text({"content": m.content})} for m in request.messages
        ]
        options: dict[str, Any] = {
            name: value
            for name, value in (
                ("temperature", request.temperature),
                ("top_p", request.top_p),
                ("max_tokens", request.token_limit),
                ("stop", request.stop),
                ("seed", request.seed),
            )
            if value is not None
        }
        completion_id = new_id("chatcmpl-")
        created = now()
        done = object()
        try:
            if not request.stream:
                generation = await chat_model.generate_async(messages, self.pool, **options)
            else:
                pieces: Iterator[str] = iter(chat_model.stream(messages, **options))
                first = await loop.run_in_executor(self.pool, next, pieces, done)
        except ValueError as exc:
            from tuneline.server.modeling import ContextLengthExceeded  # loaded with the model already

            if isinstance(exc, ContextLengthExceeded):
                raise invalid_request(str(exc), param="messages", code="context_length_exceeded") from None
            raise
        if not request.stream:
            return CreateChatCompletionResponse(
                id=completion_id,
                created=created,
                model=model_id,
                choices=[
                    ChatCompletionChoice(
                        message=ChatCompletionMessage(content=generation.text),
                        finish_reason=generation.finish_reason,
                    )
                ],
                usage=CompletionUsage.of(generation.prompt_tokens, generation.completion_tokens),
            )

        def chunk(delta: ChatCompletionDelta, finish: str | None) -> CreateChatCompletionStreamResponse:
            return CreateChatCompletionStreamResponse(
                id=completion_id,
                created=created,
                model=model_id,
                choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
            )

        async def events() -> AsyncIterator[bytes]:
            yield sse(wire(chunk(ChatCompletionDelta(role="assistant", content=""), None)))
            text: list[str] = []
            piece = first
            while piece is not done:
                text.append(str(piece))
                yield sse(wire(chunk(ChatCompletionDelta(content=str(piece)), None)))
                piece = await loop.run_in_executor(self.pool, next, pieces, done)
            prompt_tokens, completion_tokens = await loop.run_in_executor(
                self.pool, chat_model.count_tokens, messages, "".join(text)
            )
            limit = options.get("max_tokens")
            finish = "length" if limit is not None and completion_tokens >= limit else "stop"
            yield sse(wire(chunk(ChatCompletionDelta(), finish)))
            if request.include_usage:
                final = CreateChatCompletionStreamResponse(
                    id=completion_id,
                    created=created,
                    model=model_id,
                    choices=[],
                    usage=CompletionUsage.of(prompt_tokens, completion_tokens),
                )
                yield sse(wire(final))
            yield sse(b"[DONE]")

        return events()
