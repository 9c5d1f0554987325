"""The gateway's HTTP surface, in-process: real FastAPI app, real VariantServers on a tiny model."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from slimserve.kernels import cpu_isa
from slimserve.serve.api.backends import InProcessBackend
from slimserve.serve.api.gateway import GatewayCore, create_api
from slimserve.serve.config import parse_config

from .online_helpers import variant_servers

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    config = parse_config(
        {
            "model": str(tiny_model_dir),
            "served_model_name": "tiny",
            "variants": {
                "full": {},
                "int8": {"compression": [{"method": "int8-weight-only"}]},
            },
            "routing": {"split": {"full": 1, "int8": 1}, "sticky_key": "header:x-user-id"},
            "engine": {"max_model_len": 256, "max_num_seqs": 4, "torch_threads": 1},
        }
    )
    servers = variant_servers(config)
    core = GatewayCore(config, {n: InProcessBackend(s) for n, s in servers.items()})
    with TestClient(create_api(core)) as test_client:
        yield test_client
    for server in servers.values():
        server.engine.shutdown()


def _chat(**extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello there"}]}
    body.update(extra)
    return body


def _events(response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_chat_completion_shape_and_usage(client):
    response = client.post(CHAT, json=_chat(max_tokens=5, temperature=0, ignore_eos=True))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    variant = response.headers["x-slimserve-variant"]
    assert variant in {"full", "int8"}
    assert body["model"] == f"tiny:{variant}"


def test_chat_stream_is_sse_ending_in_done(client):
    body = _chat(
        max_tokens=6,
        temperature=0,
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"] == []


async def _asgi_messages(app, path: str, body: dict) -> list[dict]:
    """What the app sends its server for one request: each body message is one write to the
    client's socket."""
    sent: list[dict] = []
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict:
        if request:
            return request.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError  # unreachable

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return sent


def test_a_stream_is_one_write_per_token_with_the_role_first_and_the_end_last(client):
    """The role chunk goes out with the first token's, the finish chunk with the usage,
    `[DONE]` and the end of the HTTP response: no write of its own for any of them."""
    body = _chat(
        model="tiny:full",
        max_tokens=6,
        temperature=0,
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    sent = client.portal.call(_asgi_messages, client.app, CHAT, body)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert all(m["type"] == "http.response.body" for m in sent[1:])
    assert [m["more_body"] for m in sent[1:]] == [True] * (len(sent) - 2) + [False]
    pieces = [_frames(m["body"]) for m in sent[1:]]
    first, *middle, last = pieces
    assert [_kind(c) for c in first] == ["role", "content"]
    assert all([_kind(c) for c in piece] == ["content"] for piece in middle)
    assert [_kind(c) for c in last] == ["finish", "usage", "[DONE]"]
    assert last[0]["choices"][0]["finish_reason"] == "length"
    assert last[1]["usage"]["completion_tokens"] == 6


def _frames(body: bytes) -> list[dict | str]:
    frames = [f.removeprefix("data: ") for f in body.decode().split("\n\n") if f]
    return [f if f == "[DONE]" else json.loads(f) for f in frames]


def _kind(chunk: dict | str) -> str:
    if chunk == "[DONE]":
        return chunk
    if not chunk["choices"]:
        return "usage"
    choice = chunk["choices"][0]
    if choice["finish_reason"]:
        return "finish"
    return "role" if choice["delta"].get("role") else "content"


def test_completion_stream_and_pinning(client):
    body = {
        "model": "tiny:int8",
        "prompt": "Once upon",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["x-slimserve-variant"] == "int8"
        events = _events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(client):
    def text(**extra):
        response = client.post(CHAT, json=_chat(model="tiny:full", max_tokens=8, **extra))
        return response.json()["choices"][0]["message"]["content"]

    assert text(temperature=0) == text(temperature=0)
    assert text(temperature=1.0, seed=7) == text(temperature=1.0, seed=7)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        (_chat(messages=[]), 400, "messages"),
        (_chat(messages="hi"), 400, "messages"),
        (_chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
        (_chat(max_tokens=-3), 400, "max_tokens"),
        (_chat(max_tokens=0), 400, "max_tokens"),
        (_chat(max_tokens="5"), 400, "max_tokens"),
        (_chat(max_tokens=10**9), 400, "max_tokens"),
        (_chat(temperature=9), 400, "temperature"),
        (_chat(n=0), 400, "n"),
        (_chat(n=129), 400, "n"),
        (_chat(model="gpt-4"), 404, "model"),
        (_chat(messages=[{"role": "user", "content": "word " * 400}]), 400, "messages"),
        ({"model": "tiny", "prompt": []}, 400, "prompt"),
        ({"model": "tiny", "prompt": [[1, 2], []]}, 400, "prompt"),
        ({"model": "tiny"}, 400, "messages"),
    ],
)
def test_bad_input_gets_an_openai_error(client, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else CHAT
    response = client.post(path, **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param


def test_unknown_route_and_method_are_openai_errors(client):
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    response = client.get(CHAT)
    assert response.status_code == 405 and "error" in response.json()


def test_models_lists_public_name_and_variants(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny", "tiny:full", "tiny:int8"]


def test_health_and_metrics_cover_every_variant(client):
    client.post(CHAT, json=_chat(model="tiny:int8", max_tokens=3, ignore_eos=True))
    client.post(CHAT, json=_chat(model="tiny:full", max_tokens=3, ignore_eos=True))
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["variants"] == {"full": {"state": "up"}, "int8": {"state": "up"}}
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "slimserve_time_to_first_token_seconds",
        "slimserve_inter_token_latency_seconds",
        "slimserve_e2e_request_latency_seconds",
    ):
        counts = {
            s.labels["variant"]: s.value
            for s in families[name].samples
            if s.name.endswith("_count")
        }
        assert counts["full"] >= 1 and counts["int8"] >= 1
    weights = {
        s.labels["variant"]: s.value for s in families["slimserve_variant_weight_bytes"].samples
    }
    assert weights["int8"] < 0.6 * weights["full"]
    # Each variant says what it computes in and on which ISA level of our CPU kernels.
    runtime = {
        (s.labels["variant"], s.labels["dtype"], s.labels["isa"])
        for s in families["slimserve_variant_runtime_info"].samples
    }
    level = cpu_isa.active().label
    assert {("full", cpu_isa.default_dtype(), level), ("int8", cpu_isa.default_dtype(), level)} <= (
        runtime
    )
    statuses = {
        (s.labels["variant"], s.labels["status"])
        for s in families["slimserve_requests"].samples
        if s.name == "slimserve_requests_total"
    }
    assert {("full", "200"), ("int8", "200")} <= statuses
    generated = {
        s.labels["variant"]: s.value
        for s in families["slimserve_generation_tokens"].samples
        if s.name == "slimserve_generation_tokens_total"
    }
    assert generated["int8"] >= 3


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(client):
    """Chat requests share the template's system prompt: the second one's K/V for it is copied,
    and the count reaches /metrics (the engine process reports its counters every 0.5 s)."""
    for content in ("first question", "second question"):
        reply = client.post(
            CHAT,
            json=_chat(
                model="tiny:full",
                messages=[{"role": "user", "content": content}],
                max_tokens=2,
                ignore_eos=True,
            ),
        )
        assert reply.status_code == 200
    cached = 0.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and cached == 0:
        time.sleep(0.3)
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        samples = families["slimserve_variant_prefix_cached_tokens"].samples
        cached = {s.labels["variant"]: s.value for s in samples}.get("full", 0.0)
    assert cached >= 8
