"""The gateway's connection to a variant replica's door (replica/early_start.py).

Written from the gateway's event loop itself: handed to a writer thread, a start waited for
the interpreter lock behind whatever the loop was doing. The socket is non-blocking and what it
cannot take at once waits, in order, until the replica reads; nothing is dropped. (The first
version closed a door whose socket did not report writable, which a Unix socket stops reporting
once a quarter of its buffer is in flight: a burst of 32 starts closed it, and the replica then
aborted them.)

The loop reads the door too: the replica answers a start it has no room for with
`("refused", stream)`, and the door's end is the replica's end, which ends every request
running there with a lost replica's error (no Serve call spans them to say so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from multiprocessing.connection import Connection
from typing import Any

from ..engine.message_listener import MAX_PENDING_STREAM_BYTES, FramedWriter, Frames
from ..engine.types import EngineEvent, ReplicaDoor
from .failures import unavailable

log = logging.getLogger(__name__)

# Put in a stream's queue when the replica had no room for it.
REFUSED = EngineEvent(kind="refused")


class Door:
    """Requests started at one replica's door: each stream's events come by the gateway's
    inbox, and what the door itself says about a stream goes into that stream's queue."""

    def __init__(self, variant: str, door: ReplicaDoor, connection: Connection) -> None:
        self.variant = variant
        self.address = door.address
        self._connection = connection
        self._fd = connection.fileno()
        os.set_blocking(self._fd, False)
        self._loop = asyncio.get_running_loop()
        self._writer = FramedWriter(self._fd, self._loop, MAX_PENDING_STREAM_BYTES, self.close)
        self._frames = Frames()
        self._streams: dict[int, asyncio.Queue] = {}  # started here and not yet finished
        self.broken = False
        self._loop.add_reader(self._fd, self._readable)

    def start(self, stream: int, payload: dict[str, Any], events: asyncio.Queue) -> bool:
        """Send a request (its `reply_to` naming `stream`); False when the door is closed."""
        if not self._writer.send(("start", payload)):
            return False
        self._streams[stream] = events
        return True

    def finish(self, address: str, stream: int, aborted: bool) -> None:
        """A stream started here is over for the gateway; `aborted`: before its end, so the
        replica is told to drop it."""
        if self._streams.pop(stream, None) is not None and aborted:
            self._writer.send(("abort", (address, stream)))

    def pending(self) -> int:
        """Bytes written here and not yet taken by the socket."""
        return self._writer.pending()

    def close(self) -> None:
        """Closing the door (the gateway's choice, or the replica's end) ends what still runs
        there: the replica aborts it, and each stream gets a lost replica's error."""
        if self.broken:
            return
        self.broken = True
        self._writer.close()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            self._connection.close()
        streams, self._streams = self._streams, {}
        if streams:
            log.warning(
                "variant %s: its replica's door closed with %d requests running there",
                self.variant,
                len(streams),
            )
        gone = unavailable(self.variant, "its replica went away mid-stream")
        for events in streams.values():
            events.put_nowait(EngineEvent(kind="error", error=gone))

    def _readable(self) -> None:
        answers = self._frames.read(self._fd)
        if answers is None:  # the replica is gone
            self.close()
            return
        for kind, stream in answers:
            if kind != "refused":
                log.warning("unknown answer %r at variant %s's door", kind, self.variant)
                continue
            events = self._streams.pop(stream, None)
            if events is not None:  # else the gateway already finished it
                events.put_nowait(REFUSED)
