"""How often each stream's tokens are sent on: a message budget shared by the streams of one
replica (`paced_batches`, on a replica's event loop) or of one engine process (`StepPacing`, on
the engine thread, for the streams it sends to gateways itself).

Every stream message costs CPU on its way to the client (a Ray Serve hop or the gateway's
inbox, the gateway's SSE frame, the client's parse), and on a small machine that CPU comes out
of the engine's. So a replica or engine process spends at most about `messages_per_second`
messages on all its streams together: with n streams open, each one sends its pending tokens at
most every n / messages_per_second seconds, never more often than every `min_interval_s` and
never longer than `max_interval_s`. At the defaults (100/s, 20 ms, 200 ms) 8 streams get a message
every 80 ms, 32 every 200 ms (the cap), and one stream every 20 ms: about two decode steps, where
a message a step cost 8-16% of one stream's speed through the gateway on an Intel CPU with AMX.

What never waits: a stream's first token (TTFT does not pay for batching), "accepted",
"prompt", and the final "done" or "error" (which carries the pending deltas with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .types import EngineEvent, merge_deltas

if TYPE_CHECKING:
    from ..config import DeploymentOptions


class StreamPacer:
    """The replica's open streams and the interval their messages are spaced by."""

    def __init__(
        self, messages_per_second: float, max_interval_s: float, min_interval_s: float = 0.0
    ) -> None:
        self.messages_per_second = messages_per_second
        self.max_interval_s = max_interval_s
        self.min_interval_s = min_interval_s
        self.open_streams = 0

    @classmethod
    def for_deployment(cls, deployment: DeploymentOptions) -> StreamPacer:
        return cls(
            deployment.stream_messages_per_second,
            deployment.max_stream_interval_ms / 1000,
            deployment.min_stream_interval_ms / 1000,
        )

    def interval(self) -> float:
        shared = max(self.open_streams / self.messages_per_second, self.min_interval_s)
        return min(shared, self.max_interval_s)


async def paced_batches(
    events: AsyncIterator[EngineEvent], pacer: StreamPacer
) -> AsyncIterator[list[EngineEvent]]:
    """One stream's events in batches, in order, spaced by the pacer's interval; consecutive
    deltas in a batch are merged into one."""
    pacer.open_streams += 1
    batch: list[EngineEvent] = []
    sent_a_delta = False
    last_sent = 0.0
    waiting: asyncio.Future[EngineEvent | None] | None = None
    try:
        while True:
            if waiting is None:
                waiting = asyncio.ensure_future(anext(events, None))
            timeout = None
            if batch:  # held deltas: wait for more only until they are due
                timeout = max(last_sent + pacer.interval() - time.monotonic(), 0.0)
            done, _ = await asyncio.wait((waiting,), timeout=timeout)
            if done:
                finished, waiting = waiting, None
                event = finished.result()
                if event is None:  # the engine ended the stream
                    break
                _add(batch, event)
                held = event.kind == "delta" and sent_a_delta
                if held and time.monotonic() < last_sent + pacer.interval():
                    continue
                sent_a_delta = sent_a_delta or event.kind == "delta"
            yield batch
            batch = []
            last_sent = time.monotonic()
        if batch:
            yield batch
    finally:
        pacer.open_streams -= 1
        if waiting is not None:  # the caller left mid-wait: stop the engine's generator too
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()


def _add(batch: list[EngineEvent], event: EngineEvent) -> None:
    if event.kind == "delta" and batch and batch[-1].kind == "delta":
        batch[-1] = merge_deltas(batch[-1], event)
    else:
        batch.append(event)


@dataclass
class _Held:
    owner: Any  # what the caller gets back with a due delta (the engine's sequence)
    last_sent: float
    delta: EngineEvent | None = None


class StepPacing:
    """The same budget applied at the source, step by step: the engine thread hands each event
    of a paced stream to `admit` and sends what it returns; at each step's end `due` gives the
    held deltas whose interval has passed. A stream is open from its first delta to its done or
    error (which carries its held deltas), or until `forget`."""

    def __init__(self, pacer: StreamPacer) -> None:
        self.pacer = pacer
        self._streams: dict[int, _Held] = {}

    def admit(self, stream: int, owner: Any, event: EngineEvent, now: float) -> list[EngineEvent]:
        """What to send now for this stream's new event: nothing when it is a delta held back,
        else the held delta (merged with it, when a delta) and the event."""
        held = self._streams.get(stream)
        if event.kind != "delta":
            if event.kind in ("done", "error"):
                self._close(stream)
            return [event] if held is None or held.delta is None else [held.delta, event]
        if held is None:  # a stream's first delta goes at once: TTFT does not pay for batching
            self._streams[stream] = _Held(owner, now)
            self.pacer.open_streams = len(self._streams)
            return [event]
        merged = event if held.delta is None else merge_deltas(held.delta, event)
        if now < held.last_sent + self.pacer.interval():
            held.delta = merged
            return []
        held.delta, held.last_sent = None, now
        return [merged]

    def due(self, now: float) -> list[tuple[Any, EngineEvent]]:
        """The held deltas whose interval has passed, with their owners; they count as sent."""
        interval = self.pacer.interval()
        out = []
        for held in self._streams.values():
            if held.delta is not None and now >= held.last_sent + interval:
                out.append((held.owner, held.delta))
                held.delta, held.last_sent = None, now
        return out

    def forget(self, stream: int) -> None:
        """A stream that ends without a done or error (aborted): its held deltas are dropped."""
        self._close(stream)

    def open_owners(self) -> list[Any]:
        return [held.owner for held in self._streams.values()]

    def _close(self, stream: int) -> None:
        if self._streams.pop(stream, None) is not None:
            self.pacer.open_streams = len(self._streams)
