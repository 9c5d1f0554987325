"""An in-process gateway with the online-benchmark features on: real VariantServers on the tiny
model, the real FastAPI app, a TestClient. Shared by the MFU, shadow, canary and admin tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from slimserve.serve.api.backends import InProcessBackend
from slimserve.serve.api.gateway import GatewayCore, create_api
from slimserve.serve.config import SlimserveConfig, parse_config
from slimserve.serve.ports import free_port
from slimserve.serve.replica.server import VariantServer

CHAT = "/v1/chat/completions"
# Small enough for a couple of seconds per variant on a tiny model.
FAST_SELF_BENCH = {
    "perplexity_windows": 2,
    "window_tokens": 64,
    "prefill_tokens": 32,
    "decode_tokens": 4,
    "batch_sizes": [1, 4],
}


def online_config(
    model_dir: Path, variants: dict | None = None, **sections: Any
) -> SlimserveConfig:
    data: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": "tiny",
        "variants": variants
        or {"full": {}, "int8": {"compression": [{"method": "int8-weight-only"}]}},
        "routing": {"split": {"full": 1, "int8": 1}},
        "engine": {"max_model_len": 256, "max_num_seqs": 4, "torch_threads": 1},
        "self_bench": FAST_SELF_BENCH,
    }
    data.update(sections)
    return parse_config(data)


def variant_servers(config: SlimserveConfig) -> dict[str, VariantServer]:
    """One VariantServer per variant, started together as Ray Serve starts replicas: each
    spends most of its start waiting for its engine process to import and load. Engines that
    load in this process load one after another (transformers' loading context is global)."""
    as_dict = config.model_dump(mode="json")
    if not all(config.engine_for(name).separate_process for name in config.variants):
        return {name: VariantServer(name, as_dict) for name in config.variants}
    with ThreadPoolExecutor(len(config.variants)) as pool:
        futures = {name: pool.submit(VariantServer, name, as_dict) for name in config.variants}
    return {name: future.result() for name, future in futures.items()}


@contextlib.contextmanager
def online_gateway(config: SlimserveConfig) -> Iterator[tuple[TestClient, GatewayCore]]:
    servers = variant_servers(config)
    core = GatewayCore(config, {n: InProcessBackend(s) for n, s in servers.items()})
    try:
        with TestClient(create_api(core)) as client:
            yield client, core
    finally:
        for server in servers.values():
            server.engine.shutdown()


def chat(model: str = "tiny", content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    body.update(extra)
    return body


def scrape(client: TestClient) -> dict[str, Any]:
    """Metric family name -> family, parsed by prometheus_client's own parser."""
    text = client.get("/metrics").text
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_values(family: Any, suffix: str = "", **labels: str) -> list[float]:
    return [
        s.value
        for s in family.samples
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    values = sample_values(families[name], suffix, **labels)
    assert len(values) == 1, (name, labels, values)
    return values[0]


@contextlib.contextmanager
def serving(core: GatewayCore) -> Iterator[str]:
    """The gateway's app on a real HTTP server in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_api(core), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    until(lambda: server.started, "the HTTP server to start")
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def until(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def until_async(condition: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    """`until` inside a coroutine: the event loop keeps running while it waits."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
