"""Overload and soak against a running gateway: measure the capacity of one variant, then drive
open-loop (Poisson) arrivals at a multiple of it and report what admitted and refused requests
saw, and how the replicas' memory moved.

    python -m slimserve.loadtests.overload_bench --url http://127.0.0.1:8000 --factor 2
    python -m slimserve.loadtests.overload_bench --url http://127.0.0.1:8000 --factor 0.8 \\
        --seconds 600          # the soak

Capacity: completed requests/s of a closed loop of `--streams` streams. Overload: each request
asks, with the x-slimserve-queue-timeout header, to be dropped if it has not started within the
TTFT SLO; so admitted requests keep their TTFT within it and the rest are answered 503 at once.
The load generator runs on the same machine as the server (it takes some of its CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import time
from pathlib import Path

import httpx
from pydantic import BaseModel
from tqdm import tqdm

from slimserve.serve.logs import configure_logging

log = logging.getLogger("slimserve.loadtests.overload_bench")

PROMPT = "Write a short paragraph about the history of the lighthouse."


class Outcome(BaseModel):
    status: int  # 0: the connection failed
    seconds: float  # arrival to the end of the answer (or the refusal)
    ttft: float | None = None
    tokens: int = 0
    error_code: str | None = None
    stream_error: bool = False  # a 200 whose stream ended in an error event


class PhaseReport(BaseModel):
    offered_per_second: float
    seconds: float
    requests: int
    admitted: int
    refused_503: int
    other_errors: int
    refusal_codes: dict[str, int]
    admitted_ttft_p50: float | None
    admitted_ttft_p95: float | None
    admitted_e2e_p95: float | None
    refusal_p50_seconds: float | None
    refusal_p95_seconds: float | None
    output_tokens_per_second: float
    rss_mb: list[float]  # the variants' replicas, summed, sampled through the run


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def _one(
    client: httpx.AsyncClient, url: str, model: str, tokens: int, timeout: float
) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    started = time.perf_counter()
    ttft, count, stream_error = None, 0, False
    try:
        headers = {"x-slimserve-queue-timeout": f"{timeout:g}"}
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=headers
        ) as r:
            if r.status_code != 200:
                payload = json.loads(await r.aread())
                return Outcome(
                    status=r.status_code,
                    seconds=time.perf_counter() - started,
                    error_code=payload["error"]["code"],
                )
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    stream_error = True
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    count += 1
    except httpx.HTTPError as error:
        log.warning("request failed: %r", error)
        return Outcome(status=0, seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    return Outcome(status=200, seconds=seconds, ttft=ttft, tokens=count, stream_error=stream_error)


async def measure_capacity(
    url: str, model: str, tokens: int, streams: int, seconds: float
) -> float:
    """Completed requests per second of `streams` closed-loop streams."""
    done: list[Outcome] = []
    deadline = time.perf_counter() + seconds

    async def loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            done.append(await _one(client, url, model, tokens, 3600))

    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(loop(client) for _ in range(streams)))
        elapsed = time.perf_counter() - started
    ok = [o for o in done if o.status == 200 and not o.stream_error]
    return len(ok) / elapsed


async def _rss_mb(client: httpx.AsyncClient, url: str) -> float | None:
    try:
        variants = (await client.get(f"{url}/v1/variants", timeout=30)).json()["variants"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    return sum(v["memory"]["rss_bytes"] for v in variants.values() if "memory" in v) / 2**20


async def open_loop(
    url: str, model: str, tokens: int, rate: float, seconds: float, ttft_slo: float, seed: int
) -> PhaseReport:
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Outcome]] = []
    rss: list[float] = []
    limits = httpx.Limits(max_connections=4096)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        next_sample = started
        with tqdm(total=round(seconds), unit="s", desc=f"{rate:.2f} req/s") as bar:
            now = started
            while now - started < seconds:
                await asyncio.sleep(rng.expovariate(rate))
                tasks.append(asyncio.create_task(_one(client, url, model, tokens, ttft_slo)))
                now = time.perf_counter()
                bar.n = min(round(now - started), bar.total)
                bar.refresh()
                if now >= next_sample:
                    next_sample = now + max(seconds / 20, 5)
                    sample = await _rss_mb(client, url)
                    if sample is not None:
                        rss.append(round(sample, 1))
        outcomes = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - started
        final = await _rss_mb(client, url)
        if final is not None:
            rss.append(round(final, 1))
    admitted = [o for o in outcomes if o.status == 200 and not o.stream_error]
    refused = [o for o in outcomes if o.status == 503]
    codes: dict[str, int] = {}
    for outcome in refused:
        codes[outcome.error_code or "?"] = codes.get(outcome.error_code or "?", 0) + 1
    return PhaseReport(
        offered_per_second=rate,
        seconds=round(elapsed, 1),
        requests=len(outcomes),
        admitted=len(admitted),
        refused_503=len(refused),
        other_errors=len(outcomes) - len(admitted) - len(refused),
        refusal_codes=codes,
        admitted_ttft_p50=_quantile([o.ttft for o in admitted if o.ttft is not None], 0.5),
        admitted_ttft_p95=_quantile([o.ttft for o in admitted if o.ttft is not None], 0.95),
        admitted_e2e_p95=_quantile([o.seconds for o in admitted], 0.95),
        refusal_p50_seconds=_quantile([o.seconds for o in refused], 0.5),
        refusal_p95_seconds=_quantile([o.seconds for o in refused], 0.95),
        output_tokens_per_second=sum(o.tokens for o in admitted) / elapsed,
        rss_mb=rss,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="smollm2-135m-instruct:full")
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--streams", type=int, default=32, help="closed-loop streams (capacity)")
    parser.add_argument("--capacity-seconds", type=float, default=60)
    parser.add_argument(
        "--capacity", type=float, help="requests/s, measured before: skips the capacity phase"
    )
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--seconds", type=float, default=120, help="open-loop phase length")
    parser.add_argument("--ttft-slo", type=float, default=5.0, help="seconds; the queue timeout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()
    configure_logging()
    capacity = args.capacity or asyncio.run(
        measure_capacity(args.url, args.model, args.tokens, args.streams, args.capacity_seconds)
    )
    log.info(
        "capacity: %.2f requests/s (%d streams, %d tokens)", capacity, args.streams, args.tokens
    )
    report = asyncio.run(
        open_loop(
            args.url,
            args.model,
            args.tokens,
            capacity * args.factor,
            args.seconds,
            args.ttft_slo,
            args.seed,
        )
    )
    result = {"capacity_per_second": capacity, "factor": args.factor, **report.model_dump()}
    log.info("%s", json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
