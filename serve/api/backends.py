"""The gateway's view of a variant: generate, stats and score, wherever the variant runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from ..engine.event_channel import EventInbox
from ..engine.limits import server_error
from ..engine.types import EngineEvent, GenerateRequest
from .failures import VariantDownError, from_backend_exception, is_lost_replica

log = logging.getLogger(__name__)

# After the Serve call of a forwarded stream ended, how long its end may still take to arrive
# in the inbox (it was sent first; this only bounds a lost one).
FORWARDED_END_GRACE_S = 5.0
# Put in a stream's queue when its Serve call ended.
_SERVE_CALL_ENDED = EngineEvent(kind="forwarded")


async def _wait_for_end(events: asyncio.Queue, variant: str) -> EngineEvent:
    try:
        return await asyncio.wait_for(events.get(), FORWARDED_END_GRACE_S)
    except TimeoutError:
        message = f"variant {variant} ended a stream whose end never arrived"
        return EngineEvent(kind="error", error=server_error(message))


class VariantBackend(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict: ...


class InProcessBackend:
    """A VariantServer in this process (tests, tools)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]:
        async for batch in self.server.generate(request.model_dump()):
            for item in batch:
                yield EngineEvent.model_validate(item)

    async def stats(self) -> dict[str, Any]:
        return await self.server.stats()

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.server.score(request.model_dump(), reference, limit)


class RayBackend:
    """A VariantServer deployment behind a Ray Serve DeploymentHandle. A failure of the handle
    (backpressure, a lost replica, an exception in the replica) ends the stream with an error
    event, so that the caller always gets a word, never a dropped stream.

    With an `inbox`, a request names it, and an engine process or a variant replica on this
    node sends the events there itself (event_channel.py); the Serve call still spans the
    request and brings what the replica relays (from another node) or fails with."""

    def __init__(self, variant: str, handle: Any, inbox: EventInbox | None = None) -> None:
        self.variant = variant
        self.handle = handle
        self.inbox = inbox
        self._stream = handle.options(stream=True)
        self._finishing: set[asyncio.Task] = set()  # Serve calls whose stream already ended

    def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]:
        if self.inbox is None:
            return self._relayed(request)
        return self._direct(request, self.inbox)

    async def _relayed(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]:
        response = self._stream.generate.remote(request.model_dump())
        try:
            async for (
                batch
            ) in response:  # a replica's message: a batch of events (engine/pacing.py)
                for item in batch:
                    yield EngineEvent.model_validate(item)
        except Exception as error:
            yield self._failed(error)
        finally:
            response.cancel()  # frees the replica's batch slot when the caller went away

    async def _direct(
        self, request: GenerateRequest, inbox: EventInbox
    ) -> AsyncGenerator[EngineEvent, None]:
        reply_to, events = inbox.open()
        response = self._stream.generate.remote(
            request.model_copy(update={"reply_to": reply_to}).model_dump()
        )
        relay = asyncio.get_running_loop().create_task(self._relay(response, events))
        ended = False
        try:
            relay_done = False
            while True:
                if relay_done:  # the Serve call ended: the stream's end is on its way
                    event = await _wait_for_end(events, self.variant)
                else:
                    event = await events.get()
                if event is _SERVE_CALL_ENDED:
                    relay_done = True
                    continue
                yield event
                if event.kind in ("done", "error"):
                    ended = True
                    return
        finally:
            inbox.close(reply_to.stream)
            if not ended:  # the caller left before the end: cancel, which aborts it in the engine
                relay.cancel()
                response.cancel()
            elif not relay.done():  # the call ends on its own in a moment
                self._finishing.add(relay)
                relay.add_done_callback(self._finishing.discard)

    async def _relay(self, response: Any, events: asyncio.Queue) -> None:
        """What the Serve call brings (the events a replica relays, or its failure) into the
        stream's queue, then the call's end."""
        try:
            async for batch in response:
                for item in batch:
                    events.put_nowait(EngineEvent.model_validate(item))
        except Exception as error:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # Serve's word for our own cancel
                raise
            events.put_nowait(self._failed(error))
        events.put_nowait(_SERVE_CALL_ENDED)

    def _failed(self, error: Exception) -> EngineEvent:
        log.warning("variant %s stream failed: %s: %s", self.variant, type(error).__name__, error)
        return EngineEvent(kind="error", error=from_backend_exception(self.variant, error))

    async def stats(self) -> dict[str, Any]:
        try:
            return await self.handle.stats.remote()
        except Exception as error:
            if is_lost_replica(error):
                raise VariantDownError(f"its replica was lost ({type(error).__name__})") from error
            raise

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.handle.score.remote(request.model_dump(), reference, limit)
