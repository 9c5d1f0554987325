"""The request flow both generation endpoints share: validate, route, call the variant, answer
whole or streamed, and count the request whatever its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..engine.types import EngineEvent, GenerateRequest
from .clock import RequestClock
from .errors import OpenAIError, error_response, validate_body
from .protocol import FinishReason, GenerationRequest, Usage
from .streaming import StreamChunks, sse_stream

if TYPE_CHECKING:
    from .gateway import GatewayCore

RequestT = TypeVar("RequestT", bound=GenerationRequest)


class GenerationEndpoint(Protocol[RequestT]):
    """What /v1/completions and /v1/chat/completions do differently."""

    label: str  # the endpoint label of the request counter
    request_model: type[RequestT]

    def engine_request(self, request: RequestT) -> GenerateRequest: ...

    def response(
        self, model: str, text: str, finish_reason: FinishReason, usage: Usage
    ) -> BaseModel: ...

    def chunks(self, model: str) -> StreamChunks: ...


async def generate(
    core: GatewayCore,
    endpoint: GenerationEndpoint[RequestT],
    raw: bytes,
    headers: Mapping[str, str],
) -> Response:
    variant = "none"
    clock: RequestClock | None = None
    try:
        request = validate_body(raw, endpoint.request_model)
        variant = core.choose(request.model, headers)
        clock = RequestClock(core, variant, endpoint.label)
        return await _answer(core, endpoint, request, clock)
    except OpenAIError as error:
        status = str(error.info.status)
        if clock is not None:
            clock.finish(status)
        else:
            core.metrics.requests.labels(variant, endpoint.label, status).inc()
        extra = {core.variant_header: variant} if variant != "none" else None
        return error_response(error.info, headers=extra)
    except asyncio.CancelledError:
        if clock is not None:
            clock.finish("499")
        raise
    except Exception:
        if clock is not None:
            clock.finish("500")
        raise


async def _answer(
    core: GatewayCore,
    endpoint: GenerationEndpoint[RequestT],
    request: RequestT,
    clock: RequestClock,
) -> Response:
    engine_request = endpoint.engine_request(request)
    events = core.backends[clock.variant].generate(engine_request)
    first = await anext(events)
    if first.kind == "error":
        await events.aclose()
        raise OpenAIError(first.error)
    clock.accepted(first)
    headers = {core.variant_header: clock.variant}
    model = f"{core.config.public_model_name}:{clock.variant}"
    if request.stream:
        chunks = endpoint.chunks(model)
        stream = sse_stream(events, chunks, request.include_usage, clock, engine_request)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    text, final = await _collect(events, clock)
    usage = Usage.of(final.prompt_tokens, final.completion_tokens)
    body = endpoint.response(model, text, final.finish_reason, usage)
    clock.finish("200", engine_request)
    return JSONResponse(body.model_dump(), headers=headers)


async def _collect(
    events: AsyncGenerator[EngineEvent, None], clock: RequestClock
) -> tuple[str, EngineEvent]:
    """The whole text and the closing `done` event."""
    parts: list[str] = []
    try:
        async for event in events:
            if event.kind == "delta":
                clock.tokens(event.tokens, event.text)
                parts.append(event.text)
            elif event.kind == "error":
                raise OpenAIError(event.error)
            elif event.kind == "done":
                clock.done(event)
                return "".join(parts), event
    finally:
        await events.aclose()
    raise OpenAIError.of(500, "the variant ended the stream without finishing")
