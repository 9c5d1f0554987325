"""Streams whose events go to the gateway's inbox. The gateway's side (RayBackend with an
inbox), with faults injected on purpose through a stand-in for Ray Serve's handle: a Serve call
that ends while the stream's end never reaches the inbox, a Serve call that fails, a caller that
leaves. The variant replica's side, on real VariantServers of a tiny model: the engine process
or the replica sends the events, or, from another node, Serve's stream carries them. The whole
path through Ray Serve is tested in tests/integration/test_gateway_e2e.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from slimserve.serve.api import backends
from slimserve.serve.api.backends import RayBackend
from slimserve.serve.engine.event_channel import EventInbox, connect
from slimserve.serve.engine.types import EngineEvent, GenerateRequest, ReplyTo, SamplingParams

from .online_helpers import online_config, variant_servers

LOGPROBS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)


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


def test_without_an_inbox_no_request_names_one():
    async def replica(reply_to: ReplyTo | None) -> None:
        assert reply_to is None

    async def scenario():
        handle = _Handle(replica)
        events = [e async for e in RayBackend("full", handle).generate(REQUEST)]
        return events, handle.calls[0]

    events, call = asyncio.run(scenario())
    assert call.payload["reply_to"] is None and events == []


# ---- the variant replica's side: who sends the events --------------------------------------


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """The same variant with its engine in its own process and in the replica's process."""
    config = online_config(
        tiny_model_dir,
        variants={"child": {}, "here": {"engine": {"separate_process": False}}},
        routing={},
    )
    built = variant_servers(config)
    for server in built.values():
        server.node_id = "node-a"  # outside Ray: the node the test's inbox says it is on
    yield built
    for server in built.values():
        server.engine.shutdown()
        server.outlets.close()


def _generate(server, request: GenerateRequest):
    async def scenario():
        inbox = EventInbox("node-a")
        try:
            reply_to, events = inbox.open()
            asked = request.model_copy(update={"reply_to": reply_to})
            through_serve = [b async for b in server.generate(asked.model_dump())]
            received = []
            while not received or received[-1].kind not in ("done", "error"):
                received.append(await asyncio.wait_for(events.get(), 30))
            return through_serve, received
        finally:
            inbox.shutdown()

    return asyncio.run(scenario())


GREEDY = GenerateRequest(
    request_id="g",
    prompt_token_ids=[1, 5, 9, 200, 31],
    sampling=SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
)


@pytest.mark.parametrize(
    ("variant", "sender", "request_"),
    [
        ("child", "from_engine", GREEDY),
        ("here", "from_replica", GREEDY),
        # Log-probabilities are labelled with token texts in the replica: it sends them.
        ("child", "from_replica", GREEDY.model_copy(update={"sampling": LOGPROBS})),
    ],
)
def test_the_events_reach_the_inbox_and_nothing_comes_through_serve(
    servers, variant, sender, request_
):
    server = servers[variant]
    before = dict(server.streams)
    through_serve, received = _generate(server, request_)
    assert through_serve == []
    assert received[0].kind == "accepted" and received[-1].kind == "done"
    assert sum(e.tokens for e in received if e.kind == "delta") == 6
    if request_.sampling.logprobs is not None:
        labelled = [lp for e in received if e.kind == "delta" for lp in e.logprobs]
        assert len(labelled) == 6 and all(lp.token for lp in labelled)
    assert server.streams[sender] == before[sender] + 1


def test_a_request_from_another_node_comes_through_serve(servers):
    server = servers["here"]
    before = server.streams["through_serve"]

    async def scenario():
        inbox = EventInbox("node-b")
        try:
            reply_to, events = inbox.open()
            asked = GREEDY.model_copy(update={"reply_to": reply_to})
            return [b async for b in server.generate(asked.model_dump())], events
        finally:
            inbox.shutdown()

    batches, events = asyncio.run(scenario())
    kinds = [item["kind"] for batch in batches for item in batch]
    assert kinds[0] == "accepted" and kinds[-1] == "done" and events.empty()
    assert server.streams["through_serve"] == before + 1
