"""POST /v1/chat/completions: chat messages in; an assistant message, or its chunks, out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.types import GenerateRequest
from .generation import generate
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    FinishReason,
    Usage,
    new_id,
    now,
)

if TYPE_CHECKING:
    from .gateway import GatewayCore


def engine_messages(request: ChatCompletionRequest) -> list[dict]:
    """The messages as the variant's chat template takes them."""
    # "developer" is OpenAI's newer name for the system role.
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in request.messages
    ]


class ChatChunks:
    """One streamed answer: a role chunk, content deltas, an empty delta with the finish reason,
    and the usage chunk when asked for."""

    def __init__(self, model: str) -> None:
        self.id = new_id("chatcmpl")
        self.created = now()
        self.model = model

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self) -> list[ChatCompletionChunk]:
        return [self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def text(self, text: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text))])

    def finish(self, reason: FinishReason) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=reason)])

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)


class ChatEndpoint:
    label = "chat"
    request_model = ChatCompletionRequest

    def engine_request(self, request: ChatCompletionRequest) -> GenerateRequest:
        return GenerateRequest(
            request_id=new_id("req"),
            messages=engine_messages(request),
            sampling=request.sampling(),
        )

    def response(
        self, model: str, text: str, finish_reason: FinishReason, usage: Usage
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=new_id("chatcmpl"),
            created=now(),
            model=model,
            usage=usage,
            choices=[
                ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
            ],
        )

    def chunks(self, model: str) -> ChatChunks:
        return ChatChunks(model)


def chat_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()
    endpoint = ChatEndpoint()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(core, endpoint, await request.body(), request.headers)

    return router
