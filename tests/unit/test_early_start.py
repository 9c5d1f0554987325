"""Requests started at a variant replica's door before their Serve call reaches it
(replica/early_start.py): a real VariantServer of a tiny model (its engine in its own process)
and the gateway's RayBackend, Ray Serve's handle stood in for by one that calls the server's
methods in this process; the whole path through Ray Serve is in
tests/integration/test_gateway_e2e.py. Faults injected on purpose: a start that never reaches
the door, a replica with no room, a caller that leaves, a gateway that goes away."""

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
from slimserve.serve.replica import early_start

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
    """Ray Serve's handle to the one replica, `server`; `elsewhere`: an injected fault, the
    calls for early-started requests reach a replica that never got them."""

    def __init__(self, server: Any, elsewhere: bool = False) -> None:
        self.server = server
        self.generate = self
        self.stats = _Stats(server)
        self.payloads: list[dict] = []
        self.elsewhere = elsewhere

    def options(self, stream: bool) -> _Handle:
        return self

    def remote(self, payload: dict) -> _ServeCall:
        self.payloads.append(payload)
        if self.elsewhere and payload["early"]:
            payload = payload | {"reply_to": payload["reply_to"] | {"stream": 10**9}}
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


async def _backend(
    server: Any, inbox: EventInbox, elsewhere: bool = False, attach_after_s: float = 0.0
) -> tuple[RayBackend, _Handle]:
    handle = _Handle(server, elsewhere)
    backend = RayBackend("child", handle, inbox, early_start=True, attach_after_s=attach_after_s)
    stats = await backend.stats()  # opens the replica's door and learns it
    assert "door" not in stats  # the door is the backend's, never a client's
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


def _stream_into(inbox: EventInbox, monkeypatch: Any, make: Callable[[], asyncio.Queue]) -> None:
    """Injected: each stream the inbox opens puts its events into the queue `make` gives."""
    open_stream = inbox.open

    def open_into() -> tuple[Any, asyncio.Queue]:
        reply_to, _ = open_stream()
        queue = make()
        inbox._streams[reply_to.stream] = (asyncio.get_running_loop(), queue)
        return reply_to, queue

    monkeypatch.setattr(inbox, "open", open_into)


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
def test_a_request_starts_at_the_door_and_its_serve_call_attaches(
    server, loop, inbox, request_, sender
):
    async def scenario():
        backend, handle = await _backend(server, inbox)
        before = _counts(server)
        events = await _collect(backend, request_)
        change = _change(before, server)
        await _until(lambda: _idle(server))
        return events, handle.payloads, change, await _plain_text(server, request_)

    events, payloads, change, plain = loop.run_until_complete(scenario())
    assert events[0].kind == "accepted" and events[-1].kind == "done"
    assert all(e.kind not in ("attached", "unattached") for e in events)
    assert [p["early"] for p in payloads] == [True]
    assert change == {"early_started": 1, sender: 1}
    assert _text(events) == plain


def test_a_request_that_ends_before_its_attach_time_takes_no_serve_call(server, loop, inbox):
    async def scenario():
        backend, handle = await _backend(server, inbox, attach_after_s=60.0)
        before = _counts(server)
        events = await _collect(backend, GREEDY)
        await _until(lambda: _idle(server))  # the gateway's word freed its place at the door
        return events, handle.payloads, _change(before, server), await _plain_text(server, GREEDY)

    events, payloads, change, plain = loop.run_until_complete(scenario())
    assert payloads == []
    assert change == {"early_started": 1, "from_engine": 1}
    assert events[-1].kind == "done" and _text(events) == plain


class _EndAfterServeCall(asyncio.Queue):
    """Injected order: a stream's end waits until its Serve call was made, so the request
    outlives its attach time however fast the engine is."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []
        self.called = False

    def put_nowait(self, item: Any) -> None:
        if not self.called and (getattr(item, "kind", None) == "done" or self.held):
            self.held.append(item)
        else:
            super().put_nowait(item)

    def serve_call_made(self) -> None:
        self.called = True
        for item in self.held:
            super().put_nowait(item)
        self.held.clear()


def test_a_request_that_outlives_its_attach_time_gets_its_serve_call(
    server, loop, inbox, monkeypatch
):
    held = _EndAfterServeCall()
    _stream_into(inbox, monkeypatch, lambda: held)

    async def scenario():
        backend, handle = await _backend(server, inbox, attach_after_s=0.05)
        remote = handle.remote

        def remote_then_release(payload: dict) -> _ServeCall:
            call = remote(payload)
            held.serve_call_made()
            return call

        handle.remote = remote_then_release
        before = _counts(server)
        events = await asyncio.wait_for(_collect(backend, GREEDY), 30)
        await _until(lambda: _idle(server))
        return events, handle.payloads, _change(before, server)

    events, payloads, change = loop.run_until_complete(scenario())
    assert [p["early"] for p in payloads] == [True]
    assert change == {"early_started": 1, "from_engine": 1}
    assert events[-1].kind == "done"


def test_a_replica_gone_before_the_attach_time_ends_the_stream_as_a_lost_replica(
    server, loop, inbox, monkeypatch
):
    held = _EndAfterServeCall()  # the answer's end never comes: the replica "died" first
    _stream_into(inbox, monkeypatch, lambda: held)

    async def scenario():
        backend, handle = await _backend(server, inbox, attach_after_s=0.1)
        # Injected: its replica went away with the request, once the request has started.
        backend._door.gone = lambda: bool(held.held)
        events = await asyncio.wait_for(_collect(backend, GREEDY), 30)
        await _until(lambda: _idle(server))
        return events, handle.payloads

    events, payloads = loop.run_until_complete(scenario())
    assert payloads == []  # no Serve call to a replica that cannot have the request
    assert events[-1].kind == "error" and events[-1].error.code == "variant_unavailable"
    assert any(e.kind == "delta" for e in events)


def test_a_start_that_never_reaches_the_door_is_asked_again_without_it(
    server, loop, inbox, monkeypatch
):
    monkeypatch.setattr(early_start, "ATTACH_GRACE_S", 0.2)

    async def scenario():
        backend, handle = await _backend(server, inbox)
        before = _counts(server)
        door = backend._door
        send = door.send
        # Injected fault: the start is lost on the way, so the Serve call finds nothing.
        door.send = lambda message: message[0] == "start" or send(message)
        events = await _collect(backend, GREEDY)
        change = _change(before, server)
        return events, handle.payloads, change, backend._door, await _plain_text(server, GREEDY)

    events, payloads, change, door_after, plain = loop.run_until_complete(scenario())
    assert [p["early"] for p in payloads] == [True, False]
    assert change == {"early_unattached": 1, "from_engine": 1}
    assert door_after is None  # dropped: the next stats answer names the door to use
    assert events[-1].kind == "done" and _text(events) == plain


class _EndAfterUnattached(asyncio.Queue):
    """Injected order: a stream's end (and anything after it) waits until the Serve call's
    "unattached" is in, which on a fast machine the engine's last token may well beat."""

    def __init__(self) -> None:
        super().__init__()
        self._held: list[Any] = []
        self._unattached = False

    def put_nowait(self, item: Any) -> None:
        kind = getattr(item, "kind", None)
        if kind == "unattached":
            self._unattached = True
            super().put_nowait(item)
            for held in self._held:
                super().put_nowait(held)
            self._held.clear()
        elif not self._unattached and (kind == "done" or self._held):
            self._held.append(item)
        else:
            super().put_nowait(item)


def test_a_serve_call_that_misses_after_tokens_went_out_leaves_the_request_running(
    server, loop, inbox, monkeypatch
):
    monkeypatch.setattr(early_start, "ATTACH_GRACE_S", 0.05)
    _stream_into(inbox, monkeypatch, _EndAfterUnattached)

    async def scenario():
        backend, handle = await _backend(server, inbox, elsewhere=True)
        before = _counts(server)
        events = await _collect(backend, LONG)
        await _until(lambda: not server.early._early)  # the gateway's abort freed its place
        return events, handle.payloads, _change(before, server), await _plain_text(server, LONG)

    events, payloads, change, plain = loop.run_until_complete(scenario())
    assert [p["early"] for p in payloads] == [True]  # not asked again: tokens had gone out
    assert change == {"early_started": 1, "early_unattached": 1, "from_engine": 1}
    assert events[-1].kind == "done" and events[-1].completion_tokens == 240
    assert _text(events) == plain


def test_a_request_that_ends_before_its_serve_call_misses_leaves_no_place_taken(
    server, loop, inbox, monkeypatch
):
    """The other order: the answer is whole before the Serve call (to another replica) says
    it never got the request, so the gateway has nothing left to abort; the replica frees the
    place itself, and forgets the request once no call can want it."""
    monkeypatch.setattr(early_start, "ATTACH_GRACE_S", 0.05)
    monkeypatch.setattr(early_start, "FORGET_AFTER_S", 0.2)

    async def scenario():
        backend, handle = await _backend(server, inbox, elsewhere=True)
        answered = asyncio.Event()
        remote = handle.remote

        def remote_after_the_answer(payload: dict) -> _ServeCall:
            async def items() -> AsyncIterator[list[dict]]:
                await answered.wait()  # injected: the call is late
                async for batch in remote(payload):
                    yield batch

            return _ServeCall(items())

        handle.remote = remote_after_the_answer
        before = _counts(server)
        events = await _collect(backend, GREEDY)
        await _until(lambda: all(e.task.done() for e in server.early._early.values()))
        taken_after_the_answer = server.early._unattached()
        answered.set()
        await _until(lambda: _counts(server)["early_unattached"] > before["early_unattached"])
        await _until(lambda: not server.early._early)
        return events, taken_after_the_answer, _change(before, server)

    events, taken, change = loop.run_until_complete(scenario())
    assert events[-1].kind == "done"
    assert taken == 0
    assert change == {"early_started": 1, "early_unattached": 1, "from_engine": 1}


def test_a_full_replica_refuses_early_starts_and_the_serve_call_runs_them(
    server, loop, inbox, monkeypatch
):
    async def scenario():
        backend, _ = await _backend(server, inbox)
        monkeypatch.setattr(server.early, "_max_ongoing", 0)  # no room for early starts
        before = _counts(server)
        events = await _collect(backend, GREEDY)
        return events, _change(before, server), await _plain_text(server, GREEDY)

    events, change, plain = loop.run_until_complete(scenario())
    assert change == {"early_refused": 1, "from_engine": 1}
    assert events[-1].kind == "done" and _text(events) == plain


def test_a_burst_the_door_cannot_take_at_once_waits_and_goes_through_in_order(server, loop, inbox):
    """Messages the door's socket cannot take at once wait at the gateway, in order, until
    the replica reads: none is lost and the door stays open (the first version closed it,
    which aborted what had started there)."""

    async def scenario():
        backend, _ = await _backend(server, inbox)
        door = backend._door
        padding = "x" * 4096  # aborts of requests that never were: harmless, and bulky
        burst = [("abort", (f"{padding}{n}", n)) for n in range(2000)]
        accepted = [door.send(message) for message in burst]  # no turn of the loop between
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


def test_a_caller_that_leaves_aborts_the_early_request_in_the_engine(server, loop, inbox):
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


def test_a_gateway_that_goes_away_aborts_what_it_started_early(server, loop, inbox):
    async def scenario():
        await server.stats()
        before = await _finished_when_idle(server)
        door = ReplicaDoor.model_validate(server.early.door.model_dump())
        reply_to, events = inbox.open()
        connection = await asyncio.to_thread(connect, door)
        asked = LONG.model_copy(update={"reply_to": reply_to})
        connection.send(("start", asked.model_dump()))
        first = await asyncio.wait_for(events.get(), 30)
        assert first.kind == "accepted"  # running, with no Serve call attached yet
        connection.close()
        return await _finished_when_idle(server) - before

    assert loop.run_until_complete(scenario()) == 1  # the short one only: LONG was aborted


def test_a_graceful_stop_lets_early_starts_end_and_refuses_new_ones(
    server, loop, inbox, monkeypatch
):
    loop.run_until_complete(server.stats())  # opens the door
    early = server.early
    monkeypatch.setattr(early, "_draining", False)  # restored for the tests after
    gate = asyncio.Event()
    run = early._run

    def held_run(request: GenerateRequest) -> Any:
        async def held() -> None:
            await gate.wait()  # injected: the request is still running when the stop comes
            await run(request)

        return held()

    monkeypatch.setattr(early, "_run", held_run)

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
        await _until(lambda: _counts(server)["early_refused"] > counts["early_refused"])
        waited_for_it = not draining.done()
        gate.set()
        await draining
        ended = [await asyncio.wait_for(first_events.get(), 30)]
        while ended[-1].kind not in ("done", "error"):
            ended.append(await asyncio.wait_for(first_events.get(), 30))
        for reply_to in (first, late):  # no Serve call will claim them
            connection.send(("abort", (reply_to.address, reply_to.stream)))
        await _until(lambda: not early._early)
        connection.close()
        return waited_for_it, ended

    waited_for_it, ended = loop.run_until_complete(scenario())
    assert waited_for_it  # the stop waits while the request runs
    assert ended[-1].kind == "done" and ended[-1].completion_tokens == 6  # ran to its end


@pytest.mark.parametrize(
    ("deployment", "server", "early"),
    [
        ({}, {}, True),
        ({"replicas": 2}, {}, False),  # Serve's call may reach another replica than the door's
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 2}}, {}, False),
        ({"early_start": False}, {}, False),
        ({}, {"direct_streams": False}, False),  # no inbox for the events to go to
    ],
)
def test_requests_start_early_only_for_a_variant_of_one_replica(
    tiny_model_dir, deployment, server, early
):
    config = online_config(
        tiny_model_dir, variants={"v": {"deployment": deployment}}, routing={}, server=server
    )
    assert early_starts(config, "v") is early
