"""A listening Unix socket whose peers' messages are read on an asyncio event loop.

The gateway's event inbox and a variant replica's door take messages sent by
`multiprocessing.connection` (a 4-byte length, then the pickle). A thread blocked on each
connection cost every message a thread wake-up, the interpreter lock handed over and a write to
the loop's wake-up pipe, ~40 us of CPU a message more than reading the socket on the loop itself
(loadtests/README.md, "The inbox and the door read on the event loop"); on a 2-core machine that
CPU comes out of the engine's decode step. So a thread only accepts (the auth handshake
blocks) and hands each connection to the loop, which reads it when it is readable and parses
whole messages out of what has come.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import secrets
import socket
import struct
import threading
import uuid
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from typing import Any

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!i")  # multiprocessing.connection's header
_LONG_LENGTH = struct.Struct("!Q")  # after a header of -1, for messages over 2 GiB
_READ_SIZE = 1 << 16
# What may wait for a peer that stopped reading this side's answers before its connection is
# dropped.
MAX_PENDING_ANSWER_BYTES = 1 << 20
# What may wait for a peer that stopped reading a stream of requests or events (a gateway's
# starts at a replica's door, a replica's events to a gateway's inbox) before it is given up,
# which ends the requests that ran through it: thousands of requests' or steps' worth.
MAX_PENDING_STREAM_BYTES = 16 << 20


def framed(message: Any) -> bytes:
    """`message` as `multiprocessing.connection.Connection.send` puts it on the wire, for
    writers that must not block (a partial write is theirs to finish)."""
    body = pickle.dumps(message)
    if len(body) > 0x7FFFFFFF:
        return _LENGTH.pack(-1) + _LONG_LENGTH.pack(len(body)) + body
    return _LENGTH.pack(len(body)) + body


class Frames:
    """One connection's bytes as they come, cut into whole messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def need(self) -> int:
        """How many bytes to ask the socket for: the rest of a large message at once."""
        if len(self._buffer) < _LENGTH.size:
            return _READ_SIZE
        header, size = self._header()
        return max(_READ_SIZE, header + size - len(self._buffer))

    def add(self, data: bytes) -> list[Any]:
        """The messages completed by `data`, in order."""
        self._buffer += data
        messages = []
        start = 0
        with memoryview(self._buffer) as view:  # released before the buffer is cut
            while True:
                header, size = self._header(start)
                if header == 0 or len(self._buffer) - start < header + size:
                    break
                with view[start + header : start + header + size] as body:
                    messages.append(pickle.loads(body))
                start += header + size
        del self._buffer[:start]
        return messages

    def read(self, fd: int) -> list[Any] | None:
        """The messages completed by what the non-blocking `fd` has now ([] when none yet);
        None once the peer closed it."""
        try:
            data = os.read(fd, self.need())
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        return self.add(data) if data else None

    def partial(self) -> bool:
        return bool(self._buffer)

    def _header(self, start: int = 0) -> tuple[int, int]:
        """(header bytes, message bytes) of the message at `start`; (0, 0) until its header
        is whole."""
        if len(self._buffer) - start < _LENGTH.size:
            return 0, 0
        (size,) = _LENGTH.unpack_from(self._buffer, start)
        if size != -1:
            return _LENGTH.size, size
        if len(self._buffer) - start < _LENGTH.size + _LONG_LENGTH.size:
            return 0, 0
        (size,) = _LONG_LENGTH.unpack_from(self._buffer, start + _LENGTH.size)
        return _LENGTH.size + _LONG_LENGTH.size, size


class FramedWriter:
    """Messages to a non-blocking socket, in order, never waiting on it: what the socket cannot
    take at once waits here and is written whenever the loop says it is writable, so nothing is
    dropped. `broken` is called once, when the peer is gone or more than `max_pending` bytes
    wait for a peer that stopped reading."""

    def __init__(
        self,
        fd: int,
        loop: asyncio.AbstractEventLoop,
        max_pending: int,
        broken: Callable[[], None],
    ) -> None:
        self._fd = fd
        self._loop = loop
        self._max_pending = max_pending
        self._broken = broken
        self._pending = bytearray()
        self._closed = False
        self._flushed: Callable[[], None] | None = None  # close_when_flushed's callback

    def send(self, message: Any) -> bool:
        """False when the socket is given up (and `broken` was called)."""
        if self._closed or self._flushed is not None:
            return False
        data = framed(message)
        if self._pending:
            if len(self._pending) + len(data) > self._max_pending:
                log.warning("a peer stopped reading its socket; giving it up")
                self._give_up()
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
        """Bytes sent here and not yet taken by the socket."""
        return len(self._pending)

    def close(self) -> None:
        """Stop writing (the socket is its owner's to close)."""
        if self._pending:
            self._loop.remove_writer(self._fd)
            self._pending.clear()
        self._closed = True

    def close_when_flushed(self, flushed: Callable[[], None]) -> None:
        """Take no more messages; call `flushed` once what waits here is written (now when
        nothing does), or when the peer is given up."""
        if not self._pending or self._closed:
            self.close()
            flushed()
        else:
            self._flushed = flushed

    def _give_up(self) -> None:
        if not self._closed:
            self.close()
            self._broken()
            self._done_flushing()

    def _done_flushing(self) -> None:
        flushed, self._flushed = self._flushed, None
        if flushed is not None:
            self._closed = True
            flushed()

    def _write(self, data: bytes | bytearray) -> int | None:
        """Bytes the socket took now; None when the peer is gone (the socket is given up)."""
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:
            self._give_up()
            return None

    def _flush(self) -> None:
        written = self._write(self._pending)
        if not written:  # nothing taken yet, or given up
            return
        del self._pending[:written]
        if not self._pending:
            self._loop.remove_writer(self._fd)
            self._done_flushing()


class MessageListener:
    """A listening Unix socket in the abstract namespace (no file to clean up) that answers
    only connections proving they know its auth key. A thread accepts; each connection is read
    on `loop` (given here or with `bind`, before any peer can know the address), which calls
    `handle(connection_number, message)` for each message and `closed(connection_number)`
    after a connection's last one; `send` answers on a connection."""

    def __init__(
        self,
        name: str,
        handle: Callable[[int, Any], None],
        closed: Callable[[int], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.authkey = secrets.token_bytes(16)
        self.address = f"\0slimserve-{name}-{uuid.uuid4().hex}"
        self.loop = loop
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self._handle = handle
        self._on_closed = closed
        self._numbers = itertools.count()
        self._connections: dict[int, Connection] = {}
        self._writers: dict[int, FramedWriter] = {}  # connections answered on
        self._closed = False
        threading.Thread(target=self._accept, name=f"{name}-listener", daemon=True).start()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop to read on, when it was not known at construction."""
        if self.loop is None:
            self.loop = loop

    def send(self, number: int, message: Any) -> bool:
        """On the loop: answer on connection `number`, never waiting on its socket; False
        when that connection is gone."""
        connection = self._connections.get(number)
        if connection is None:
            return False
        writer = self._writers.get(number)
        if writer is None:
            writer = self._writers[number] = FramedWriter(
                connection.fileno(),
                self.loop,
                MAX_PENDING_ANSWER_BYTES,
                lambda: self._drop(number, connection),
            )
        return writer.send(message)

    def shutdown(self) -> None:
        """Stop listening and close every connection (their peers see it). From any thread:
        the loop, while it runs, reads each connection's end and calls `closed`."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        loop = self.loop
        for number, connection in list(self._connections.items()):
            # shutdown, not close: the loop sees the end, and so does the peer.
            with (
                contextlib.suppress(OSError),
                socket.fromfd(connection.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock,
            ):
                sock.shutdown(socket.SHUT_RDWR)
            if loop is None or not loop.is_running():  # nothing will read that end
                self._drop(number, connection)

    def _accept(self) -> None:
        while not self._closed:
            try:
                connection = self._listener.accept()
            except (OSError, EOFError, AuthenticationError):  # closed, or a failed handshake
                if self._closed:
                    return
                log.warning("refused a connection to %s", self.address[1:], exc_info=True)
                continue
            number = next(self._numbers)
            try:
                if self.loop is None:
                    raise RuntimeError("no event loop to read on yet")
                self.loop.call_soon_threadsafe(self._watch, connection, number)
            except RuntimeError as error:  # no loop, or it is closed
                log.warning("dropped a connection to %s: %s", self.address[1:], error)
                connection.close()

    def _watch(self, connection: Connection, number: int) -> None:
        """On the loop: read the connection whenever it has something."""
        if self._closed:
            connection.close()
            return
        os.set_blocking(connection.fileno(), False)
        self._connections[number] = connection
        frames = Frames()
        self.loop.add_reader(connection.fileno(), self._readable, connection, number, frames)

    def _readable(self, connection: Connection, number: int, frames: Frames) -> None:
        try:
            messages = frames.read(connection.fileno())
            if messages is None:  # the peer, or shutdown, closed it
                if frames.partial():
                    log.warning("a connection to %s ended mid-message", self.address[1:])
                self._drop(number, connection)
                return
            for message in messages:
                self._handle(number, message)
        except Exception:  # a message no one here can read: the peer does not speak this
            log.exception("unreadable message at %s; closing its connection", self.address[1:])
            self._drop(number, connection)

    def _drop(self, number: int, connection: Connection) -> None:
        if self._connections.pop(number, None) is None:
            return
        writer = self._writers.pop(number, None)
        if writer is not None:
            writer.close()
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(ValueError, OSError):  # ValueError: already closed
                loop.remove_reader(connection.fileno())
        with contextlib.suppress(OSError):
            connection.close()
        if self._on_closed is not None:
            self._on_closed(number)
