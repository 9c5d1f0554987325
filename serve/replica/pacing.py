"""How often a replica sends each stream's tokens on: a message budget shared by its streams.

Every message a replica yields crosses two Ray Serve hops (replica -> gateway -> proxy), and
on a small machine those hops take CPU from the engine. So a replica spends at most about
`messages_per_second` messages on all its streams together: with n streams open, each one
sends its pending events at most every n / messages_per_second seconds (never longer than
`max_interval_s`). One stream at the default budget (100/s, every 10 ms) is paced below a
decode step, so it still gets every token as it comes; 8 streams get about two tokens per
message, 32 about three.

What never waits: a stream's first token (TTFT does not pay for batching), "accepted",
"prompt", and the final "done" or "error" (which carries the pending deltas with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from ..engine.types import EngineEvent, merge_deltas


class StreamPacer:
    """The replica's open streams and the interval their messages are spaced by."""

    def __init__(self, messages_per_second: float, max_interval_s: float) -> None:
        self.messages_per_second = messages_per_second
        self.max_interval_s = max_interval_s
        self.open_streams = 0

    def interval(self) -> float:
        return min(self.open_streams / self.messages_per_second, self.max_interval_s)


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
