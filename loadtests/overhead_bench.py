"""What the serving path costs: p50 latency of a short request in-process vs through the gateway.

    python -m slimserve.loadtests.overhead_bench --url http://127.0.0.1:8000 --variant full

Runs the same greedy 16-token requests (one at a time) first against a VariantServer built in
this process from the config, then through Ray Serve's proxy, the gateway and the variant's
deployment over HTTP. The two phases do not overlap, so they do not compete for cores.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import httpx
from pydantic import BaseModel

from slimserve.serve.config import load_config
from slimserve.serve.engine.types import GenerateRequest, SamplingParams
from slimserve.serve.logs import configure_logging
from slimserve.serve.replica.server import VariantServer

log = logging.getLogger("slimserve.loadtests.overhead_bench")

PROMPT = "Write one sentence about the sea."


class OverheadResult(BaseModel):
    variant: str
    tokens: int
    requests: int
    in_process_p50_ms: float
    gateway_p50_ms: float

    @property
    def ratio(self) -> float:
        return self.gateway_p50_ms / self.in_process_p50_ms


async def _in_process(server: VariantServer, tokens: int, requests: int) -> list[float]:
    latencies = []
    for index in range(requests + 2):  # two warm-ups
        request = GenerateRequest(
            request_id=f"overhead-{index}",
            messages=[{"role": "user", "content": PROMPT}],
            sampling=SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
        )
        started = time.perf_counter()
        async for _ in server.generate(request.model_dump()):
            pass
        if index >= 2:
            latencies.append(time.perf_counter() - started)
    return latencies


def _through_gateway(url: str, model: str, tokens: int, requests: int) -> list[float]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    latencies = []
    with httpx.Client(timeout=120) as client:
        for index in range(requests + 2):
            started = time.perf_counter()
            response = client.post(f"{url}/v1/chat/completions", json=body)
            response.raise_for_status()
            assert response.json()["usage"]["completion_tokens"] == tokens
            if index >= 2:
                latencies.append(time.perf_counter() - started)
    return latencies


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--config", default="deploy/configs/default.yaml")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    config = load_config(args.config)
    server = VariantServer(args.variant, config.model_dump(mode="json"))
    try:
        local = asyncio.run(_in_process(server, args.tokens, args.requests))
    finally:
        server.engine.shutdown()
    public = httpx.get(f"{args.url}/v1/models").json()["data"][0]["id"]
    remote = _through_gateway(args.url, f"{public}:{args.variant}", args.tokens, args.requests)
    result = OverheadResult(
        variant=args.variant,
        tokens=args.tokens,
        requests=args.requests,
        in_process_p50_ms=round(statistics.median(local) * 1000, 1),
        gateway_p50_ms=round(statistics.median(remote) * 1000, 1),
    )
    log.info("%s", result.model_dump_json())
    print(  # the table is this tool's output
        "| variant | tokens | requests | in-process p50 ms | gateway p50 ms | ratio |\n"
        "|---|---|---|---|---|---|\n"
        f"| {result.variant} | {result.tokens} | {result.requests} | "
        f"{result.in_process_p50_ms} | {result.gateway_p50_ms} | {result.ratio:.2f} |"
    )


if __name__ == "__main__":
    main()
