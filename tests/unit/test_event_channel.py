"""The gateway's event inbox on its own: events reach the queue of the stream they name, in
order; a stream closed by its caller drops what still comes; a peer without the key is refused
and the inbox goes on serving; messages are cut out of the bytes however they arrive, on the
event loop. A replica's outlet writes from its event loop, with no thread: a burst past the
socket's buffer arrives whole and in order, also when the outlet is closed right after it, and
an inbox that went away is noticed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import threading
from collections.abc import Iterator
from multiprocessing import AuthenticationError

import pytest

from slimserve.serve.engine.event_channel import EventInbox, EventOutlets, connect
from slimserve.serve.engine.message_listener import framed
from slimserve.serve.engine.types import EngineEvent


@contextlib.contextmanager
def _inbox() -> Iterator[EventInbox]:
    inbox = EventInbox("node-a")
    try:
        yield inbox
    finally:
        inbox.shutdown()


def _delta(text: str) -> EngineEvent:
    return EngineEvent(kind="delta", text=text, tokens=1)


async def _next(queue: asyncio.Queue) -> EngineEvent:
    return await asyncio.wait_for(queue.get(), 5)


def test_events_reach_the_stream_they_name_in_order() -> None:
    async def scenario() -> None:
        with _inbox() as inbox:
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

    asyncio.run(scenario())


def test_a_peer_without_the_key_is_refused_and_the_inbox_serves_on() -> None:
    async def scenario() -> None:
        with _inbox() as inbox:
            reply_to, events = inbox.open()
            wrong = reply_to.model_copy(update={"authkey": "00" * 16})
            with pytest.raises(AuthenticationError):
                await asyncio.to_thread(connect, wrong)
            with connect(reply_to) as sender:
                sender.send(("events", [(reply_to.stream, _delta("still here"))]))
                assert (await _next(events)).text == "still here"

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


def test_messages_are_whole_however_the_bytes_arrive() -> None:
    """A large message comes over many reads, a small one byte by byte, and two in one write."""

    async def scenario() -> None:
        with _inbox() as inbox:
            reply_to, events = inbox.open()
            large = "x" * 300_000 + "end"
            with connect(reply_to) as sender:
                # From a thread: more than the socket holds, so the send waits on the loop's reads.
                message = ("events", [(reply_to.stream, _delta(large))])
                await asyncio.to_thread(sender.send, message)
                assert (await _next(events)).text == large
                for byte in framed(("events", [(reply_to.stream, _delta("drip"))])):
                    os.write(sender.fileno(), bytes([byte]))
                    await asyncio.sleep(0)  # let the loop read what came so far
                assert (await _next(events)).text == "drip"
                two = [("events", [(reply_to.stream, _delta(t))]) for t in ("one", "two")]
                os.write(sender.fileno(), b"".join(framed(m) for m in two))
                assert [(await _next(events)).text for _ in range(2)] == ["one", "two"]

    asyncio.run(scenario())


def test_an_unreadable_message_closes_its_connection_only() -> None:
    async def scenario() -> None:
        with _inbox() as inbox:
            reply_to, events = inbox.open()
            with connect(reply_to) as garbled, connect(reply_to) as sound:
                os.write(garbled.fileno(), struct.pack("!i", 3) + b"\x80zz")  # not a pickle
                with pytest.raises(EOFError):  # the inbox closed that connection
                    await asyncio.to_thread(garbled.recv)
                sound.send(("events", [(reply_to.stream, _delta("still here"))]))
                assert (await _next(events)).text == "still here"

    asyncio.run(scenario())


def test_connections_are_read_on_the_event_loop_not_by_threads() -> None:
    async def scenario() -> None:
        with _inbox() as inbox:
            reply_to, events = inbox.open()
            threads = threading.active_count()
            with connect(reply_to) as first, connect(reply_to) as second:
                for sender, text in ((first, "a"), (second, "b")):
                    sender.send(("events", [(reply_to.stream, _delta(text))]))
                assert {(await _next(events)).text for _ in range(2)} == {"a", "b"}
                assert threading.active_count() == threads

    asyncio.run(scenario())


def test_an_outlet_writes_a_burst_from_the_loop_in_order_and_closes_after_the_last() -> None:
    async def scenario() -> None:
        with _inbox() as inbox:
            reply_to, events = inbox.open()
            threads = threading.active_count()
            outlets = EventOutlets()
            outlet = outlets.outlet_for(reply_to)
            texts = [f"{i}:" + "x" * 20_000 for i in range(200)]  # ~4 MB: past the buffer
            for text in texts:
                assert outlet.send([(reply_to.stream, _delta(text))])
            outlets.close()  # before the inbox read most of it
            assert threading.active_count() == threads
            assert [(await _next(events)).text for _ in texts] == texts
            assert outlet.gone()  # closed once the last byte went

    asyncio.run(scenario())


def test_an_outlet_learns_that_its_inbox_went_away() -> None:
    async def scenario() -> None:
        inbox = EventInbox("node-a")
        reply_to, events = inbox.open()
        outlet = EventOutlets().outlet_for(reply_to)
        assert outlet.send([(reply_to.stream, _delta("a"))])
        assert (await _next(events)).text == "a"
        inbox.shutdown()
        for _ in range(100):
            if outlet.gone():
                break
            await asyncio.sleep(0.01)
        assert outlet.gone()
        for _ in range(3):  # the first writes may still land in the socket's buffer
            outlet.send([(reply_to.stream, _delta("lost"))])
        assert not outlet.send([(reply_to.stream, _delta("lost"))])

    asyncio.run(scenario())
