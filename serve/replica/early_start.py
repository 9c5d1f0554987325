"""Requests that start before their Ray Serve call reaches the variant replica.

Ray Serve's handle call from the gateway replica to a variant replica takes 2-5 ms on a 2-core
machine, whatever its options (loadtests/README.md, "Where one stream's TTFT goes"), and the
engine could not start a prompt before it. When the gateway replica shares the node of a
variant that runs one replica, it sends each request to the replica's door (a Unix socket in
the abstract namespace, with an auth key) instead, and the replica starts it at once, its
events going to the gateway's inbox as for any request (engine/event_channel.py). The Serve
call follows once the request has run `deployment.attach_after_ms` (api/backends.py) and
attaches to the running request, so Serve's cancellation, graceful stop and request metrics
see it; made during the prefill, that call's CPU came out of the engine's two cores and TTFT
paid for it, and made after the first token it slowed a short answer's decode by 6-14%
(loadtests/README.md). A request that ends sooner never takes a Serve call: the door admits it
against `max_ongoing_requests`, the gateway's abort ends it, and the graceful stop below waits
for it. A Serve call that reaches a replica that never got the request (one that took over,
say) is answered "unattached": before anything went to the client the gateway aborts the early
start and asks again the ordinary way; after, the request goes on where it runs, the gateway
watching that replica's door.

A replica refuses early starts while its Serve calls and running unattached early starts fill
its `max_ongoing_requests`; the Serve call then runs the request itself, after Serve's own
queue. A replica's graceful stop refuses new early starts and waits a while for those no Serve
call spans (Serve's own wait covers only its calls): `VariantReplica` in server.py.

The wire: `("start", GenerateRequest as a dict)` and `("abort", (inbox address, stream))`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from ..engine.message_listener import MessageListener
from ..engine.types import GenerateRequest, ReplicaDoor

log = logging.getLogger(__name__)

# How long a Serve call for an early-started request waits for the start to arrive: it was sent
# first, on a faster path, so it is there unless the call reached another replica.
ATTACH_GRACE_S = 1.0
# How long a started request that ended before any Serve call claimed it is kept for that call.
# A call that comes later waits ATTACH_GRACE_S and is answered "unattached", by when the
# gateway has its whole answer; without a limit, calls that reach another replica (and so never
# claim here) would leave their requests behind.
FORGET_AFTER_S = 60.0

EarlyKey = tuple[str, int]  # (the gateway's inbox address, the request's stream in it)
# A request this replica runs to the inbox on its own; None: it cannot (no way to the inbox).
EarlyRun = Callable[[GenerateRequest], Coroutine[Any, Any, None] | None]


def early_key(request: GenerateRequest) -> EarlyKey:
    if request.reply_to is None:
        raise ValueError("an early start needs the gateway's reply_to")
    return request.reply_to.address, request.reply_to.stream


@dataclass
class _Early:
    task: asyncio.Task | None  # None: refused, so the Serve call runs it
    connection: int  # the gateway connection it came on


class EarlyStarts:
    """A variant replica's door and the requests started through it, until a Serve call
    attaches to each. Runs on the replica's event loop, which reads the door too."""

    def __init__(
        self, node_id: str, run: EarlyRun, max_ongoing: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._run = run
        self._max_ongoing = max_ongoing
        self._loop = loop
        self.serve_calls = 0  # this replica's Serve calls in flight, counted by the replica
        self._early: dict[EarlyKey, _Early] = {}
        self._arrivals: dict[EarlyKey, asyncio.Future[None]] = {}
        self.counts = {"early_started": 0, "early_refused": 0, "early_unattached": 0}
        self._draining = False
        self._listener = MessageListener("door", self._on_message, self._abort_all, loop)
        self.door = ReplicaDoor(
            address=self._listener.address,
            authkey=self._listener.authkey.hex(),
            node_id=node_id,
        )

    async def drain(self, timeout: float) -> None:
        """A graceful stop: refuse new starts and let those running here with no Serve call
        attached end, for at most `timeout` seconds (Ray Serve waits only for its own calls;
        a start whose call went to the replica taking over runs here to its end)."""
        self._draining = True
        running = [e.task for e in self._early.values() if e.task is not None and not e.task.done()]
        if running:
            log.info("waiting for %d early-started requests to end", len(running))
            await asyncio.wait(running, timeout=timeout)

    def close(self) -> None:
        self._listener.shutdown()
        for early in self._early.values():
            if early.task is not None:
                early.task.cancel()
        self._early.clear()

    async def claim(self, request: GenerateRequest) -> asyncio.Task | Literal["refused"] | None:
        """For a Serve call with `early`: the started request's task (the caller now owns
        it), "refused" (the call runs it), or None when it never came here."""
        key = early_key(request)
        if key not in self._early:
            arrival = self._arrivals.setdefault(key, self._loop.create_future())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(arrival), ATTACH_GRACE_S)
            self._arrivals.pop(key, None)
        early = self._early.pop(key, None)
        if early is None:
            self.counts["early_unattached"] += 1
            return None
        return "refused" if early.task is None else early.task

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
            key = early_key(request)
        except (ValidationError, ValueError) as error:
            # The Serve call, which carries the same request, answers for it.
            log.warning("an early start that is no request: %s", error)
            return
        task = None
        if not self._draining and self.serve_calls + self._unattached() < self._max_ongoing:
            run = self._run(request)
            if run is not None:
                task = self._loop.create_task(run)
        self.counts["early_started" if task is not None else "early_refused"] += 1
        early = self._early[key] = _Early(task, connection)
        if task is not None:
            task.add_done_callback(lambda _: self._ended(key, early))
        arrival = self._arrivals.get(key)
        if arrival is not None and not arrival.done():
            arrival.set_result(None)

    def _unattached(self) -> int:
        """Early starts running with no Serve call attached: what takes room at the door."""
        return sum(1 for e in self._early.values() if e.task is not None and not e.task.done())

    def _ended(self, key: EarlyKey, early: _Early) -> None:
        """A started request ran to its end: its Serve call may still come and find it done,
        but one that went to another replica never does."""
        if self._early.get(key) is early:
            self._loop.call_later(FORGET_AFTER_S, self._forget, key, early)

    def _forget(self, key: EarlyKey, early: _Early) -> None:
        if self._early.get(key) is early:
            del self._early[key]

    def _abort(self, key: EarlyKey) -> None:
        early = self._early.pop(key, None)
        if early is not None and early.task is not None:
            early.task.cancel()  # closes its events, which aborts it in the engine

    def _abort_all(self, connection: int) -> None:
        """A gateway replica that went away: nothing will attach to what it started."""
        for key in [k for k, early in self._early.items() if early.connection == connection]:
            self._abort(key)
