"""The gateway's view of a variant: generate, stats and score, wherever the variant runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from multiprocessing import AuthenticationError
from typing import Any, Protocol

from ..engine.event_channel import EventInbox, connect
from ..engine.limits import server_error
from ..engine.types import EngineEvent, GenerateRequest, ReplicaDoor
from .failures import VariantDownError, from_backend_exception, is_lost_replica
from .replica_door import REFUSED, Door

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
        async with contextlib.aclosing(self.server.generate(request.model_dump())) as batches:
            async for batch in batches:
                for item in batch:
                    yield EngineEvent.model_validate(item)

    async def stats(self) -> dict[str, Any]:
        return await self.server.stats()

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.server.score(request.model_dump(), reference, limit)


class _ServeCall:
    """A streaming Serve call to the variant for a request whose events come by the inbox:
    a task brings what the call yields (events a replica relays, or its failure) into the
    stream's queue, then `_SERVE_CALL_ENDED`."""

    def __init__(
        self,
        stream: Any,
        payload: dict[str, Any],
        events: asyncio.Queue,
        failed: Callable[[Exception], EngineEvent],
    ) -> None:
        self.response = stream.generate.remote(payload)
        self.ended = False  # its end was taken from the queue
        self._relay = asyncio.get_running_loop().create_task(self._bring(events, failed))

    async def _bring(
        self, events: asyncio.Queue, failed: Callable[[Exception], EngineEvent]
    ) -> None:
        try:
            async for batch in self.response:
                for item in batch:
                    events.put_nowait(EngineEvent.model_validate(item))
        except Exception as error:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # Serve's word for our own cancel
                raise
            events.put_nowait(failed(error))
        events.put_nowait(_SERVE_CALL_ENDED)

    def settle(self, ended: bool, finishing: set[asyncio.Task]) -> None:
        """When the stream is done with it: a stream that did not end (its caller left) is
        cancelled, which aborts the request in the engine; else the call ends on its own."""
        if not ended:
            self._relay.cancel()
            self.response.cancel()
        elif not self._relay.done():
            finishing.add(self._relay)
            self._relay.add_done_callback(finishing.discard)


class RayBackend:
    """A VariantServer deployment behind a Ray Serve DeploymentHandle. A failure of the handle
    (backpressure, a lost replica, an exception in the replica) ends the stream with an error
    event, so that the caller always gets a word, never a dropped stream.

    With an `inbox`, a request names it, and an engine process or a variant replica on this
    node sends the events there itself (event_channel.py); the Serve call still spans the
    request and brings what the replica relays (from another node) or fails with. With
    `early_start` as well (a variant of one replica), each request goes to the replica's door,
    learnt from its stats, and takes a Serve call only when the door has no room for it
    (replica/early_start.py)."""

    def __init__(
        self,
        variant: str,
        handle: Any,
        inbox: EventInbox | None = None,
        early_start: bool = False,
    ) -> None:
        self.variant = variant
        self.handle = handle
        self.inbox = inbox
        self.early_start = early_start and inbox is not None
        self._door: Door | None = None
        self._stream = handle.options(stream=True)
        self._finishing: set[asyncio.Task] = set()  # Serve calls whose stream already ended

    def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineEvent, None]:
        if self.inbox is None:
            return self._relayed(request)
        return self._through_inbox(request, self.inbox)

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

    async def _through_inbox(
        self, request: GenerateRequest, inbox: EventInbox
    ) -> AsyncGenerator[EngineEvent, None]:
        """One request's stream, its events from the inbox. It goes to the replica's door
        when there is one (a Serve call costs ~2-3 ms of CPU that the engine's two cores pay
        for, in TTFT and between tokens), else, or when the door has no room, a Serve call
        spans it."""
        reply_to, events = inbox.open()
        payload = request.model_copy(update={"reply_to": reply_to}).model_dump()
        door = self._door
        if door is not None and door.broken:  # its replica went away
            self._door = door = None  # the stats probe learns the door of the one now serving
        at_door = door is not None and door.start(reply_to.stream, payload, events)
        call = None if at_door else self._serve_call(payload, events)
        ended = False
        try:
            while True:
                if call is not None and call.ended:  # the stream's end is on its way
                    event = await _wait_for_end(events, self.variant)
                else:
                    event = await events.get()
                if event is _SERVE_CALL_ENDED:
                    call.ended = True
                    continue
                if event is REFUSED:  # Serve's queue decides when it runs
                    at_door = False
                    call = self._serve_call(payload, events)
                    continue
                yield event
                if event.kind in ("done", "error"):
                    ended = True
                    return
        finally:
            inbox.close(reply_to.stream)
            if at_door:
                door.finish(reply_to.address, reply_to.stream, aborted=not ended)
            if call is not None:
                call.settle(ended, self._finishing)

    def _serve_call(self, payload: dict[str, Any], events: asyncio.Queue) -> _ServeCall:
        return _ServeCall(self._stream, payload, events, self._failed)

    async def _learn_door(self, found: dict[str, Any] | None) -> None:
        """Keep a connection to the door a stats answer named (on this node), or none."""
        door = ReplicaDoor.model_validate(found) if found is not None else None
        if door is None or self.inbox is None or door.node_id != self.inbox.node_id:
            self._drop_door()
            return
        kept = self._door
        if kept is not None and kept.address == door.address and not kept.broken:
            return
        self._drop_door()
        try:
            connection = await asyncio.to_thread(connect, door)
        except (OSError, EOFError, AuthenticationError) as error:
            log.warning(
                "cannot reach variant %s's door (%s); its requests take Serve calls",
                self.variant,
                error,
            )
            return
        self._door = Door(self.variant, door, connection)

    def _drop_door(self) -> None:
        if self._door is not None:
            self._door.close()
            self._door = None

    def _failed(self, error: Exception) -> EngineEvent:
        log.warning("variant %s stream failed: %s: %s", self.variant, type(error).__name__, error)
        return EngineEvent(kind="error", error=from_backend_exception(self.variant, error))

    async def stats(self) -> dict[str, Any]:
        try:
            stats = await self.handle.stats.remote()
        except Exception as error:
            if is_lost_replica(error):
                raise VariantDownError(f"its replica was lost ({type(error).__name__})") from error
            raise
        door = stats.pop("door", None)  # for this backend only
        if self.early_start:
            await self._learn_door(door)
        return stats

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.handle.score.remote(request.model_dump(), reference, limit)
