"""Handing events from another thread to the asyncio loops whose callers wait for them: one
wake-up of each loop per batch, not per event (a call_soon_threadsafe per token per sequence
would keep the loop and the GIL busy). No torch: the gateway uses it too."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from .types import EngineEvent

# A stream's waiting caller: its loop and the queue its events go to.
Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class LoopSink:
    """In-process delivery of an engine step's events to one caller's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def deliver(self, items: list[tuple[Any, EngineEvent]]) -> bool:
        try:
            self.loop.call_soon_threadsafe(put_all, items)
        except RuntimeError:  # that caller's event loop is gone
            return False
        return True


def put_all(items: list[tuple[asyncio.Queue, EngineEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def deliver_to_streams(items: Iterable[tuple[Stream, EngineEvent]]) -> None:
    """Each event to its stream's queue, one batch per loop; a loop that is gone gets
    nothing (its callers left). Called on a stream's own loop (the gateway's inbox is read
    there), its events are put at once, with no wake-up."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, EngineEvent]]] = {}
    for (loop, queue), event in items:
        by_loop.setdefault(loop, []).append((queue, event))
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:  # a thread of its own (the engine's)
        here = None
    for loop, batch in by_loop.items():
        if loop is here:
            put_all(batch)
        else:
            LoopSink(loop).deliver(batch)
