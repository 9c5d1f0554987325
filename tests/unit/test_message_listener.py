"""A MessageListener's answers on a connection (a variant replica's door answers the gateway
with them): real Unix sockets, a real peer."""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Client, Connection

from slimserve.serve.engine.message_listener import MAX_PENDING_ANSWER_BYTES, MessageListener

PADDING = "x" * 4096


def _next(peer: Connection) -> object:
    """The peer's next message; None when none comes within 10 s."""
    return peer.recv() if peer.poll(10) else None


async def _listener_and_peer() -> tuple[MessageListener, Connection, int, asyncio.Queue]:
    """A listener, a peer connected to it, the peer's connection number, and the numbers of
    the connections the listener saw close."""
    loop = asyncio.get_running_loop()
    heard: asyncio.Queue = asyncio.Queue()
    closed: asyncio.Queue = asyncio.Queue()
    listener = MessageListener(
        "test", lambda number, _: heard.put_nowait(number), closed.put_nowait, loop
    )
    peer = await asyncio.to_thread(
        Client, listener.address, family="AF_UNIX", authkey=listener.authkey
    )
    peer.send("hello")
    number = await asyncio.wait_for(heard.get(), 10)
    return listener, peer, number, closed


def test_answers_reach_the_peer_whole_and_in_order_past_a_full_socket():
    count = (MAX_PENDING_ANSWER_BYTES // 2) // len(PADDING)  # more than a socket takes at once

    async def scenario() -> tuple[list[bool], list[tuple[int, str]], bool]:
        listener, peer, number, _ = await _listener_and_peer()
        sent = [listener.send(number, (i, PADDING)) for i in range(count)]  # no turn of the loop
        received = []
        while len(received) < count and (message := await asyncio.to_thread(_next, peer)):
            received.append(message)
        peer.close()
        listener.shutdown()
        return sent, received, listener.send(number + 1, ("nobody", ""))

    sent, received, to_nobody = asyncio.run(scenario())
    assert all(sent)
    assert received == [(i, PADDING) for i in range(count)]
    assert not to_nobody  # no such connection


def test_a_peer_that_stops_reading_is_dropped_once_too_much_waits():
    limit = 4 * MAX_PENDING_ANSWER_BYTES // len(PADDING)

    async def scenario() -> tuple[int, int, int, bool]:
        listener, peer, number, closed = await _listener_and_peer()
        sent = 0
        while sent < limit and listener.send(number, (sent, PADDING)):  # the peer never reads
            sent += 1
        dropped = await asyncio.wait_for(closed.get(), 10)
        after = listener.send(number, ("late", ""))
        peer.close()
        listener.shutdown()
        return sent, number, dropped, after

    sent, number, dropped, after = asyncio.run(scenario())
    assert sent < limit  # given up...
    assert sent * len(PADDING) >= MAX_PENDING_ANSWER_BYTES  # ...once it held all it may
    assert dropped == number and not after
