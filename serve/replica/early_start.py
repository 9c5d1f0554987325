"""Requests a gateway replica on this node sends to the variant replica's door, no Ray Serve
call made for them.

Ray Serve's handle call from the gateway replica to a variant replica takes 2-5 ms on a 2-core
machine, whatever its options (loadtests/README.md, "Where one stream's TTFT goes"), and the
engine could not start a prompt before it; at 32 streams a fifth of the gateway's busy CPU was
the calls. When the gateway replica shares the node of a variant that runs one replica, it
sends each request to the replica's door instead (a Unix socket in the abstract namespace, with
an auth key), and the replica runs it at once, its events going to the gateway's inbox as for
any request (engine/event_channel.py). What a Serve call gave such a request the door gives
itself:

- admission: the door's requests and the replica's Serve calls share one count of
  `max_ongoing_requests`. A start with no room is answered `("refused", stream)` on the door,
  and the gateway then makes the ordinary Serve call, so Serve's queue and backpressure
  (`max_queued_requests`) decide when it runs. A Serve call that arrives while the door's
  requests fill the replica waits here for room, so the engine never holds more.
- cancellation: the gateway's `("abort", (inbox address, stream))`, and its door closing (a
  gateway replica gone) aborts everything it started.
- a lost replica: its door's end is seen by the gateway (api/replica_door.py), which ends those
  streams with the error a failed Serve call gives.
- a graceful stop: the replica refuses new starts and waits a while for those running
  (`VariantReplica` in server.py); Serve waits only for its own calls.

Serve's own request metrics do not count the door's requests; slimserve's metrics do.

The wire, gateway to replica: `("start", GenerateRequest as a dict)`, `("abort", (inbox
address, stream))`; replica to gateway: `("refused", stream)`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..engine.message_listener import MessageListener
from ..engine.types import GenerateRequest, ReplicaDoor

log = logging.getLogger(__name__)

EarlyKey = tuple[str, int]  # (the gateway's inbox address, the request's stream in it)
# A request this replica runs to the inbox on its own; None: it cannot (no way to the inbox).
EarlyRun = Callable[[GenerateRequest], Coroutine[Any, Any, None] | None]


class Room:
    """`max_ongoing_requests` places, taken at once by the door (or not at all) and waited for,
    in order, by Serve calls; a Serve call waiting keeps the door from taking a place first."""

    def __init__(self, places: int) -> None:
        self._free = places
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_now(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.take_now():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a place, then cancelled
                self.give()
            else:
                self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes to it
                return
        self._free += 1


@dataclass
class _Early:
    task: asyncio.Task
    connection: int  # the gateway connection it came on


class EarlyStarts:
    """A variant replica's door, the requests running through it, and the room they share
    with the replica's Serve calls. Runs on the replica's event loop, which reads the door."""

    def __init__(
        self, node_id: str, run: EarlyRun, max_ongoing: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._run = run
        self._loop = loop
        self._room = Room(max_ongoing)  # held by each running request, door's or Serve call's
        self._early: dict[EarlyKey, _Early] = {}
        self.counts = {"early_started": 0, "early_refused": 0}
        self._draining = False
        self._listener = MessageListener("door", self._on_message, self._abort_all, loop)
        self.door = ReplicaDoor(
            address=self._listener.address,
            authkey=self._listener.authkey.hex(),
            node_id=node_id,
        )

    @asynccontextmanager
    async def serve_call(self) -> AsyncIterator[None]:
        """A place for a Serve call: at once, or when the door's requests leave one."""
        await self._room.take()
        try:
            yield
        finally:
            self._room.give()

    async def drain(self, timeout: float) -> None:
        """A graceful stop: refuse new starts and let those running end, for at most `timeout`
        seconds."""
        self._draining = True
        running = [early.task for early in self._early.values()]
        if running:
            log.info("waiting for %d requests started at the door to end", len(running))
            await asyncio.wait(running, timeout=timeout)

    def close(self) -> None:
        self._listener.shutdown()
        for early in self._early.values():
            early.task.cancel()
        self._early.clear()

    # ---- the door's messages, read on the event loop ----------------------------------------

    def _on_message(self, connection: int, message: Any) -> None:
        kind, body = message
        if kind == "start":
            self._start(connection, body)
        elif kind == "abort":
            self._abort(tuple(body))
        else:
            log.warning("unknown message %r at a variant replica's door", kind)

    def _start(self, connection: int, payload: dict[str, Any]) -> None:
        try:
            request = GenerateRequest.model_validate(payload)
        except ValidationError as error:
            # The gateway's Serve call, which carries the same payload, answers for it.
            log.warning("a start at the door that is no request: %s", error)
            self._refuse(connection, (payload.get("reply_to") or {}).get("stream"))
            return
        reply_to = request.reply_to
        run = None
        if reply_to is not None and not self._draining and self._room.take_now():
            run = self._run(request)
            if run is None:
                self._room.give()
        if run is None:
            self._refuse(connection, None if reply_to is None else reply_to.stream)
            return
        key = (reply_to.address, reply_to.stream)
        task = self._loop.create_task(run)
        early = self._early[key] = _Early(task, connection)
        task.add_done_callback(lambda _: self._ended(key, early))
        self.counts["early_started"] += 1

    def _refuse(self, connection: int, stream: int | None) -> None:
        self.counts["early_refused"] += 1
        if stream is not None:
            self._listener.send(connection, ("refused", stream))

    def _ended(self, key: EarlyKey, early: _Early) -> None:
        self._room.give()
        if self._early.get(key) is early:
            del self._early[key]

    def _abort(self, key: EarlyKey) -> None:
        early = self._early.pop(key, None)
        if early is not None:
            early.task.cancel()  # closes its events, which aborts it in the engine

    def _abort_all(self, connection: int) -> None:
        """A gateway replica that went away: no one is left to read what it started."""
        for key in [k for k, early in self._early.items() if early.connection == connection]:
            self._abort(key)
