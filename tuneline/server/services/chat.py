"""/v1/chat/completions: answers from a base or fine-tuned model, whole or streamed.

A model's concurrent requests are decoded as one batch (tuneline/server/modeling.py BatchedDecoder); a
plain answer is awaited without a thread of its own. A streamed answer computes its first piece before
the stream starts, so a prompt that does not fit gets a 400 instead of a stream that breaks off.

- `n` > 1: the choices are rows of the same batch; with a `seed`, choice i samples with seed + i (so
  choice 0 is the answer the same request with n = 1 gets). Usage counts the prompt once and the
  tokens of every choice.
- `logprobs` / `top_logprobs`: each answer token's logprob under the model's own distribution (before
  temperature and top_p, as the hosted service reports them) and the likeliest alternatives.
- `response_format: {type: json_object}`: a choice is answered only when its text parses as a JSON
  object. This server has no grammar-constrained decoder, so a choice that does not parse is sampled
  again, up to JSON_ATTEMPTS times in all (a greedy request's retries sample at RETRY_TEMPERATURE, as
  greedy decoding would repeat itself); when none parses the request fails with 422
  `json_output_invalid` in OpenAI's error shape. 422, not 5xx: the server worked, and sending the same
  request again (which the SDK does by itself for a 5xx) mostly repeats what this model cannot do;
  the message says what to change (train on JSON answers, raise max_tokens, or drop the format).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from typing import Any

from tuneline.formats import message_text
from tuneline.server.errors import APIError, invalid_request, model_not_found
from tuneline.server.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    CompletionUsage,
    CreateChatCompletionRequest,
    CreateChatCompletionResponse,
    CreateChatCompletionStreamResponse,
    wire,
)
from tuneline.server.services.models import ModelService
from tuneline.server.settings import ServerSettings
from tuneline.server.store import new_id, now

JSON_ATTEMPTS = 4
RETRY_TEMPERATURE = 0.7


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def json_object_text(text: str) -> str | None:
    """The answer without surrounding whitespace when it parses as one JSON object, else None."""
    stripped = text.strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return stripped if isinstance(value, dict) else None


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
        if request.stream and (request.logprobs or request.choices > 1):
            return await self._streamed_choices(
                chat_model, messages, options, request, completion_id, created
            )
        try:
            if not request.stream:
                generations = await asyncio.gather(
                    *(
                        self._choice(chat_model, messages, options, request, index)
                        for index in range(request.choices)
                    )
                )
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
                        index=index,
                        message=ChatCompletionMessage(content=generation.text),
                        logprobs=None
                        if generation.logprobs is None
                        else ChoiceLogprobs(
                            content=[ChatCompletionTokenLogprob(**entry) for entry in generation.logprobs]
                        ),
                        finish_reason=generation.finish_reason,
                    )
                    for index, generation in enumerate(generations)
                ],
                usage=CompletionUsage.of(
                    generations[0].prompt_tokens, sum(g.completion_tokens for g in generations)
                ),
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

    async def _streamed_choices(
        self,
        chat_model: Any,
        messages: list[dict[str, Any]],
        options: dict[str, Any],
        request: CreateChatCompletionRequest,
        completion_id: str,
        created: int,
    ) -> AsyncIterator[bytes]:
        """The stream of `n` choices (chunks of different choices interleave, each with its index), each
        delta with the logprobs of the tokens it adds when asked. Each choice's first delta is computed
        before the stream starts (a prompt that does not fit is a 400, not a broken stream)."""
        loop = asyncio.get_running_loop()
        done = object()
        streams = [
            chat_model.scored_stream(
                messages, top_logprobs=request.top_logprob_count, **self._settings(options, request, index, 0)
            )
            for index in range(request.choices)
        ]
        try:
            firsts = [await loop.run_in_executor(self.pool, next, pairs, done) for pairs, _ in streams]
        except ValueError as exc:
            from tuneline.server.modeling import ContextLengthExceeded

            if isinstance(exc, ContextLengthExceeded):
                raise invalid_request(str(exc), param="messages", code="context_length_exceeded") from None
            raise

        def chunk(index: int, delta: ChatCompletionDelta, finish: Any, entries: Any = None) -> bytes:
            logprobs = (
                ChoiceLogprobs(content=[ChatCompletionTokenLogprob(**e) for e in entries])
                if entries is not None
                else None
            )
            choice = ChatCompletionChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish
            )
            body = CreateChatCompletionStreamResponse(
                id=completion_id, created=created, model=request.model, choices=[choice]
            )
            return sse(wire(body))

        async def events() -> AsyncIterator[bytes]:
            queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

            async def pump(index: int) -> None:
                pairs, _ = streams[index]
                item = firsts[index]
                while item is not done:
                    await queue.put((index, item))
                    item = await loop.run_in_executor(self.pool, next, pairs, done)
                await queue.put((index, done))

            tasks = [asyncio.create_task(pump(index)) for index in range(len(streams))]
            try:
                for index in range(len(streams)):
                    yield chunk(index, ChatCompletionDelta(role="assistant", content=""), None)
                left = len(streams)
                while left:
                    index, item = await queue.get()
                    if item is done:
                        left -= 1
                        yield chunk(index, ChatCompletionDelta(), streams[index][1].finish_reason)
                        continue
                    piece, entries = item
                    yield chunk(index, ChatCompletionDelta(content=piece), None, entries)
                for task in tasks:
                    await task  # re-raises a failure of the model
                if request.include_usage:
                    results = [result for _, result in streams]
                    final = CreateChatCompletionStreamResponse(
                        id=completion_id,
                        created=created,
                        model=request.model,
                        choices=[],
                        usage=CompletionUsage.of(
                            results[0].prompt_tokens, sum(r.completion_tokens for r in results)
                        ),
                    )
                    yield sse(wire(final))
                yield sse(b"[DONE]")
            finally:
                for task in tasks:
                    task.cancel()

        return events()

    @staticmethod
    def _settings(
        options: dict[str, Any], request: CreateChatCompletionRequest, index: int, attempt: int
    ) -> dict[str, Any]:
        """The sampling settings of choice `index`, attempt `attempt`: its own seed when the request
        has one (seed + index for the first attempt), a sampled retry of a greedy request."""
        settings = dict(options)
        if "seed" in settings:
            settings["seed"] = settings["seed"] + index + attempt * request.choices
        if attempt and settings.get("temperature", 1.0) <= 0:
            settings["temperature"] = RETRY_TEMPERATURE
        return settings

    async def _choice(
        self,
        chat_model: Any,
        messages: list[dict[str, Any]],
        options: dict[str, Any],
        request: CreateChatCompletionRequest,
        index: int,
    ) -> Any:
        """Choice `index` of a request (its own seed when the request has one); with json_object, the
        first of up to JSON_ATTEMPTS samples that parses as a JSON object, else a 422."""
        attempts = JSON_ATTEMPTS if request.response_format == "json_object" else 1
        for attempt in range(attempts):
            settings = self._settings(options, request, index, attempt)
            generation = await chat_model.generate_async(
                messages, self.pool, top_logprobs=request.top_logprob_count, **settings
            )
            if attempts == 1:
                return generation
            text = json_object_text(generation.text)
            if text is not None:
                generation.text = text
                return generation
        cut = (
            " (its last answer was cut off by max_tokens: raise max_tokens)"
            if generation.finish_reason == ("length")
            else ""
        )
        raise APIError(
            422,
            f"The model `{request.model}` did not answer with a valid JSON object in {attempts} attempts{cut}. "
            "Fine-tune it on answers that are JSON objects, or send the request without response_format "
            "json_object.",
            param="response_format",
            code="json_output_invalid",
        )
