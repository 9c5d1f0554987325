"""The request flow both generation endpoints share: validate, route, open the choices on the
variant, answer whole or streamed, and count the request whatever its outcome."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from .choices import Choice, collect, open_choices
from .clock import RequestClock
from .errors import OpenAIError, error_response, validate_body
from .failures import is_unavailable, would_wait
from .protocol import GenerationRequest
from .streaming import SSEResponse, StreamChunks, sse_stream

if TYPE_CHECKING:
    from .gateway import GatewayCore

log = logging.getLogger(__name__)

RequestT = TypeVar("RequestT", bound=GenerationRequest)

QUEUE_TIMEOUT_HEADER = "x-slimserve-queue-timeout"
MAX_QUEUE_TIMEOUT_S = 3600.0
MAX_SAME_VARIANT_RETRIES = 1  # a lost replica's request, on another replica of its variant


class GenerationEndpoint(Protocol[RequestT]):
    """What /v1/completions and /v1/chat/completions do differently."""

    label: str  # the endpoint label of the request counter
    request_model: type[RequestT]

    def choices(self, request: RequestT) -> list[Choice]: ...

    def response(self, model: str, request: RequestT, choices: list[Choice]) -> BaseModel: ...

    def chunks(self, model: str, request: RequestT) -> StreamChunks: ...


def queue_timeout(core: GatewayCore, headers: Mapping[str, str]) -> float:
    """Seconds a request may wait to start: the caller's header, else the server's."""
    raw = headers.get(QUEUE_TIMEOUT_HEADER)
    if raw is None:
        return core.config.server.queue_timeout_seconds
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_QUEUE_TIMEOUT_S:
        raise OpenAIError.of(
            400,
            f"header {QUEUE_TIMEOUT_HEADER} must be seconds in (0, {MAX_QUEUE_TIMEOUT_S}], "
            f"got {raw!r}",
            param=QUEUE_TIMEOUT_HEADER,
        )
    return seconds


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
        timeout = queue_timeout(core, headers)
        tried: set[str] = set()
        attempts_left = len(core.config.variants) + MAX_SAME_VARIANT_RETRIES
        while True:
            variant = core.choose(request.model, headers, frozenset(tried))
            clock = RequestClock(core, variant, endpoint.label)
            try:
                return await _answer(core, endpoint, request, clock, timeout)
            except OpenAIError as error:
                if not is_unavailable(error.info) or attempts_left == 0:
                    raise
                attempts_left -= 1
                down = await core.replica_lost(variant, error.info.message)
                if down and core.router.pinned_variant(request.model) is not None:
                    raise
                # Nothing was sent yet: the request goes to another replica of the variant
                # when one is left, else to another variant that is up.
                log.warning("retrying a request that variant %s lost", variant)
                clock.finish(str(error.info.status))
                clock = None
                if down:
                    tried.add(variant)
    except OpenAIError as error:
        status = str(error.info.status)
        if clock is not None:
            clock.finish(status)
        else:
            core.metrics.requests.labels(variant, endpoint.label, status).inc()
        extra = {core.variant_header: variant} if variant != "none" else {}
        if error.info.status in (429, 503):
            extra["Retry-After"] = str(core.config.server.retry_after_seconds)
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
    timeout: float,
) -> Response:
    choices = endpoint.choices(request)
    admission = core.admission[clock.variant]
    wait = admission.expected_wait()
    if wait is not None and wait > timeout:  # it would be dropped at its deadline anyway
        raise OpenAIError(would_wait(clock.variant, wait, timeout))
    admission.arrived()
    try:
        await open_choices(choices, core.backends[clock.variant], clock, timeout)
    except BaseException:
        admission.left()
        raise
    admission.started()
    headers = {core.variant_header: clock.variant}
    model = f"{core.config.public_model_name}:{clock.variant}"
    if request.stream:
        chunks = endpoint.chunks(model, request)
        stream = sse_stream(choices, chunks, request, clock)
        return SSEResponse(stream, media_type="text/event-stream", headers=headers)
    await collect(choices, clock)
    body = endpoint.response(model, request, choices)
    clock.finish("200", choices[0].request)
    return JSONResponse(body.model_dump(), headers=headers)
