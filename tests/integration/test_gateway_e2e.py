"""The real default gateway: SmolLM2-135M-Instruct, full + int8, Ray Serve, HTTP, openai client."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections import Counter

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimserve.loadtests.client_bench import CLIENTS, measure
from slimserve.loadtests.decode_bench import bench_variant

from .conftest import assert_disconnect_frees_slot
from .decisive import CAPITAL_QUESTION, COUNTING_PROMPTS, COUNTING_TOKENS

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

MODEL = "smollm2-135m-instruct"
QUESTION = CAPITAL_QUESTION


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("variant", ["full", "int8"])
def test_openai_client_chat_answers_on_each_variant(client, variant):
    reply = client.chat.completions.create(
        model=f"{MODEL}:{variant}", messages=QUESTION, max_tokens=20, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == f"{MODEL}:{variant}"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 10


def test_openai_client_streaming_chat(client):
    stream = client.chat.completions.create(
        model=f"{MODEL}:int8",
        messages=QUESTION,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_the_benchmarks_streaming_client_counts_every_token(gateway):
    """decode_bench's closed loop (aiohttp, as the overhead and CPU-server benchmarks use it)
    against the real gateway: every requested token counted from the usage chunk, and each
    request's first content seen, so a per-stream rate after it."""
    row = asyncio.run(bench_variant(gateway, f"{MODEL}:full", "full", 2, 4, 6))
    assert row.requests == 4 and row.output_tokens == 4 * 6
    assert row.per_stream_tokens_per_s > 0  # zero when no content chunk was recognized
    assert row.ttft_p50_ms > 0


def test_the_client_comparison_sees_each_clients_first_token(gateway):
    """client_bench's three clients on the real gateway, each request's first content found
    (a client that never saw it raises)."""
    rows = asyncio.run(measure(gateway, f"{MODEL}:full", 2, 1, 4, 0.0))
    assert [r.client for r in rows] == list(CLIENTS)
    assert all(r.requests == 2 and 0 < r.ttft_min_ms <= r.ttft_p50_ms for r in rows)


def test_openai_client_completions_and_models(client):
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens == 5
    ids = {m.id for m in client.models.list().data}
    assert ids == {MODEL, f"{MODEL}:full", f"{MODEL}:int8"}


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100_000)
    assert error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])


def test_bad_inputs_get_4xx_and_the_replicas_stay_alive(gateway):
    url = f"{gateway}/v1/chat/completions"
    cases = [
        ({"content": b"{oops"}, 400),
        ({"json": {"model": MODEL}}, 400),
        ({"json": {"model": MODEL, "messages": [{"role": "user", "content": 3}]}}, 400),
        ({"json": {"model": MODEL, "messages": QUESTION, "max_tokens": -1}}, 400),
        ({"json": {"model": MODEL, "messages": QUESTION, "max_tokens": 10**12}}, 400),
        ({"json": {"model": MODEL, "messages": [{"role": "user", "content": "x " * 3000}]}}, 400),
        ({"json": {"model": "missing", "messages": QUESTION}}, 404),
    ]
    for kwargs, status in cases:
        response = httpx.post(url, timeout=60, **kwargs)
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{gateway}/health", timeout=30).status_code == 200


def _variant_of(gateway: str, headers: dict[str, str] | None = None) -> str:
    response = httpx.post(
        f"{gateway}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
        headers=headers or {},
        timeout=60,
    )
    response.raise_for_status()
    return response.headers["x-slimserve-variant"]


def test_weighted_split_matches_the_config(gateway):
    async def many(n: int) -> Counter:
        async with httpx.AsyncClient(timeout=120) as http:

            async def one():
                r = await http.post(
                    f"{gateway}/v1/completions",
                    json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                )
                r.raise_for_status()
                return r.headers["x-slimserve-variant"]

            results = []
            for start in range(0, n, 25):
                results += await asyncio.gather(*(one() for _ in range(min(25, n - start))))
            return Counter(results)

    counts = asyncio.run(many(400))
    # split 50/50: the int8 share of 400 draws has sd 0.025; allow 4 sd
    assert abs(counts["int8"] / 400 - 0.5) < 0.1, counts


def test_sticky_and_pinned_routing(gateway):
    for user in ("alice", "bob", "carol", "dave"):
        seen = {_variant_of(gateway, {"x-user-id": user}) for _ in range(6)}
        assert len(seen) == 1
    assert len({_variant_of(gateway, {"x-user-id": f"u{i}"}) for i in range(30)}) == 2


def test_concurrent_requests_are_batched(gateway):
    async def burst():
        async with httpx.AsyncClient(timeout=300) as http:
            body = {
                "model": f"{MODEL}:full",
                "prompt": "Tell me a story.",
                "max_tokens": 24,
                "ignore_eos": True,
            }
            return await asyncio.gather(
                *(http.post(f"{gateway}/v1/completions", json=body) for _ in range(8))
            )

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in responses)
    stats = httpx.get(f"{gateway}/v1/variants", timeout=30).json()["variants"]["full"]
    assert stats["engine"]["peak_batch"] >= 4


def test_disconnect_mid_stream_frees_the_slot(gateway):
    engine = assert_disconnect_frees_slot(gateway, MODEL, "int8")["engine"]
    assert engine["generated_tokens"] < 1000  # it stopped early, not after 1500 tokens


def test_int8_variant_really_is_smaller(gateway):
    variants = httpx.get(f"{gateway}/v1/variants", timeout=30).json()["variants"]
    full, int8 = variants["full"], variants["int8"]
    assert 0.45 < int8["weight_bytes"] / full["weight_bytes"] < 0.55
    assert int8["compression"]["methods"][0]["method"] == "int8-weight-only"
    assert int8["compression"]["methods"][0]["modules_replaced"] >= 210


def test_metrics_cover_every_variant_after_traffic(gateway, client):
    for variant in ("full", "int8"):
        client.chat.completions.create(model=f"{MODEL}:{variant}", messages=QUESTION, max_tokens=4)
    text = httpx.get(f"{gateway}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "slimserve_time_to_first_token_seconds",
        "slimserve_e2e_request_latency_seconds",
        "slimserve_inter_token_latency_seconds",
    ):
        counts = {
            s.labels["variant"]: s.value
            for s in families[name].samples
            if s.name.endswith("_count")
        }
        assert counts["full"] > 0 and counts["int8"] > 0, name
    up = {s.labels["variant"]: s.value for s in families["slimserve_variant_up"].samples}
    assert up == {"full": 1.0, "int8": 1.0}
    for name in ("slimserve_prompt_tokens", "slimserve_generation_tokens"):
        totals = {
            s.labels["variant"]: s.value
            for s in families[name].samples
            if s.name.endswith("_total")
        }
        assert totals["full"] > 0 and totals["int8"] > 0


def test_startup_log_says_what_was_compressed(gateway, gateway_log):
    text = gateway_log.read_text()
    assert "variant int8 ready" in text and "int8-weight-only (212 modules" in text
    assert "slimserve ready in" in text


def test_stream_is_valid_sse(gateway):
    body = {"model": f"{MODEL}:full", "messages": QUESTION, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def _streams(gateway: str, variant: str) -> dict[str, int]:
    return httpx.get(f"{gateway}/v1/variants", timeout=30).json()["variants"][variant]["streams"]


def test_tokens_go_from_the_engine_or_the_replica_straight_to_the_gateway(client, gateway):
    """The engine process sends a request's events to the gateway replica on its node itself;
    those the variant replica labels (log-probabilities) it sends itself; none travel on Ray
    Serve's stream. Both went to the replica's door, no Serve call made
    (replica/early_start.py). Both answer the same text."""
    before = _streams(gateway, "full")
    asked = {"model": f"{MODEL}:full", "prompt": "The capital of France is", "max_tokens": 8}
    plain = client.completions.create(**asked, temperature=0)
    labelled = client.completions.create(**asked, temperature=0, logprobs=1)
    after = _streams(gateway, "full")
    change = {sender: after[sender] - before[sender] for sender in after}
    assert change == {
        "from_engine": 1,
        "from_replica": 1,
        "through_serve": 0,
        "early_started": 2,
        "early_refused": 0,
    }
    assert plain.choices[0].text == labelled.choices[0].text
    assert len(labelled.choices[0].logprobs.tokens) == 8


# Answers decisive at every token (decisive.py): the streamed and the whole six run in batches
# of their own making, whose bf16 sums differ.
PACED_PROMPTS = COUNTING_PROMPTS


async def _answers(gateway: str, stream: bool) -> list[tuple[str, int]]:
    """Every prompt at once on the full variant: (text, completion tokens)."""
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)

    async def one(prompt: str) -> tuple[str, int]:
        asked = {
            "model": f"{MODEL}:full",
            "prompt": prompt,
            "max_tokens": COUNTING_TOKENS,
            "temperature": 0,
        }
        if not stream:
            reply = await client.completions.create(**asked)
            return reply.choices[0].text, reply.usage.completion_tokens
        chunks = [
            chunk
            async for chunk in await client.completions.create(
                **asked, stream=True, stream_options={"include_usage": True}
            )
        ]
        texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
        return "".join(texts), chunks[-1].usage.completion_tokens

    try:
        return await asyncio.gather(*(one(prompt) for prompt in PACED_PROMPTS))
    finally:
        await client.close()


def test_paced_streams_are_token_exact_with_the_whole_answers(gateway):
    """Six streams at once: the engine process paces them (six share its budget: a message
    every 60 ms each, several tokens in it whenever its steps come faster), and every streamed
    answer is the whole answer, token for token, as the same six asked at once without
    streaming. How many tokens a message carries depends on the machine's speed, so it is not
    asserted here; test_stream_pacing.py checks the merging on a real engine independently."""
    before = _streams(gateway, "full")["from_engine"]
    streamed = asyncio.run(_answers(gateway, stream=True))
    assert _streams(gateway, "full")["from_engine"] - before == len(PACED_PROMPTS)
    whole = asyncio.run(_answers(gateway, stream=False))
    assert streamed == whole


def test_a_replica_killed_mid_stream_is_survived(gateway, gateway_log):
    """Near the end of this module: it kills the int8 replica (SIGKILL, as the OOM killer would) and
    waits for Ray Serve to bring it back, so that later tests find the gateway whole."""
    pid = httpx.get(f"{gateway}/v1/variants", timeout=30).json()["variants"]["int8"]["pid"]
    body = {
        "model": f"{MODEL}:int8",
        "messages": QUESTION,
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 5:
                    os.kill(pid, signal.SIGKILL)
    # The stream ended with a word: an error event the client can act on, then [DONE].
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "variant_unavailable", error
    assert "int8" in error["message"]

    health = httpx.get(f"{gateway}/health", timeout=30).json()
    assert health["variants"]["int8"]["state"] == "down"
    pinned = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": f"{MODEL}:int8", "messages": QUESTION, "max_tokens": 2},
        timeout=60,
    )
    assert pinned.status_code == 503 and "retry-after" in pinned.headers
    for _ in range(4):  # unpinned traffic goes to the variant that is up, without an error
        assert _variant_of(gateway) == "full"

    # Ray Serve restarts the replica; it reuses the compressed artifact and its measurements.
    killed_at = time.monotonic()
    while httpx.get(f"{gateway}/health", timeout=30).json()["status"] != "ok":
        assert time.monotonic() - killed_at < 300, "the int8 replica did not come back"
        time.sleep(0.5)
    logging.getLogger(__name__).info(
        "int8 replica back %.1f s after the kill", time.monotonic() - killed_at
    )
    stats = httpx.get(f"{gateway}/v1/variants", timeout=30).json()["variants"]["int8"]
    assert stats["pid"] != pid and stats["cache_status"] == "hit"
    assert "measured before on this machine: reused" in gateway_log.read_text()


def _listener(port: int) -> psutil.Process:
    pids = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert len(pids) == 1, pids
    return psutil.Process(pids.pop())


def test_the_gateway_replica_listens_itself_and_a_killed_one_comes_back_on_its_port(gateway):
    """Last in this module. No HTTP proxy between client and gateway: the gateway replica
    listens on the configured port itself. Killed (SIGKILL) after the tests above left its
    connections in TIME_WAIT, Ray Serve starts another that listens on the same port, and
    requests are answered again."""
    port = int(gateway.rsplit(":", 1)[1])
    listener = _listener(port)
    assert "ServeReplica:slimserve:gateway" in " ".join(listener.cmdline())
    names = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert not [n for n in names if "ProxyActor" in n]  # Serve runs no HTTP proxy here
    listener.kill()
    killed_at = time.monotonic()
    while True:
        assert time.monotonic() - killed_at < 120, "no gateway replica came back on the port"
        try:
            if httpx.get(f"{gateway}/health", timeout=5).json()["status"] == "ok":
                break
        except httpx.HTTPError:
            pass  # nothing listens until the new replica starts
        time.sleep(0.5)
    successor = _listener(port)
    assert successor.pid != listener.pid
    assert "ServeReplica:slimserve:gateway" in " ".join(successor.cmdline())
    assert _variant_of(gateway) in {"full", "int8"}
