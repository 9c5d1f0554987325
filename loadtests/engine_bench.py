"""Engine throughput in-process: a VariantServer built from a config, no Ray, no HTTP.

    python -m slimserve.loadtests.engine_bench --config deploy/configs/default.yaml \
        --variants full int8 --concurrency 1 8 32

Against decode_bench (the same requests through Ray Serve and the gateway) this isolates what the
serving path costs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from slimserve.serve.config import load_config
from slimserve.serve.engine.types import GenerateRequest, SamplingParams
from slimserve.serve.logs import configure_logging
from slimserve.serve.replica.server import VariantServer

from .decode_bench import PROMPTS, BenchRow, closed_loop, render

log = logging.getLogger("slimserve.loadtests.engine_bench")


async def _one(server: VariantServer, index: int, tokens: int) -> tuple[int, float, float]:
    request = GenerateRequest(
        request_id=f"bench-{index}-{time.monotonic_ns()}",
        messages=[{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        sampling=SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
    )
    started = time.perf_counter()
    first = None
    generated = 0
    async for batch in server.generate(request.model_dump()):
        for event in batch:
            if event["kind"] == "delta" and first is None:
                first = time.perf_counter()
            if event["kind"] == "done":
                generated = event["completion_tokens"]
            if event["kind"] == "error":
                raise RuntimeError(event["error"])
    ended = time.perf_counter()
    rate = (generated - 1) / (ended - first) if first and ended > first else 0.0
    return generated, (first or ended) - started, rate


async def bench(
    server: VariantServer, variant: str, levels: list[int], requests_per_stream: int, tokens: int
) -> list[BenchRow]:
    """Every concurrency level on one event loop: vLLM's AsyncLLM is bound to the loop it
    first served, so a fresh loop per level would find its engine shut down."""
    await _one(server, 0, 4)  # warm-up
    rows = []
    for concurrency in levels:
        requests = max(requests_per_stream * concurrency, concurrency)
        row = await closed_loop(
            lambda index: _one(server, index, tokens), variant, concurrency, requests
        )
        log.info("%s", row.model_dump_json())
        rows.append(row)
    return rows


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deploy/configs/default.yaml")
    parser.add_argument("--variants", nargs="+", default=["full", "int8"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.config).model_dump(mode="json")
    rows = []
    for variant in args.variants:
        server = VariantServer(variant, config)
        try:
            rows += asyncio.run(
                bench(server, variant, args.concurrency, args.requests_per_stream, args.tokens)
            )
        finally:
            server.engine.shutdown()
    print(render(rows))


if __name__ == "__main__":
    main()
