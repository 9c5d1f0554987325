"""Requests sent to a variant replica's door, no Serve call made for them
(replica/early_start.py): a real VariantServer of a tiny model (its engine in its own process)
and the gateway's RayBackend, Ray Serve's handle stood in for by one that calls the server's
methods in this process; the whole path through Ray Serve is in
tests/integration/test_gateway_e2e.py. Faults injected on purpose: a replica with no room, a
replica that goes away, a caller that leaves, a gateway that goes away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from slimserve.serve.api.backends import RayBackend
from slimserve.serve.api.deployment import early_starts
from slimserve.serve.engine.event_channel import EventInbox, connect
from slimserve.serve.engine.types import (
    EngineEvent,
    GenerateRequest,
    ReplicaDoor,
    SamplingParams,
)
from slimserve.serve.replica.early_start import Room

from .online_helpers import online_config, variant_servers

NODE = "node-a"
GREEDY = GenerateRequest(
    request_id="g",
    prompt_token_ids=[1, 5, 9, 200, 31],
    sampling=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
)
LONG = GREEDY.model_copy(
    update={"sampling": SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)}
)


class _ServeCall:
    """A streaming Serve call, run here: the gateway cancels the task that iterates it."""

    def __init__(self, items: AsyncIterator[list[dict]]) -> None:
        self._items = items
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[list[dict]]:
        return self._items

    def cancel(self) -> None:
        self.cancelled = True


class _Stats:
    def __init__(self, server: Any) -> None:
        self.server = server

    def remote(self) -> Any:
        return self.server.stats()


class _Handle:
    """Ray Serve's handle to the one replica, `server`."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.generate = self
        self.stats = _Stats(server)
        self.payloads: list[dict] = []

    def options(self, stream: bool) -> _Handle:
        return self

    def remote(self, payload: dict) -> _ServeCall:
        self.payloads.append(payload)
        return _ServeCall(self.server.generate(payload))


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: a replica serves on one loop for its life, and its door
    hands requests to the loop it was opened on."""
    running = asyncio.new_event_loop()
    yield running
    running.close()


@pytest.fixture(scope="module")
def server(tiny_model_dir, loop):
    config = online_config(tiny_model_dir, variants={"child": {}}, routing={})
    built = variant_servers(config)["child"]
    built.node_id = NODE  # outside Ray: the node the test's inbox says it is on
    yield built
    built.engine.shutdown()
    built.outlets.close()
    if built.early is not None:
        built.early.close()


@pytest.fixture
def inbox(loop):
    opened = EventInbox(NODE)
    yield opened
    opened.shutdown()


async def _backend(server: Any, inbox: EventInbox) -> tuple[RayBackend, _Handle]:
    handle = _Handle(server)
    backend = RayBackend("child", handle, inbox, early_start=True)
    stats = await backend.stats()  # opens the replica's door and learns it
    assert "door" not in stats  # the door is the backend's, never a client's
    assert backend._door is not None
    return backend, handle


async def _collect(backend: RayBackend, request: GenerateRequest) -> list[EngineEvent]:
    return [event async for event in backend.generate(request)]


def _text(events: list[EngineEvent]) -> str:
    return "".join(e.text for e in events if e.kind == "delta")


async def _plain_text(server: Any, request: GenerateRequest) -> str:
    """The same request through Serve's stream alone (no inbox, no door)."""
    batches = [batch async for batch in server.generate(request.model_dump())]
    return "".join(i["text"] for batch in batches for i in batch if i["kind"] == "delta")


def _counts(server: Any) -> dict[str, int]:
    return dict(server.early.counts) | dict(server.streams)


def _change(before: dict[str, int], server: Any) -> dict[str, int]:
    after = _counts(server)
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


async def _until(check: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _hold_runs(early: Any, gate: asyncio.Event, monkeypatch: Any) -> None:
    """Injected: requests started at the door wait for `gate` before they run."""
    run = early._run

    def held_run(request: GenerateRequest) -> Any:
        async def held() -> None:
            await gate.wait()
            await run(request)

        return held()

    monkeypatch.setattr(early, "_run", held_run)


def _idle(server: Any) -> bool:
    stats = server.engine.stats()
    return stats["running"] == 0 and stats["waiting"] == 0 and not server.early._early


LOGPROBS = GREEDY.model_copy(
    update={"sampling": GREEDY.sampling.model_copy(update={"logprobs": 1})}
)


# Log-probabilities are labelled in the replica, which sends them itself.
@pytest.mark.parametrize(
    ("request_", "sender"), [(GREEDY, "from_engine"), (LOGPROBS, "from_replica")]
)
def test_a_request_runs_at_the_door_with_no_serve_call(server, loop, inbox, request_, sender):
    async def scenario():
        backend, handle = await _backend(server, inbox)
        before = _counts(server)
        events = await _collect(backend, request_)
        change = _change(before, server)
        await _until(lambda: _idle(server))
        return events, handle.payloads, change, await _plain_text(server, request_)

    events, payloads, change, plain = loop.run_until_complete(scenario())
    assert events[0].kind == "accepted" and events[-1].kind == "done"
    assert all(e.kind != "refused" for e in events)
    assert payloads == []
    assert change == {"early_started": 1, sender: 1}
    assert _text(events) == plain


def test_a_full_replica_refuses_at_the_door_and_the_serve_call_waits_for_a_place(
    server, loop, inbox, monkeypatch
):
    """One place: a request holds it at the door; the next is refused there, and its Serve
    call runs it only once the first has ended, so the engine never holds two."""
    gate = asyncio.Event()

    async def scenario():
        backend, handle = await _backend(server, inbox)
        early = server.early
        monkeypatch.setattr(early, "_room", Room(1))
        _hold_runs(early, gate, monkeypatch)  # the first still runs when the next comes
        before = _counts(server)
        order: list[str] = []

        async def ask(name: str, request: GenerateRequest) -> list[EngineEvent]:
            events = []
            async for event in backend.generate(request):
                events.append(event)
                if event.kind in ("accepted", "done"):
                    order.append(f"{name} {event.kind}")
            return events

        first = asyncio.ensure_future(ask("first", LONG))
        await _until(lambda: bool(early._early))  # it holds the place
        second = asyncio.ensure_future(ask("second", GREEDY))
        await _until(lambda: bool(handle.payloads))  # refused: its Serve call was made
        gate.set()
        answers = await asyncio.gather(first, second)
        await _until(lambda: _idle(server))
        return answers, order, handle.payloads, _change(before, server)

    (first, second), order, payloads, change = loop.run_until_complete(scenario())
    assert order == ["first accepted", "first done", "second accepted", "second done"]
    assert len(payloads) == 1 and payloads[0]["request_id"] == GREEDY.request_id
    assert change == {"early_started": 1, "early_refused": 1, "from_engine": 2}
    assert first[-1].completion_tokens == 240 and second[-1].completion_tokens == 6


def test_a_replica_gone_mid_stream_ends_it_as_a_lost_replica(server, loop, inbox):
    async def scenario():
        backend, handle = await _backend(server, inbox)
        events = []
        async for event in backend.generate(LONG):
            events.append(event)
            if event.kind == "delta" and len(events) == 2:
                server.early.close()  # injected: the replica's door ends with it
        await _until(lambda: _idle(server))
        server.early = None  # the next stats call opens a new door
        return events, handle.payloads, backend._door

    events, payloads, door = loop.run_until_complete(scenario())
    assert payloads == []  # no Serve call to a replica that cannot have the request
    assert events[-1].kind == "error" and events[-1].error.code == "variant_unavailable"
    assert door is not None and door.broken


def test_a_burst_the_door_cannot_take_at_once_waits_and_goes_through_in_order(server, loop, inbox):
    """Messages the door's socket cannot take at once wait at the gateway, in order, until
    the replica reads: none is lost and the door stays open (the first version closed it,
    which aborted what had started there)."""

    async def scenario():
        backend, _ = await _backend(server, inbox)
        door = backend._door
        padding = "x" * 4096  # aborts of requests that never were: harmless, and bulky
        burst = [("abort", (f"{padding}{n}", n)) for n in range(2000)]
        accepted = [door._writer.send(message) for message in burst]  # no turn of the loop
        waited = door.pending()
        before = _counts(server)
        events = await _collect(backend, GREEDY)  # sent after the burst, so read after it
        await _until(lambda: door.pending() == 0)
        return accepted, waited, door, backend._door, events, _change(before, server)

    accepted, waited, door, door_after, events, change = loop.run_until_complete(scenario())
    assert all(accepted) and waited > 0  # the socket could not take it all at once
    assert door_after is door and not door.broken
    assert change == {"early_started": 1, "from_engine": 1}
    assert events[-1].kind == "done"


async def _fresh_counters(server: Any) -> dict[str, Any]:
    """The engine process's counters from a report sent after every event this process has
    received from it (it reports every STATS_PERIOD_S, on the pipe the events come by)."""
    seen = server.engine._stats
    await _until(lambda: server.engine._stats is not seen)
    return server.engine.stats()


async def _finished_when_idle(server: Any) -> int:
    """After a short request (so there is something to wait for), once the engine is idle:
    how many requests it ran to their end, aborted ones not counted."""
    await _plain_text(server, GREEDY)
    while (counters := await _fresh_counters(server))["running"] or counters["waiting"]:
        pass
    return counters["finished"]


def test_a_caller_that_leaves_aborts_the_door_request_in_the_engine(server, loop, inbox):
    async def scenario():
        backend, _ = await _backend(server, inbox)
        before = await _finished_when_idle(server)
        stream = backend.generate(LONG)
        async for event in stream:
            if event.kind == "delta":
                break
        await stream.aclose()
        return await _finished_when_idle(server) - before

    assert loop.run_until_complete(scenario()) == 1  # the short one only: LONG was aborted


def test_a_gateway_that_goes_away_aborts_what_it_started_at_the_door(server, loop, inbox):
    async def scenario():
        await server.stats()
        before = await _finished_when_idle(server)
        door = ReplicaDoor.model_validate(server.early.door.model_dump())
        reply_to, events = inbox.open()
        connection = await asyncio.to_thread(connect, door)
        asked = LONG.model_copy(update={"reply_to": reply_to})
        connection.send(("start", asked.model_dump()))
        first = await asyncio.wait_for(events.get(), 30)
        assert first.kind == "accepted"  # running
        connection.close()
        return await _finished_when_idle(server) - before

    assert loop.run_until_complete(scenario()) == 1  # the short one only: LONG was aborted


def test_a_graceful_stop_lets_door_requests_end_and_refuses_new_ones(
    server, loop, inbox, monkeypatch
):
    loop.run_until_complete(server.stats())  # opens the door
    early = server.early
    monkeypatch.setattr(early, "_draining", False)  # restored for the tests after
    gate = asyncio.Event()
    _hold_runs(early, gate, monkeypatch)  # the request still runs when the stop comes

    async def scenario():
        door = ReplicaDoor.model_validate(early.door.model_dump())
        connection = await asyncio.to_thread(connect, door)
        first, first_events = inbox.open()
        connection.send(("start", GREEDY.model_copy(update={"reply_to": first}).model_dump()))
        await _until(lambda: (first.address, first.stream) in early._early)
        draining = asyncio.ensure_future(early.drain(timeout=60))
        counts = _counts(server)
        late, _ = inbox.open()
        connection.send(("start", GREEDY.model_copy(update={"reply_to": late}).model_dump()))
        answer = await asyncio.wait_for(asyncio.to_thread(connection.recv), 30)
        refused = _counts(server)["early_refused"] - counts["early_refused"]
        waited_for_it = not draining.done()
        gate.set()
        await draining
        ended = [await asyncio.wait_for(first_events.get(), 30)]
        while ended[-1].kind not in ("done", "error"):
            ended.append(await asyncio.wait_for(first_events.get(), 30))
        await _until(lambda: not early._early)
        connection.close()
        return answer, late.stream, refused, waited_for_it, ended

    answer, late_stream, refused, waited_for_it, ended = loop.run_until_complete(scenario())
    assert answer == ("refused", late_stream) and refused == 1  # its Serve call goes elsewhere
    assert waited_for_it  # the stop waits while the request runs
    assert ended[-1].kind == "done" and ended[-1].completion_tokens == 6  # ran to its end


@pytest.mark.parametrize(
    ("deployment", "server", "early"),
    [
        ({}, {}, True),
        ({"replicas": 2}, {}, False),  # Serve's counts of each replica would miss the door's
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 2}}, {}, False),
        ({"early_start": False}, {}, False),
        ({}, {"direct_streams": False}, False),  # no inbox for the events to go to
    ],
)
def test_requests_go_to_the_door_only_for_a_variant_of_one_replica(
    tiny_model_dir, deployment, server, early
):
    config = online_config(
        tiny_model_dir, variants={"v": {"deployment": deployment}}, routing={}, server=server
    )
    assert early_starts(config, "v") is early


def test_the_room_hands_places_to_waiting_serve_calls_in_order_before_the_door():
    async def scenario():
        room = Room(1)
        assert room.take_now()
        order: list[str] = []

        async def serve_call(name: str) -> None:
            await room.take()
            order.append(name)

        first = asyncio.ensure_future(serve_call("first"))
        second = asyncio.ensure_future(serve_call("second"))
        cancelled = asyncio.ensure_future(serve_call("cancelled"))
        await asyncio.sleep(0)
        cancelled.cancel()  # a caller that left while waiting takes no place
        door_while_waiting = room.take_now()
        room.give()  # the door's request ended: the place goes to the first waiter
        await first
        room.give()
        await second
        room.give()
        return order, door_while_waiting, room.take_now(), room.take_now()

    order, door_while_waiting, free_after, none_left = asyncio.run(scenario())
    assert order == ["first", "second"]
    assert not door_while_waiting  # a waiting Serve call goes first
    assert free_after and not none_left  # the one place is back, once


def test_a_start_that_is_no_request_is_refused_and_the_door_stays_open(server, loop, inbox):
    async def scenario():
        await server.stats()
        before = _counts(server)
        door = ReplicaDoor.model_validate(server.early.door.model_dump())
        connection = await asyncio.to_thread(connect, door)
        connection.send(("start", {"reply_to": None, "sampling": "not sampling"}))
        reply_to, events = inbox.open()
        connection.send(("start", GREEDY.model_copy(update={"reply_to": reply_to}).model_dump()))
        ended = [await asyncio.wait_for(events.get(), 30)]
        while ended[-1].kind not in ("done", "error"):
            ended.append(await asyncio.wait_for(events.get(), 30))
        await _until(lambda: not server.early._early)
        connection.close()
        return _change(before, server), ended

    change, ended = loop.run_until_complete(scenario())
    assert change == {"early_refused": 1, "early_started": 1, "from_engine": 1}
    assert ended[-1].kind == "done" and ended[-1].completion_tokens == 6
