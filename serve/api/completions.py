"""POST /v1/completions: a prompt in; its continuation, or the continuation's chunks, out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.types import GenerateRequest
from .generation import generate
from .protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    Usage,
    new_id,
    now,
)

if TYPE_CHECKING:
    from .gateway import GatewayCore


def prompt_text(request: CompletionRequest) -> str:
    # The request model admits a list only when it holds exactly one prompt.
    return request.prompt if isinstance(request.prompt, str) else request.prompt[0]


class CompletionChunks:
    """One streamed answer: text chunks, an empty one with the finish reason, and the usage
    chunk when asked for. Each chunk is a `text_completion` object, as OpenAI streams them."""

    def __init__(self, model: str) -> None:
        self.id = new_id("cmpl")
        self.created = now()
        self.model = model

    def _chunk(
        self, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self) -> list[CompletionResponse]:
        return []

    def text(self, text: str) -> CompletionResponse:
        return self._chunk([CompletionChoice(text=text, finish_reason=None)])

    def finish(self, reason: FinishReason) -> CompletionResponse:
        return self._chunk([CompletionChoice(text="", finish_reason=reason)])

    def usage(self, usage: Usage) -> CompletionResponse:
        return self._chunk([], usage)


class CompletionEndpoint:
    label = "completion"
    request_model = CompletionRequest

    def engine_request(self, request: CompletionRequest) -> GenerateRequest:
        return GenerateRequest(
            request_id=new_id("req"), prompt=prompt_text(request), sampling=request.sampling()
        )

    def response(
        self, model: str, text: str, finish_reason: FinishReason, usage: Usage
    ) -> CompletionResponse:
        return CompletionResponse(
            id=new_id("cmpl"),
            created=now(),
            model=model,
            usage=usage,
            choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
        )

    def chunks(self, model: str) -> CompletionChunks:
        return CompletionChunks(model)


def completions_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()
    endpoint = CompletionEndpoint()

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(core, endpoint, await request.body(), request.headers)

    return router
