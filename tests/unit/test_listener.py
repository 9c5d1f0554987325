"""The gateway replica's own HTTP listener: real uvicorn, real HTTP, a stream in flight."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from slimserve.serve.api.listener import GatewayListener
from slimserve.serve.ports import bound_socket

from .online_helpers import free_port

LINES = [str(i) for i in range(10)]


def _counting_app() -> FastAPI:
    app = FastAPI()

    @app.get("/count")
    async def count() -> StreamingResponse:
        async def body():
            for line in LINES:
                yield line + "\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(body())

    return app


def test_a_drain_finishes_the_stream_in_flight_and_takes_no_new_connection():
    port = free_port()
    url = f"http://127.0.0.1:{port}/count"

    async def scenario() -> tuple[list[str], bool]:
        listener = GatewayListener(_counting_app(), "127.0.0.1", port)
        while not listener.server.started:
            await asyncio.sleep(0.01)
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("GET", url) as response,
        ):
            lines = response.aiter_lines()
            received = [await anext(lines)]
            drain = asyncio.create_task(listener.drain())
            await asyncio.sleep(0.2)  # the listening socket is closed by now
            async with httpx.AsyncClient(timeout=5) as newcomer:
                try:
                    await newcomer.get(url)
                    refused = False
                except httpx.ConnectError:
                    refused = True
            received += [line async for line in lines]
        await drain
        return received, refused

    received, refused = asyncio.run(scenario())
    assert received == LINES
    assert refused


def test_a_port_left_in_time_wait_binds_again_and_a_listening_one_does_not():
    """A restarted gateway replica binds the port its killed predecessor's connections still
    hold in TIME_WAIT; a port another process listens on fails the start."""
    port = free_port()

    async def serve_one_request_then_stop() -> None:
        listener = GatewayListener(_counting_app(), "127.0.0.1", port)
        while not listener.server.started:
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"http://127.0.0.1:{port}/count")).status_code == 200
            # The kept-alive connection is closed by the server: its side waits in TIME_WAIT.
            await listener.drain()

    asyncio.run(serve_one_request_then_stop())
    bound_socket("127.0.0.1", port).close()

    held = bound_socket("127.0.0.1", port)
    held.listen()
    try:
        with pytest.raises(OSError):
            bound_socket("127.0.0.1", port)
    finally:
        held.close()
