"""Server-sent events for both generation endpoints: the choices' events as OpenAI chunks, an
error event if the variant fails midway, the usage when asked, and `[DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from ..engine.limits import server_error
from ..engine.types import EngineEvent
from .choices import Choice, close_choices, merged_events, track, usage
from .clock import RequestClock
from .errors import error_payload
from .failures import is_unavailable
from .protocol import ChatCompletionChunk, CompletionResponse, GenerationRequest, Usage

log = logging.getLogger(__name__)

Chunk = ChatCompletionChunk | CompletionResponse


class StreamChunks(Protocol):
    """The chunks of one streamed answer, in its endpoint's shape."""

    def opening(self, choices: list[Choice]) -> list[Chunk]: ...

    def event(self, choice: Choice, event: EngineEvent) -> list[Chunk]:
        """The chunks for a prompt or delta event (already recorded on its choice)."""
        ...

    def finish(self, choice: Choice) -> list[Chunk]: ...

    def usage(self, usage: Usage) -> Chunk: ...


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chunk_event(chunk: Chunk) -> str:
    # Only chunks that carry usage have a `usage` key.
    return _event(chunk.model_dump(exclude={"usage"} if chunk.usage is None else None))


async def sse_stream(
    choices: list[Choice],
    chunks: StreamChunks,
    request: GenerationRequest,
    clock: RequestClock,
) -> AsyncIterator[str]:
    status = "499"  # until the stream completes, the caller is the one who left
    try:
        for chunk in chunks.opening(choices):
            yield _chunk_event(chunk)
        failure = None
        try:
            async for choice, event in merged_events(choices):
                if event.kind == "error":
                    failure = event.error
                    break
                track(clock, choice, event)
                out = chunks.finish(choice) if event.kind == "done" else chunks.event(choice, event)
                for chunk in out:
                    if request.continuous_usage:
                        chunk.usage = usage(choices)
                    yield _chunk_event(chunk)
        except Exception as error:  # whatever broke, the caller gets a word, not a cut stream
            log.exception("variant %s stream failed", clock.variant)
            failure = server_error(f"the variant's stream failed: {type(error).__name__}")
        if failure is not None and is_unavailable(failure):
            clock.core.replica_lost_later(clock.variant, failure.message)
        if failure is None and any(c.finish_reason is None for c in choices):
            failure = server_error("the variant ended a choice without finishing")
        if failure is not None:
            status = str(failure.status)
            yield _event(error_payload(failure))
        else:
            status = "200"
            if request.include_usage:
                yield _chunk_event(chunks.usage(usage(choices)))
        yield "data: [DONE]\n\n"
    finally:
        await close_choices(choices)
        clock.finish(status, choices[0].request)
