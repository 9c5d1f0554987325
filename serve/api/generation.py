"""The request flow both generation endpoints share: validate, route, open the choices on the
variant, answer whole or streamed, and count the request whatever its outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from .choices import Choice, collect, open_choices
from .clock import RequestClock
from .errors import OpenAIError, error_response, validate_body
from .protocol import GenerationRequest
from .streaming import StreamChunks, sse_stream

if TYPE_CHECKING:
    from .gateway import GatewayCore

RequestT = TypeVar("RequestT", bound=GenerationRequest)


class GenerationEndpoint(Protocol[RequestT]):
    """What /v1/completions and /v1/chat/completions do differently."""

    label: str  # the endpoint label of the request counter
    request_model: type[RequestT]

    def choices(self, request: RequestT) -> list[Choice]: ...

    def response(self, model: str, request: RequestT, choices: list[Choice]) -> BaseModel: ...

    def chunks(self, model: str, request: RequestT) -> StreamChunks: ...


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
    choices = endpoint.choices(request)
    await open_choices(choices, core.backends[clock.variant], clock)
    headers = {core.variant_header: clock.variant}
    model = f"{core.config.public_model_name}:{clock.variant}"
    if request.stream:
        chunks = endpoint.chunks(model, request)
        stream = sse_stream(choices, chunks, request, clock)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    await collect(choices, clock)
    body = endpoint.response(model, request, choices)
    clock.finish("200", choices[0].request)
    return JSONResponse(body.model_dump(), headers=headers)
