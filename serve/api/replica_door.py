"""The gateway's connection to a variant replica's door (replica/early_start.py).

Written from the gateway's event loop itself: handed to a writer thread, a start waited for
the interpreter lock behind the Serve call being made. The socket is non-blocking and what it
cannot take at once waits here, in order, until the replica reads; nothing is dropped. (The
first version closed a door whose socket did not report writable, which a Unix socket stops
reporting once a quarter of its buffer is in flight: a burst of 32 starts closed it, and the
replica then aborted the starts not yet attached.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from multiprocessing.connection import Connection

from ..engine.event_channel import closed_by_inbox
from ..engine.message_listener import framed
from ..engine.types import ReplicaDoor

log = logging.getLogger(__name__)

# What may wait for a replica that stopped reading its door before the door is given up
# (which aborts the starts not yet attached there): thousands of requests' worth.
MAX_PENDING_BYTES = 16 << 20


class Door:
    """Messages to one replica's door, in order, never waiting on the socket."""

    def __init__(self, door: ReplicaDoor, connection: Connection) -> None:
        self.address = door.address
        self._connection = connection
        self._fd = connection.fileno()
        os.set_blocking(self._fd, False)
        self._loop = asyncio.get_running_loop()
        self._pending = bytearray()
        self.broken = False

    def send(self, message: tuple) -> bool:
        """False, and the door closed, when the replica is gone or has stopped reading."""
        if self.broken:
            return False
        data = framed(message)
        if self._pending:
            if len(self._pending) + len(data) > MAX_PENDING_BYTES:
                log.warning("a variant replica stopped reading its door; closing it")
                self.close()
                return False
            self._pending += data
            return True
        written = self._write(data)
        if written is None:
            return False
        if written < len(data):
            self._pending += data[written:]
            self._loop.add_writer(self._fd, self._flush)
        return True

    def pending(self) -> int:
        """Bytes written here and not yet taken by the socket."""
        return len(self._pending)

    def gone(self) -> bool:
        return self.broken or closed_by_inbox(self._connection)

    def close(self) -> None:
        if self._pending:
            self._loop.remove_writer(self._fd)
            self._pending.clear()
        self.broken = True
        with contextlib.suppress(OSError):
            self._connection.close()

    def _write(self, data: bytes | bytearray) -> int | None:
        """Bytes the socket took now; None when the peer is gone (the door is then closed)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self.close()
            return None

    def _flush(self) -> None:
        written = self._write(self._pending)
        if not written:  # nothing taken yet, or the door closed
            return
        del self._pending[:written]
        if not self._pending:
            self._loop.remove_writer(self._fd)
