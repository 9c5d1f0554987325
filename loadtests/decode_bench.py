"""Decode throughput per variant through the real gateway (HTTP, streaming).

    python -m slimserve.loadtests.decode_bench --url http://127.0.0.1:8000 --variants full int8

Each variant is pinned by model name; every request generates exactly --tokens tokens
(ignore_eos), so rows compare like with like. Prints one table row per (variant, concurrency).

The streamed requests go through aiohttp: on a small host the load generator shares the CPUs
with the server it measures, and httpx's async client spends more of them per request than
aiohttp does (its first token came 0.4-2.1 ms later in three runs of four, loadtests/README.md,
"The measuring client").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
from pydantic import BaseModel

from slimserve.serve.logs import configure_logging

log = logging.getLogger("slimserve.loadtests.decode_bench")

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List some good habits for writing maintainable software and explain each.",
    "Describe the water cycle in detail.",
]


class BenchRow(BaseModel):
    variant: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    output_tokens_per_s: float
    per_stream_tokens_per_s: float  # median over requests, after the first token
    ttft_p50_ms: float


def sse_chunk(line: bytes) -> dict | None:
    """The JSON chunk one SSE line carries; None for a blank line and for `[DONE]`."""
    line = line.rstrip(b"\r\n")
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        return None
    return json.loads(line[6:])


def has_content(chunk: dict) -> bool:
    """Whether a chat chunk's delta carries text (the role chunk's content is empty)."""
    return bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))


async def _one(session: aiohttp.ClientSession, url: str, model: str, prompt: str, tokens: int):
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    usage = None
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:  # one SSE line at a time
            chunk = sse_chunk(line)
            if chunk is None:
                continue
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and has_content(chunk):
                first = time.perf_counter()
    ended = time.perf_counter()
    generated = usage["completion_tokens"]
    decode_rate = (generated - 1) / (ended - first) if first and ended > first else 0.0
    return generated, (first or ended) - started, decode_rate


# One request's result: (generated tokens, seconds to first token, decode tokens/s after it).
RequestResult = tuple[int, float, float]


async def closed_loop(
    one: Callable[[int], Awaitable[RequestResult]],
    variant: str,
    concurrency: int,
    requests: int,
) -> BenchRow:
    """`concurrency` workers issue `requests` requests back to back; one row of figures."""
    queue = list(range(requests))
    results: list[RequestResult] = []

    async def worker() -> None:
        while queue:
            results.append(await one(queue.pop()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    total = sum(r[0] for r in results)
    return BenchRow(
        variant=variant,
        concurrency=concurrency,
        requests=requests,
        output_tokens=total,
        seconds=round(seconds, 2),
        output_tokens_per_s=round(total / seconds, 1),
        per_stream_tokens_per_s=round(statistics.median(r[2] for r in results), 1),
        ttft_p50_ms=round(statistics.median(r[1] for r in results) * 1000, 1),
    )


def streaming_session(concurrency: int, keep_alive: bool = True) -> aiohttp.ClientSession:
    """The client the closed loop streams through: a connection per stream (and a few spare),
    kept alive between requests unless `keep_alive` is off."""
    connector = aiohttp.TCPConnector(limit=concurrency + 4, force_close=not keep_alive)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))


async def bench_variant(
    url: str, model: str, variant: str, concurrency: int, requests: int, tokens: int
) -> BenchRow:
    async with streaming_session(concurrency) as session:
        await _one(session, url, model, PROMPTS[0], 4)  # warm-up
        return await closed_loop(
            lambda index: _one(session, url, model, PROMPTS[index % len(PROMPTS)], tokens),
            variant,
            concurrency,
            requests,
        )


def render(rows: list[BenchRow]) -> str:
    head = "| variant | concurrency | requests | output tok/s | per-stream tok/s | TTFT p50 ms |"
    lines = [head, "|---|---|---|---|---|---|"]
    lines += [
        f"| {r.variant} | {r.concurrency} | {r.requests} | {r.output_tokens_per_s} | "
        f"{r.per_stream_tokens_per_s} | {r.ttft_p50_ms} |"
        for r in rows
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[BenchRow]:
    async with httpx.AsyncClient() as client:
        public = (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
    rows = []
    for variant in args.variants:
        for concurrency in args.concurrency:
            requests = max(args.requests_per_stream * concurrency, concurrency)
            row = await bench_variant(
                args.url, f"{public}:{variant}", variant, concurrency, requests, args.tokens
            )
            log.info("%s", row.model_dump_json())
            rows.append(row)
    return rows


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--variants", nargs="+", default=["full", "int8"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    print(render(rows))


if __name__ == "__main__":
    main()
