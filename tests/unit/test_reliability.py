"""Overload and faults, in-process over real HTTP (uvicorn, httpx): real VariantServers on a tiny
model behind the real app. The replica losses are injected on purpose at the Ray handle boundary
(a handle whose stream raises Ray's own ActorDiedError midway); everything else is real."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from slimserve.serve.api.access import warn_if_exposed
from slimserve.serve.api.backends import InProcessBackend, RayBackend
from slimserve.serve.api.failures import from_backend_exception
from slimserve.serve.api.gateway import GatewayCore
from slimserve.serve.app import variant_deployment_options
from slimserve.serve.config import ServerOptions, SlimserveConfig, parse_config
from slimserve.serve.replica.server import VariantServer

from .conftest import tiny_llama
from .online_helpers import serving, until, until_async, variant_servers

pytestmark = pytest.mark.xdist_group("ray")  # starts Ray: see tests/conftest.py

CHAT = "/v1/chat/completions"
LONG_CONTEXT = 8192  # a request that would hold its slot for thousands of steps


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-long")
    model = tiny_llama(dtype=torch.float32)
    model.config.max_position_embeddings = LONG_CONTEXT
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(model_dir: Path, variants: dict | None = None, **server: Any) -> SlimserveConfig:
    return parse_config(
        {
            "model": str(model_dir),
            "served_model_name": "tiny",
            "variants": variants or {"full": {}, "spare": {}},
            "routing": {"split": {"full": 1}},
            "engine": {
                "max_model_len": LONG_CONTEXT,
                "max_num_seqs": 1,
                "max_queued_requests": 1,
                "torch_threads": 1,
                "separate_process": False,
                "prefix_cache_slots": 0,
            },
            "self_bench": {"enabled": False},
            "server": {"health_probe_seconds": 3600, **server},
        }
    )


def _chat(model: str = "tiny", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], **extra}


class _Stream(threading.Thread):
    """A streamed request that reads until told to stop, then hangs up (a client leaving)."""

    def __init__(self, base: str, body: dict, headers: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.base, self.body, self.headers = base, body, headers or {}
        self.stop = threading.Event()
        self.events: list[str] = []
        self.status: int | None = None

    def run(self) -> None:
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", self.base + CHAT, json=self.body, headers=self.headers) as r,
        ):
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                if self.stop.is_set():
                    return


@pytest.fixture(scope="module")
def overload_gateway(long_model_dir):
    config = _config(long_model_dir, variants={"full": {}}, retry_after_seconds=2)
    server = VariantServer("full", config.model_dump(mode="json"))
    core = GatewayCore(config, {"full": InProcessBackend(server)})
    with serving(core) as base:
        yield base, server
    server.engine.shutdown()


def test_overload_is_refused_at_once_with_retry_after_and_queued_work_dropped(overload_gateway):
    base, server = overload_gateway
    engine = server.engine
    long_body = _chat(stream=True, max_tokens=LONG_CONTEXT - 64, ignore_eos=True)
    holder = _Stream(base, long_body)  # takes the only batch slot for thousands of steps
    holder.start()
    until(lambda: engine.stats()["running"] == 1 and holder.events, "the slot to be taken")

    # A request that may wait 0.2 s: it cannot start, so it is dropped with its queued work.
    timed = httpx.post(
        base + CHAT, json=_chat(max_tokens=4), headers={"x-slimserve-queue-timeout": "0.2"}
    )
    assert timed.status_code == 503, timed.text
    assert timed.headers["retry-after"] == "2"
    assert timed.json()["error"]["code"] == "queue_timeout"
    assert engine.stats()["waiting"] == 0  # dropped at once, not left for the engine

    # One request fills the queue (max_queued_requests 1); the next is refused at once.
    waiter = _Stream(base, _chat(stream=True, max_tokens=2))
    waiter.start()
    until(lambda: engine.stats()["waiting"] == 1, "the queue to fill")
    refused = httpx.post(base + CHAT, json=_chat(max_tokens=4))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"]["code"] == "queue_full"
    bad = httpx.post(base + CHAT, json=_chat(), headers={"x-slimserve-queue-timeout": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-slimserve-queue-timeout"

    # All of that while the long request kept streaming; its client leaving frees its slot,
    # and the queued request then runs to the end.
    assert holder.is_alive() and not any(e == "[DONE]" for e in holder.events)
    holder.stop.set()
    holder.join(timeout=60)
    waiter.join(timeout=60)
    assert waiter.status == 200 and waiter.events[-1] == "[DONE]"
    until(lambda: engine.stats()["running"] == 0, "the slot to be freed")


def test_a_stream_closed_while_queued_frees_its_place_before_the_close_returns(overload_gateway):
    # What a retry after a lost stream needs: the request it replaces gives up its place in the
    # queue at once, not when the event loop gets round to closing the generators inside.
    _, server = overload_gateway
    engine = server.engine

    def request(request_id: str, max_tokens: int) -> dict:
        sampling = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
        return {"request_id": request_id, "prompt_token_ids": [1, 5, 9], "sampling": sampling}

    async def scenario() -> None:
        holder = server.generate(request("holder", LONG_CONTEXT - 64))
        await anext(holder)
        await until_async(lambda: engine.stats()["running"] == 1, "the slot to be taken")
        queued = server.generate(request("queued", 4))
        await anext(queued)  # accepted, and waiting behind the holder
        assert engine.stats()["waiting"] == 1
        await queued.aclose()
        assert engine.stats()["waiting"] == 0
        await holder.aclose()

    asyncio.run(scenario())
    until(lambda: engine.stats()["running"] == 0, "the slot to be freed")


class _HandleResponse:
    """A streaming handle response: the replica's messages, or `limit` of them before its replica
    is lost."""

    def __init__(self, events: Any, limit: int | None = None) -> None:
        self.events, self.limit = events, limit

    def __aiter__(self):
        return self._run()

    async def _run(self):
        count = 0
        async for item in self.events:
            if count == self.limit:
                await self.events.aclose()
                raise ActorDiedError()
            count += 1
            yield item

    def cancel(self) -> None:
        pass


class _FaultyHandle:
    """Stands in for a variant's DeploymentHandle over a real VariantServer; `dead` makes its
    replica lost: a stream dies after `events_before_death` messages, stats raise."""

    def __init__(self, server: VariantServer) -> None:
        self.server = server
        self.dead = False
        self.events_before_death = 0
        self.lose_next_stream = False  # one replica of several lost: its stream dies, no more
        self.generate = _Method(lambda request: self._generate(request))
        self.stats = _Method(lambda: self._stats())

    def options(self, stream: bool = False) -> _FaultyHandle:
        return self

    def _generate(self, request: dict) -> Any:
        events = self.server.generate(request)
        if self.lose_next_stream:
            self.lose_next_stream = False
            return _HandleResponse(events, 0)
        return _HandleResponse(events, self.events_before_death if self.dead else None)

    async def _stats(self) -> dict:
        if self.dead:
            raise ActorDiedError()
        return await self.server.stats()


class _Method:
    def __init__(self, call: Callable) -> None:
        self.remote = call


@pytest.fixture(scope="module")
def faulty_gateway(tiny_model_dir):
    config = _config(
        tiny_model_dir, variants={"full": {}, "spare": {}, "broken": {"model": "/no/such/model"}}
    )
    config.engine.max_model_len = 256
    servers = variant_servers(config)
    handle = _FaultyHandle(servers["full"])
    backends: dict[str, Any] = {n: InProcessBackend(s) for n, s in servers.items()}
    backends["full"] = RayBackend("full", handle)
    core = GatewayCore(config, backends)
    with serving(core) as base:
        yield base, core, handle
    for server in servers.values():
        if server.failure is None:
            server.engine.shutdown()


def _sse(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def _metric(base: str, name: str, variant: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(f'{name}{{variant="{variant}"}}'):
            return float(line.split()[-1])
    raise AssertionError(f"{name} for {variant} is not exported")


def test_a_variant_that_fails_to_load_is_reported_while_the_others_serve(faulty_gateway):
    base, _, _ = faulty_gateway
    health = httpx.get(base + "/health")
    assert health.status_code == 200, health.text
    state = health.json()
    assert state["status"] == "degraded"
    assert state["variants"]["broken"]["state"] == "down"
    assert "failed to load" in state["variants"]["broken"]["reason"]
    assert state["variants"]["full"]["state"] == "up"
    assert _metric(base, "slimserve_variant_up", "broken") == 0.0
    pinned = httpx.post(base + CHAT, json=_chat("tiny:broken", max_tokens=2))
    assert pinned.status_code == 503 and "retry-after" in pinned.headers
    assert pinned.json()["error"]["code"] == "variant_unavailable"
    assert "failed to load" in pinned.json()["error"]["message"]
    assert httpx.post(base + CHAT, json=_chat("tiny:spare", max_tokens=2)).status_code == 200


def test_a_replica_lost_midstream_ends_the_stream_with_an_error_event(faulty_gateway):
    base, core, handle = faulty_gateway
    handle.dead, handle.events_before_death = True, 3
    try:
        response = httpx.post(
            base + CHAT, json=_chat("tiny:full", stream=True, max_tokens=40, ignore_eos=True)
        )
        assert response.status_code == 200
        events = _sse(response)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "variant_unavailable" and "ActorDiedError" in error["message"]
        assert any("choices" in json.loads(e) for e in events[:-2])  # tokens came first

        # The router now knows: the variant is down at /health and in the metric, a request
        # pinned to it is refused at once, and unpinned traffic goes to a variant that is up.
        assert httpx.get(base + "/health").json()["variants"]["full"]["state"] == "down"
        assert _metric(base, "slimserve_variant_up", "full") == 0.0
        pinned = httpx.post(base + CHAT, json=_chat("tiny:full", max_tokens=2))
        assert pinned.status_code == 503 and pinned.headers["retry-after"] == "1"
        unpinned = httpx.post(base + CHAT, json=_chat(max_tokens=2))
        assert unpinned.status_code == 200
        assert unpinned.headers["x-slimserve-variant"] != "full"
    finally:
        handle.dead = False
    # Back up once it answers its probe again.
    asyncio.run(core.variant_stats())
    assert httpx.get(base + "/health").json()["variants"]["full"]["state"] == "up"
    assert _metric(base, "slimserve_variant_up", "full") == 1.0


def test_an_unpinned_request_whose_variant_dies_before_answering_is_retried(faulty_gateway):
    base, core, handle = faulty_gateway
    handle.dead, handle.events_before_death = True, 0
    try:
        for stream in (False, True):
            core.variant_up("full")  # as if a probe had just found it up
            response = httpx.post(base + CHAT, json=_chat(max_tokens=3, stream=stream))
            assert response.status_code == 200, response.text
            assert response.headers["x-slimserve-variant"] == "spare"
            if stream:
                assert _sse(response)[-1] == "[DONE]"
                assert all("error" not in json.loads(e) for e in _sse(response)[:-1])
    finally:
        handle.dead = False
        asyncio.run(core.variant_stats())


def test_a_lost_replica_of_a_variant_with_others_left_keeps_it_up(faulty_gateway):
    base, _, handle = faulty_gateway
    for model in ("tiny:full", "tiny"):  # pinned, then through the split (all to full)
        handle.lose_next_stream = True
        response = httpx.post(base + CHAT, json=_chat(model, max_tokens=3))
        assert response.status_code == 200, response.text
        assert response.headers["x-slimserve-variant"] == "full"  # retried on its other replica
        assert not handle.lose_next_stream
    assert httpx.get(base + "/health").json()["variants"]["full"]["state"] == "up"


def test_a_killed_engine_process_takes_its_variant_out_of_routing(tiny_model_dir):
    """The OOM killer takes the process that holds the weights (SIGKILL, injected on purpose):
    the variant's requests are answered as a lost replica's (503, retried on another variant
    when unpinned), never 500, and Ray Serve's health check fails so that it restarts the
    replica."""
    config = _config(tiny_model_dir)
    config.engine.separate_process = True
    config.engine.max_model_len = 256
    servers = variant_servers(config)
    core = GatewayCore(config, {n: InProcessBackend(s) for n, s in servers.items()})
    full = servers["full"]
    try:
        with serving(core) as base:
            answer = httpx.post(base + CHAT, json=_chat(max_tokens=2), timeout=60)
            assert answer.headers["x-slimserve-variant"] == "full"
            os.kill(full.engine.pid, signal.SIGKILL)
            until(lambda: not full.engine.is_alive(), "the engine process's end")

            unpinned = httpx.post(base + CHAT, json=_chat(max_tokens=2), timeout=60)
            assert unpinned.status_code == 200, unpinned.text
            assert unpinned.headers["x-slimserve-variant"] == "spare"
            pinned = httpx.post(base + CHAT, json=_chat("tiny:full", max_tokens=2), timeout=60)
            assert pinned.status_code == 503 and "retry-after" in pinned.headers
            error = pinned.json()["error"]
            assert error["code"] == "variant_unavailable" and "engine" in error["message"]
            state = httpx.get(base + "/health").json()["variants"]["full"]
            assert state["state"] == "down" and "engine" in state["reason"]
            with pytest.raises(RuntimeError, match="not running"):
                full.check_health()
    finally:
        for server in servers.values():
            server.engine.shutdown()


def test_ray_handle_failures_become_openai_errors():
    backpressure = from_backend_exception(
        "int8", BackPressureError(num_queued_requests=5, max_queued_requests=5)
    )
    assert (backpressure.status, backpressure.code) == (503, "queue_full")
    lost = from_backend_exception("int8", ActorDiedError())
    assert (lost.status, lost.code) == (503, "variant_unavailable")
    bug = from_backend_exception("int8", ValueError("boom"))
    assert bug.status == 500 and "boom" in bug.message


def test_body_limit_api_key_and_cors(tiny_model_dir):
    config = _config(
        tiny_model_dir,
        variants={"full": {}},
        max_request_bytes=2048,
        api_key="sk-test",
        cors_origins=["https://app.example"],
    )
    config.engine.max_model_len = 256
    server = VariantServer("full", config.model_dump(mode="json"))
    core = GatewayCore(config, {"full": InProcessBackend(server)})
    try:
        with serving(core) as base:
            key = {"authorization": "Bearer sk-test"}
            big = _chat(max_tokens=2, user="x" * 4096)
            too_large = httpx.post(base + CHAT, json=big, headers=key)
            assert too_large.status_code == 413
            assert too_large.json()["error"]["code"] == "request_too_large"
            assert httpx.post(base + CHAT, json=_chat(max_tokens=2)).status_code == 401
            wrong = httpx.post(
                base + CHAT, json=_chat(max_tokens=2), headers={"authorization": "Bearer sk-x"}
            )
            assert wrong.status_code == 401
            assert wrong.json()["error"]["code"] == "invalid_api_key"
            assert httpx.post(base + CHAT, json=_chat(max_tokens=2), headers=key).status_code == 200
            assert httpx.get(base + "/health").status_code == 200  # probes need no key
            preflight = httpx.options(
                base + CHAT,
                headers={
                    "origin": "https://app.example",
                    "access-control-request-method": "POST",
                },
            )
            assert preflight.headers["access-control-allow-origin"] == "https://app.example"
            other = httpx.options(
                base + CHAT,
                headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
            )
            assert "access-control-allow-origin" not in other.headers
    finally:
        server.engine.shutdown()


def test_no_prompt_text_or_key_reaches_the_logs(faulty_gateway, caplog):
    base, _, _ = faulty_gateway
    marker = "PROMPT-TEXT-THAT-MUST-NOT-BE-LOGGED"
    with caplog.at_level(logging.DEBUG):
        body = {"model": "tiny:spare", "messages": [{"role": "user", "content": marker}]}
        assert httpx.post(base + CHAT, json={**body, "max_tokens": 2}).status_code == 200
        assert httpx.post(base + CHAT, json={**body, "max_tokens": -1}).status_code == 400
        pinned = httpx.post(base + CHAT, json={**body, "model": "tiny:broken"})
        assert pinned.status_code == 503
    assert marker not in caplog.text


def test_binding_beyond_loopback_without_a_key_warns(caplog, monkeypatch):
    monkeypatch.delenv("SLIMSERVE_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        warn_if_exposed(ServerOptions(host="127.0.0.1"))
        warn_if_exposed(ServerOptions(host="0.0.0.0", api_key="k"))
        assert not caplog.records
        warn_if_exposed(ServerOptions(host="0.0.0.0"))
    assert "no API key" in caplog.text


def test_queue_bounds_and_autoscaling_reach_ray_serve(tiny_model_dir):
    from ray import serve

    config = _config(
        tiny_model_dir,
        variants={
            "full": {"deployment": {"max_queued_requests": 8, "max_ongoing_requests": 4}},
            "int8": {
                "deployment": {
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 3,
                        "target_ongoing_requests": 6,
                    }
                }
            },
        },
    )
    full = serve.deployment(VariantServer).options(**variant_deployment_options(config, "full"))
    assert full.max_queued_requests == 8 and full.max_ongoing_requests == 4
    assert full.num_replicas == 1
    scaled = serve.deployment(VariantServer).options(**variant_deployment_options(config, "int8"))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert autoscaling.target_ongoing_requests == 6
