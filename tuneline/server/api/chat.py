"""/v1/chat/completions: a whole answer, or a stream of server-sent events."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from tuneline.server.api.common import json_body, respond
from tuneline.server.protocol import CreateChatCompletionRequest, ResponseBody
from tuneline.server.services.chat import ChatService

router = APIRouter(prefix="/v1/chat")


def service(request: Request) -> ChatService:
    return request.app.state.chat  # type: ignore[no-any-return]


@router.post("/completions")
async def chat_completions(
    body: CreateChatCompletionRequest = Depends(json_body(CreateChatCompletionRequest)),
    chat: ChatService = Depends(service),
) -> Response:
    answer = await chat.complete(body)
    if isinstance(answer, ResponseBody):
        return respond(answer)
    return StreamingResponse(answer, media_type="text/event-stream", headers={"cache-control": "no-cache"})
