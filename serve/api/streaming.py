"""Server-sent events for both generation endpoints: the choices' events as OpenAI chunks, an
error event if the variant fails midway, the usage when asked, and `[DONE]`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Protocol

from fastapi.responses import StreamingResponse
from starlette.types import Send

from ..engine.limits import server_error
from ..engine.types import EngineEvent
from .choices import Choice, close_choices, merged_events, track, usage
from .clock import RequestClock
from .errors import error_payload
from .failures import is_unavailable
from .protocol import ChatCompletionChunk, CompletionResponse, GenerationRequest, Usage

log = logging.getLogger(__name__)

Chunk = ChatCompletionChunk | CompletionResponse
DONE = "data: [DONE]\n\n"  # a stream's last frame


class StreamChunks(Protocol):
    """The chunks of one streamed answer, in its endpoint's shape."""

    def opening(self, choices: list[Choice]) -> list[Chunk]: ...

    def event(self, choice: Choice, event: EngineEvent) -> list[Chunk]:
        """The chunks for a prompt or delta event (already recorded on its choice)."""
        ...

    def finish(self, choice: Choice) -> list[Chunk]: ...

    def usage(self, usage: Usage) -> Chunk: ...


class SSEResponse(StreamingResponse):
    """A streamed answer whose last piece (the one ending in `[DONE]`) ends the HTTP response
    in the same write, not in one more."""

    async def stream_response(self, send: Send) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        ended = False
        async for piece in self.body_iterator:
            ended = piece.endswith(DONE)
            body = piece.encode(self.charset)
            await send({"type": "http.response.body", "body": body, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


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
    """The answer's SSE frames, those of one moment in one piece: each piece is one write to
    the client's socket, and each write wakes the client (on a small machine, CPU the engine
    wanted). The role chunks go with the first event's frames (the stream starts at the first
    token anyway), the finish chunks with the usage and `[DONE]`."""
    status = "499"  # until the stream completes, the caller is the one who left
    pending = [_chunk_event(chunk) for chunk in chunks.opening(choices)]
    try:
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
                    pending.append(_chunk_event(chunk))
                if pending and event.kind != "done":
                    yield "".join(pending)
                    pending = []
        except Exception as error:  # whatever broke, the caller gets a word, not a cut stream
            log.exception("variant %s stream failed", clock.variant)
            failure = server_error(f"the variant's stream failed: {type(error).__name__}")
        if failure is not None and is_unavailable(failure):
            clock.core.replica_lost_later(clock.variant, failure.message)
        if failure is None and any(c.finish_reason is None for c in choices):
            failure = server_error("the variant ended a choice without finishing")
        if failure is not None:
            status = str(failure.status)
            pending.append(_event(error_payload(failure)))
        else:
            status = "200"
            if request.include_usage:
                pending.append(_chunk_event(chunks.usage(usage(choices))))
        pending.append(DONE)
        yield "".join(pending)
    finally:
        await close_choices(choices)
        clock.finish(status, choices[0].request)
