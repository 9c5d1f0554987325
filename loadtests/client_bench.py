"""What the measuring client adds to TTFT: the same streamed chat requests through httpx's async
client, aiohttp and a bare socket, interleaved one request at a time on one gateway.

    python -m slimserve.loadtests.client_bench --url http://127.0.0.1:8000 --variant full

On a small host the load generator shares the CPUs with the server it measures, so a client that
spends more per request reads as serving overhead. Each client keeps one connection alive; the
clients take turns in a rotating order, so the host's drift falls on all of them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
import httpx
from pydantic import BaseModel

from slimserve.loadtests.decode_bench import has_content, sse_chunk
from slimserve.serve.logs import configure_logging

log = logging.getLogger("slimserve.loadtests.client_bench")

CLIENTS = ("httpx", "aiohttp", "socket")
# A chat chunk whose delta carries text (the role chunk's content is empty).
_CONTENT = re.compile(rb'"content": ?"[^"]')
_END = b"0\r\n\r\n"  # the last piece of a chunked HTTP body


class ClientRow(BaseModel):
    client: str
    requests: int
    ttft_p50_ms: float
    ttft_min_ms: float


def _body(model: str, index: int, tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me about the number {index}."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def _has_content(line: bytes) -> bool:
    chunk = sse_chunk(line)
    return chunk is not None and has_content(chunk)


async def _via_httpx(client: httpx.AsyncClient, url: str, body: dict) -> float:
    started, first = time.perf_counter(), None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if first is None and _has_content(line.encode()):
                first = time.perf_counter()
    return _ttft(started, first)


async def _via_aiohttp(session: aiohttp.ClientSession, url: str, body: dict) -> float:
    started, first = time.perf_counter(), None
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if first is None and _has_content(line):
                first = time.perf_counter()
    return _ttft(started, first)


class _Socket:
    """HTTP/1.1 written by hand on one kept-alive connection: no client library at all."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def request(self, body: dict) -> float:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        data = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        )
        started, first = time.perf_counter(), None
        writer.write(head.encode() + data)
        received = b""
        while not received.endswith(_END):
            piece = await reader.read(65536)
            if not piece:
                raise ConnectionError("the gateway closed the connection mid-answer")
            if not received and not piece.startswith(b"HTTP/1.1 200"):
                status = piece.split(b"\r\n", 1)[0]
                raise RuntimeError(f"the gateway answered {status!r}")
            received += piece
            if first is None and _CONTENT.search(received):
                first = time.perf_counter()
        return _ttft(started, first)

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


def _ttft(started: float, first: float | None) -> float:
    if first is None:
        raise RuntimeError("the answer carried no content")
    return first - started


async def measure(
    url: str, model: str, requests: int, warmup: int, tokens: int, gap_s: float
) -> list[ClientRow]:
    """Every client sends `requests` requests (after `warmup` uncounted ones), in turns."""
    seconds: dict[str, list[float]] = {name: [] for name in CLIENTS}
    sock = _Socket(url)
    async with httpx.AsyncClient(timeout=600) as client, aiohttp.ClientSession() as session:
        send: dict[str, Callable[[dict], Awaitable[float]]] = {
            "httpx": lambda body: _via_httpx(client, url, body),
            "aiohttp": lambda body: _via_aiohttp(session, url, body),
            "socket": sock.request,
        }
        try:
            for index in range(warmup + requests):
                turn = index % len(CLIENTS)
                for name in CLIENTS[turn:] + CLIENTS[:turn]:
                    ttft = await send[name](_body(model, index, tokens))
                    if index >= warmup:
                        seconds[name].append(ttft)
                    await asyncio.sleep(gap_s)  # the engine idle between requests, as at one stream
        finally:
            sock.close()
    return [
        ClientRow(
            client=name,
            requests=len(values),
            ttft_p50_ms=round(statistics.median(values) * 1000, 2),
            ttft_min_ms=round(min(values) * 1000, 2),
        )
        for name, values in seconds.items()
    ]


def render(rows: list[ClientRow]) -> str:
    lines = ["| client | requests | TTFT p50 ms | TTFT min ms |", "|---|---:|---:|---:|"]
    lines += [f"| {r.client} | {r.requests} | {r.ttft_p50_ms} | {r.ttft_min_ms} |" for r in rows]
    return "\n".join(lines)


async def _public_model(url: str) -> str:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--requests", type=int, default=35)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--gap-ms", type=float, default=300)
    args = parser.parse_args()
    model = f"{asyncio.run(_public_model(args.url))}:{args.variant}"
    rows = asyncio.run(
        measure(args.url, model, args.requests, args.warmup, args.tokens, args.gap_ms / 1000)
    )
    print(render(rows))  # the table is this tool's output


if __name__ == "__main__":
    main()
