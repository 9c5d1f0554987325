"""The gateway's event inbox on its own: events reach the queue of the stream they name, in
order; a stream closed by its caller drops what still comes; a peer without the key is refused
and the inbox goes on serving."""

from __future__ import annotations

import asyncio
from multiprocessing import AuthenticationError

import pytest

from slimserve.serve.engine.event_channel import EventInbox, connect
from slimserve.serve.engine.types import EngineEvent


def _delta(text: str) -> EngineEvent:
    return EngineEvent(kind="delta", text=text, tokens=1)


async def _next(queue: asyncio.Queue) -> EngineEvent:
    return await asyncio.wait_for(queue.get(), 5)


def test_events_reach_the_stream_they_name_in_order() -> None:
    async def scenario() -> None:
        inbox = EventInbox("node-a")
        try:
            first, first_events = inbox.open()
            second, second_events = inbox.open()
            closed, _ = inbox.open()
            inbox.close(closed.stream)
            assert first.node_id == "node-a" and first.address.startswith("\0")
            assert len({first.stream, second.stream, closed.stream}) == 3
            with connect(first) as sender:
                sender.send(("events", [(first.stream, _delta("a")), (second.stream, _delta("x"))]))
                sender.send(("events", [(closed.stream, _delta("lost"))]))
                sender.send(("events", [(first.stream, _delta("b"))]))
                sender.send(("events", [(second.stream, EngineEvent(kind="done"))]))
                assert [(await _next(first_events)).text for _ in range(2)] == ["a", "b"]
                assert (await _next(second_events)).text == "x"
                assert (await _next(second_events)).kind == "done"
            assert first_events.empty() and second_events.empty()
        finally:
            inbox.shutdown()

    asyncio.run(scenario())


def test_a_peer_without_the_key_is_refused_and_the_inbox_serves_on() -> None:
    async def scenario() -> None:
        inbox = EventInbox("node-a")
        try:
            reply_to, events = inbox.open()
            wrong = reply_to.model_copy(update={"authkey": "00" * 16})
            with pytest.raises(AuthenticationError):
                await asyncio.to_thread(connect, wrong)
            with connect(reply_to) as sender:
                sender.send(("events", [(reply_to.stream, _delta("still here"))]))
                assert (await _next(events)).text == "still here"
        finally:
            inbox.shutdown()

    asyncio.run(scenario())


def test_shutting_the_inbox_down_closes_its_connections() -> None:
    async def scenario() -> None:
        inbox = EventInbox("node-a")
        reply_to, events = inbox.open()
        sender = connect(reply_to)
        sender.send(("events", [(reply_to.stream, _delta("a"))]))
        assert (await _next(events)).text == "a"
        inbox.shutdown()
        with pytest.raises(EOFError):  # the engine side learns the gateway is gone
            await asyncio.to_thread(sender.recv)
        sender.close()

    asyncio.run(scenario())
