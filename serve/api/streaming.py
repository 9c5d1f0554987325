"""Server-sent events for both generation endpoints: the variant's events as OpenAI chunks, an
error event if the variant fails midway, and `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from ..engine.types import EngineEvent, GenerateRequest
from .clock import RequestClock
from .errors import error_payload
from .protocol import ChatCompletionChunk, CompletionResponse, FinishReason, Usage

Chunk = ChatCompletionChunk | CompletionResponse


class StreamChunks(Protocol):
    """The chunks of one streamed answer, in its endpoint's shape."""

    def opening(self) -> list[Chunk]: ...
    def text(self, text: str) -> Chunk: ...
    def finish(self, reason: FinishReason) -> Chunk: ...
    def usage(self, usage: Usage) -> Chunk: ...


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _chunk_event(chunk: Chunk) -> str:
    # Only the closing usage chunk carries a `usage` key.
    return _event(chunk.model_dump(exclude={"usage"} if chunk.usage is None else None))


async def sse_stream(
    events: AsyncGenerator[EngineEvent, None],
    chunks: StreamChunks,
    include_usage: bool,
    clock: RequestClock,
    request: GenerateRequest,
) -> AsyncIterator[str]:
    status = "499"  # until the stream completes, the caller is the one who left
    try:
        for chunk in chunks.opening():
            yield _chunk_event(chunk)
        async for event in events:
            if event.kind == "delta":
                clock.tokens(event.tokens, event.text)
                if event.text:
                    yield _chunk_event(chunks.text(event.text))
            elif event.kind == "error":
                status = str(event.error.status)
                yield _event(error_payload(event.error))
                break
            elif event.kind == "done":
                clock.done(event)
                status = "200"
                yield _chunk_event(chunks.finish(event.finish_reason))
                if include_usage:
                    usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                    yield _chunk_event(chunks.usage(usage))
                break
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()
        clock.finish(status, request)
