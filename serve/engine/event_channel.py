"""A request's events straight from the engine process (or the variant replica) to the gateway
replica that asked.

Through Ray Serve every message of a stream crosses engine process -> variant replica ->
gateway replica; at one stream each message cost the variant replica and Ray about 2 ms of CPU,
on a 2-core machine whose engine wants both cores (loadtests/README.md, "Gateway overhead").
When the gateway replica and the engine process share a node, the gateway opens an `EventInbox`
(a Unix socket in the abstract namespace, so no file to clean up, with an auth key) and names it
in the request (`ReplyTo`). The engine process then sends the request's events there itself, one
message per engine step for all of that gateway's streams, and tells the variant replica only
that the request ended. The Ray Serve call still spans the request, so Serve's routing,
`max_ongoing_requests`, autoscaling and replica restarts work as before; only the tokens take
the short way. Where the events come from the replica itself (tokens it labels, engines in its
own process such as vLLM), it sends them to the inbox through an `EventOutlet` in the same way,
past Serve's stream.

The wire: `("events", [(stream, EngineEvent), ...])` per message, pickled by
`multiprocessing.connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection

from .loop_delivery import Stream, deliver_to_streams
from .message_listener import MAX_PENDING_STREAM_BYTES, FramedWriter, MessageListener
from .types import EngineEvent, ReplicaDoor, ReplyTo

log = logging.getLogger(__name__)


def connect(target: ReplyTo | ReplicaDoor) -> Connection:
    """The sending side's connection to an inbox (or a replica's door); OSError or
    AuthenticationError if none."""
    return Client(target.address, family="AF_UNIX", authkey=bytes.fromhex(target.authkey))


def try_connect(reply_to: ReplyTo) -> Connection | None:
    """connect, or None (said in the log) when the inbox cannot be reached: the caller relays
    the request's events instead."""
    try:
        return connect(reply_to)
    except (OSError, EOFError, AuthenticationError) as error:
        log.warning("cannot reach a gateway's event inbox (%s); relaying its requests", error)
        return None


def closed_by_inbox(connection: Connection) -> bool:
    """An inbox never writes back: a connection with something to read is one it closed (a
    gateway replica that went away)."""
    try:
        return connection.poll(0)
    except (OSError, EOFError, ValueError):  # ValueError: closed here already
        return True


class EventOutlet:
    """A variant replica's connection to one inbox, for engines that run in the replica's own
    process (vLLM, or torch in-process), written from the replica's event loop without ever
    waiting on the socket: what it cannot take at once waits, in order, until it is writable
    (FramedWriter). A writer thread did this before; each message then waited for that thread
    to be scheduled and to take the interpreter lock from the loop, on cores the engine keeps
    busy."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        os.set_blocking(connection.fileno(), False)
        self.broken = False
        self._writer = FramedWriter(
            connection.fileno(), asyncio.get_running_loop(), MAX_PENDING_STREAM_BYTES, self._gone
        )

    def send(self, items: list[tuple[int, EngineEvent]]) -> bool:
        """One message of (stream, event) pairs, on the loop; False once the inbox is gone."""
        return not self.broken and self._writer.send(("events", items))

    def close(self) -> None:
        """On the loop: what was sent still reaches the inbox, then the connection closes."""
        self._writer.close_when_flushed(self._connection.close)

    def gone(self) -> bool:
        return self.broken or closed_by_inbox(self._connection)

    def _gone(self) -> None:
        log.warning("a gateway replica's event inbox went away")
        self.broken = True
        with contextlib.suppress(OSError):
            self._connection.close()


class EventOutlets:
    """A replica's outlets, one per inbox it sends to, opened on first use."""

    def __init__(self) -> None:
        self._outlets: dict[str, EventOutlet] = {}

    def outlet_for(self, reply_to: ReplyTo) -> EventOutlet | None:
        """None when the inbox cannot be reached (the caller relays instead)."""
        outlet = self._outlets.get(reply_to.address)
        if outlet is not None and not outlet.broken:
            return outlet
        self._drop_gone()  # a new inbox: a gateway replica may have replaced one
        connection = try_connect(reply_to)
        if connection is None:
            return None
        outlet = self._outlets[reply_to.address] = EventOutlet(connection)
        return outlet

    def close(self) -> None:
        for outlet in self._outlets.values():
            outlet.close()
        self._outlets.clear()

    def _drop_gone(self) -> None:
        for address, outlet in list(self._outlets.items()):
            if outlet.gone():
                outlet.close()
                del self._outlets[address]


class EventInbox:
    """Gateway side: takes connections from engine processes on this node, read on the event
    loop of the first stream opened (the gateway replica's), and puts each event in the queue
    of the stream it names; a stream on another loop gets its events by one wake-up of that
    loop per message, not per event."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._numbers = itertools.count()
        self._streams: dict[int, Stream] = {}
        self._listener = MessageListener("inbox", self._received)

    def open(self) -> tuple[ReplyTo, asyncio.Queue[EngineEvent]]:
        """A new stream: the reply-to to send with the request and the queue its events land
        in. Call `close(reply_to.stream)` when done with it."""
        number = next(self._numbers)
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._listener.bind(loop)  # before any peer can know the address: it is in reply_to
        self._streams[number] = (loop, events)
        reply_to = ReplyTo(
            address=self._listener.address,
            authkey=self._listener.authkey.hex(),
            node_id=self.node_id,
            stream=number,
        )
        return reply_to, events

    def close(self, stream: int) -> None:
        """Events that still come for this stream are dropped."""
        self._streams.pop(stream, None)

    def shutdown(self) -> None:
        """Stop listening and close every engine's connection: their engines end the streams
        they were sending here."""
        self._listener.shutdown()

    def _received(self, _: int, message: tuple[str, list[tuple[int, EngineEvent]]]) -> None:
        kind, items = message
        if kind != "events":
            return
        streams = ((self._streams.get(number), event) for number, event in items)
        deliver_to_streams((s, event) for s, event in streams if s is not None)  # else it left


def this_node() -> str | None:
    """The Ray node this process runs on; None outside Ray (tests, tools)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
