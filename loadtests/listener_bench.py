"""CPU a message costs the process that receives it: the gateway's inbox as it reads now (the
event loop reads each connection, serve/engine/message_listener.py) against a thread blocked
on each connection that hands every message to the loop (how it read before).

    python -m slimserve.loadtests.listener_bench --messages 2000 --interval-ms 2

A separate process sends one token's event every --interval-ms, as an engine process does at
one stream; the receiver's CPU time (user + system) is divided by the messages it got.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import resource
import threading
import time
from multiprocessing.connection import Connection, Listener

from pydantic import BaseModel

from slimserve.serve.engine.event_channel import connect
from slimserve.serve.engine.message_listener import MessageListener
from slimserve.serve.engine.types import EngineEvent, ReplyTo
from slimserve.serve.logs import configure_logging

log = logging.getLogger("slimserve.loadtests.listener_bench")

_END = ("end", None)


class ListenerRow(BaseModel):
    reader: str
    messages: int
    cpu_us_per_message: float


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _send(target: ReplyTo, messages: int, interval_s: float) -> None:
    event = EngineEvent(kind="delta", text=" token", tokens=1, token_ids=[1234])
    with connect(target) as connection:
        for _ in range(messages):
            connection.send(("events", [(0, event)]))
            time.sleep(interval_s)
        connection.send(_END)


def _target(address: str, authkey: bytes) -> ReplyTo:
    return ReplyTo(address=address, authkey=authkey.hex(), node_id="bench", stream=0)


async def _on_the_loop(messages: int, interval_s: float) -> int:
    loop = asyncio.get_running_loop()
    received: asyncio.Queue = asyncio.Queue()
    listener = MessageListener("bench", lambda _, message: received.put_nowait(message), loop=loop)
    try:
        target = _target(listener.address, listener.authkey)
        return await _count(target, received, messages, interval_s)
    finally:
        listener.shutdown()


async def _thread_per_connection(messages: int, interval_s: float) -> int:
    loop = asyncio.get_running_loop()
    received: asyncio.Queue = asyncio.Queue()
    authkey = b"listener-bench-key"
    listener = Listener(f"\0slimserve-bench-{time.monotonic_ns()}", "AF_UNIX", authkey=authkey)

    def read(connection: Connection) -> None:
        while (message := connection.recv()) != _END:
            loop.call_soon_threadsafe(received.put_nowait, message)
        loop.call_soon_threadsafe(received.put_nowait, message)

    threading.Thread(target=lambda: read(listener.accept()), daemon=True).start()
    try:
        return await _count(_target(listener.address, authkey), received, messages, interval_s)
    finally:
        listener.close()


async def _count(target: ReplyTo, received: asyncio.Queue, messages: int, interval: float) -> int:
    sender = multiprocessing.get_context("spawn").Process(
        target=_send, args=(target, messages, interval)
    )
    sender.start()
    count = 0
    while await received.get() != _END:
        count += 1
    sender.join()
    return count


def measure(reader: str, messages: int, interval_s: float) -> ListenerRow:
    run = _on_the_loop if reader == "event loop" else _thread_per_connection
    before = _cpu_s()
    got = asyncio.run(run(messages, interval_s))
    spent = _cpu_s() - before
    return ListenerRow(reader=reader, messages=got, cpu_us_per_message=1e6 * spent / got)


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--interval-ms", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for _ in range(args.rounds):
        for reader in ("thread per connection", "event loop"):
            row = measure(reader, args.messages, args.interval_ms / 1000)
            log.info(row.model_dump_json())
            rows.append(row)
    lines = ["| reader | messages | CPU us per message |", "|---|---|---|"]
    lines += [f"| {r.reader} | {r.messages} | {r.cpu_us_per_message:.1f} |" for r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
