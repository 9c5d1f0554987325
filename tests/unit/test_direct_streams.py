"""The gateway's side of a forwarded stream (RayBackend with an inbox), with faults injected on
purpose through a stand-in for Ray Serve's handle: a Serve call that ends while the stream's end
never reaches the inbox, a Serve call that fails, a caller that leaves. The real path (Ray
Serve, the engine process) is tested in tests/integration/test_gateway_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from slimserve.serve.api import backends
from slimserve.serve.api.backends import RayBackend
from slimserve.serve.engine.event_channel import EventInbox, connect
from slimserve.serve.engine.types import EngineEvent, GenerateRequest, ReplyTo, SamplingParams


class _Call:
    """A Serve streaming call whose replica runs `replica(reply_to)` and yields nothing."""

    def __init__(self, replica: Callable[[ReplyTo], Any]) -> None:
        self.replica = replica
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[list[dict]]:
        return self._items()

    async def _items(self) -> AsyncIterator[list[dict]]:
        await self.replica(self.payload_reply_to)
        return
        yield  # an async generator that yields nothing: the engine forwarded everything

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, replica: Callable[[ReplyTo], Any]) -> None:
        self.calls: list[_Call] = []
        self.replica = replica
        self.generate = self

    def options(self, stream: bool) -> _Handle:
        return self

    def remote(self, payload: dict) -> _Call:
        call = _Call(self.replica)
        call.payload = payload
        reply_to = payload["reply_to"]
        call.payload_reply_to = None if reply_to is None else ReplyTo.model_validate(reply_to)
        self.calls.append(call)
        return call


REQUEST = GenerateRequest(request_id="r", prompt="hi", sampling=SamplingParams(max_tokens=2))


def _run(replica: Callable[[ReplyTo], Any], leave_after: int | None = None):
    async def scenario():
        inbox = EventInbox("node-a")
        handle = _Handle(replica)
        backend = RayBackend("full", handle, inbox)
        events = []
        try:
            stream = backend.generate(REQUEST)
            async for event in stream:
                events.append(event)
                if leave_after is not None and len(events) == leave_after:
                    await stream.aclose()
                    break
        finally:
            inbox.shutdown()
        return events, handle.calls[0]

    return asyncio.run(scenario())


def _send(reply_to: ReplyTo, *events: EngineEvent) -> None:
    with connect(reply_to) as sender:
        sender.send(("events", [(reply_to.stream, event) for event in events]))


def test_events_from_the_inbox_make_the_stream_and_the_serve_call_ends_on_its_own():
    async def replica(reply_to: ReplyTo) -> None:
        accepted = EngineEvent(kind="accepted", prompt_tokens=1)
        delta = EngineEvent(kind="delta", text="a", tokens=1)
        await asyncio.to_thread(_send, reply_to, accepted, delta, EngineEvent(kind="done"))

    events, call = _run(replica)
    assert [e.kind for e in events] == ["accepted", "delta", "done"]
    assert not call.cancelled


def test_a_serve_call_that_ends_without_the_stream_end_is_an_error(monkeypatch):
    monkeypatch.setattr(backends, "FORWARDED_END_GRACE_S", 0.2)

    async def replica(reply_to: ReplyTo) -> None:  # injected fault: the end is lost
        await asyncio.to_thread(_send, reply_to, EngineEvent(kind="accepted", prompt_tokens=1))

    events, _ = _run(replica)
    assert [e.kind for e in events] == ["accepted", "error"]
    assert events[-1].error.status == 500 and "never arrived" in events[-1].error.message


def test_a_failed_serve_call_ends_the_stream_with_its_error():
    async def replica(reply_to: ReplyTo) -> None:
        raise RuntimeError("the replica broke")  # injected fault

    events, _ = _run(replica)
    assert [e.kind for e in events] == ["error"]
    assert "the replica broke" in events[0].error.message


def test_a_caller_that_leaves_cancels_the_serve_call():
    async def replica(reply_to: ReplyTo) -> None:
        await asyncio.to_thread(_send, reply_to, EngineEvent(kind="accepted", prompt_tokens=1))
        await asyncio.sleep(30)  # still generating when the caller leaves

    events, call = _run(replica, leave_after=1)
    assert [e.kind for e in events] == ["accepted"]
    assert call.cancelled


def test_a_request_whose_tokens_need_labels_goes_through_the_replica():
    async def replica(reply_to: ReplyTo | None) -> None:
        assert reply_to is None

    labelled = REQUEST.model_copy(update={"echo": True})

    async def scenario():
        inbox = EventInbox("node-a")
        handle = _Handle(replica)
        try:
            events = [e async for e in RayBackend("full", handle, inbox).generate(labelled)]
        finally:
            inbox.shutdown()
        return events, handle.calls[0]

    events, call = asyncio.run(scenario())
    assert call.payload["reply_to"] is None and events == []
