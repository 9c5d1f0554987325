"""Engine "vllm": real vLLM for CPU behind the same gateway, next to the torch engine."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .conftest import CONFIGS, assert_disconnect_frees_slot, running_gateway
from .decisive import CAPITAL_ANSWER_TOKENS, CAPITAL_QUESTION

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

MODEL = "smollm2-135m-instruct"
QUESTION = CAPITAL_QUESTION  # answered decisively (decisive.py)


@pytest.fixture(scope="module")
def vllm_gateway(tmp_path_factory) -> Iterator[str]:
    """deploy/configs/vllm.yaml less its torch int8 variant, which no test here asks for (each
    variant's start shares the same two cores)."""
    directory = tmp_path_factory.mktemp("vllm-gateway")
    config = yaml.safe_load((CONFIGS / "vllm.yaml").read_text())
    del config["variants"]["int8"], config["routing"]["split"]["int8"]
    path = directory / "vllm.yaml"
    path.write_text(yaml.safe_dump(config))
    with running_gateway(path, directory / "serve.log") as base:
        yield base


@pytest.fixture(scope="module")
def client(vllm_gateway):
    return openai.OpenAI(base_url=f"{vllm_gateway}/v1", api_key="unused", max_retries=0)


def test_vllm_variant_answers_like_the_torch_engine(client):
    answers = {}
    for variant in ("vllm", "full"):
        reply = client.chat.completions.create(
            model=f"{MODEL}:{variant}",
            messages=QUESTION,
            max_tokens=CAPITAL_ANSWER_TOKENS,
            temperature=0,
        )
        answers[variant] = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens > 0
    assert "Paris" in answers["vllm"]
    # same weights, same prompt tokens, greedy: the two engines agree on a short answer
    assert answers["vllm"] == answers["full"]


def test_vllm_streaming_usage_stop_and_length(client):
    stream = client.completions.create(
        model=f"{MODEL}:vllm",
        prompt="Count: one, two, three,",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens <= 12
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    stopped = client.completions.create(
        model=f"{MODEL}:vllm",
        prompt="Count: one, two, three,",
        max_tokens=12,
        temperature=0,
        stop=[","],
    )
    assert stopped.choices[0].finish_reason == "stop" and "," not in stopped.choices[0].text
    long = client.completions.create(
        model=f"{MODEL}:vllm",
        prompt="Tell me a story.",
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 7


def test_vllm_errors_are_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=f"{MODEL}:vllm", messages=QUESTION, max_tokens=50_000)
    assert error.value.code == "context_length_exceeded"


def test_vllm_disconnect_aborts_the_request(vllm_gateway):
    stats = assert_disconnect_frees_slot(vllm_gateway, MODEL, "vllm")
    assert stats["engine_name"] == "vllm"
    # vLLM runs in the replica's process: the replica sends the tokens to the gateway's inbox
    # itself, none on Serve's stream.
    assert stats["streams"]["from_replica"] > 0
    assert stats["streams"]["through_serve"] == stats["streams"]["from_engine"] == 0
    # The requests went to the replica's door, no Serve call made.
    assert stats["streams"]["early_started"] > 0 and stats["streams"]["early_refused"] == 0


def test_metrics_cover_the_vllm_variant(vllm_gateway, client):
    client.chat.completions.create(model=f"{MODEL}:vllm", messages=QUESTION, max_tokens=4)
    text = httpx.get(f"{vllm_gateway}/metrics", timeout=30).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    counts = {
        s.labels["variant"]: s.value
        for s in families["slimserve_time_to_first_token_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts["vllm"] > 0
    weights = {
        s.labels["variant"]: s.value for s in families["slimserve_variant_weight_bytes"].samples
    }
    assert weights["vllm"] > 2e8


def _processes_of(base: str) -> list[psutil.Process]:
    """The gateway's `slimserve serve` process (the one given this port) and its descendants."""
    port = base.rsplit(":", 1)[1]
    for process in psutil.process_iter():
        try:
            command = process.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if "slimserve.serve.cli" in " ".join(command) and port in command:
            return [process, *process.children(recursive=True)]
    raise AssertionError(f"no slimserve serve process for {base}")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="placement needs two cores")
def test_serving_processes_stay_off_the_cores_vllm_computes_on(vllm_gateway):
    """vLLM's workers bind to the cores vLLM picks; every other process of the gateway runs on
    the rest, but the torch variant's replica and engine process, which compute on all."""
    cpus = frozenset(os.sched_getaffinity(0))  # what the gateway started with
    affinity, names, full = {}, {}, set()
    for process in _processes_of(vllm_gateway):
        try:
            affinity[process.pid] = frozenset(process.cpu_affinity())
            names[process.pid] = " ".join(process.cmdline())
            if "ServeReplica:slimserve:variant-full" in names[process.pid]:
                full |= {process.pid, *(child.pid for child in process.children(recursive=True))}
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    workers = [pid for pid, name in names.items() if name.startswith("VLLM::Worker")]
    assert len(workers) == 2  # variants vllm and vllm-w4
    bound = frozenset().union(*(affinity[pid] for pid in workers))
    assert bound and bound < cpus
    assert len(full) >= 2  # the replica and its engine process
    for pid, cores in affinity.items():
        expected = bound if pid in workers else cpus if pid in full else cpus - bound
        assert cores == expected, (names[pid], sorted(cores), sorted(expected))


def test_compressed_variant_is_exported_for_vllm_and_served(vllm_gateway, client):
    reply = client.chat.completions.create(
        model=f"{MODEL}:vllm-w4", messages=QUESTION, max_tokens=20, temperature=0
    )
    assert "Paris" in reply.choices[0].message.content
    variants = httpx.get(f"{vllm_gateway}/v1/variants", timeout=30).json()["variants"]
    w4, full = variants["vllm-w4"], variants["vllm"]
    assert w4["engine_name"] == "vllm"
    assert w4["compression"]["methods"][0]["method"] == "rtn"
    # 4-bit decoder weights; embeddings stay 16-bit: well under 60% of the bf16 checkpoint
    assert w4["weight_bytes"] < 0.6 * full["weight_bytes"]


def test_vllm_serves_the_openai_features_like_the_torch_engine(client):
    """Prompt log-probabilities (lm-eval's loglikelihood request), n over a prompt list, logit
    bias and a schema-constrained answer, on vLLM next to the torch engine, same weights."""
    ids = [504, 3575, 282, 4649, 314, 7042, 30]  # "The capital of France is Paris."
    loglikelihood = {}
    for variant in ("vllm", "full"):
        reply = client.completions.create(
            model=f"{MODEL}:{variant}",
            prompt=[ids],
            max_tokens=1,
            echo=True,
            logprobs=1,
            temperature=0,
        )
        logprobs = reply.choices[0].logprobs
        assert len(logprobs.tokens) == len(ids) + 1 and logprobs.token_logprobs[0] is None
        pairs = zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True)
        assert all(value <= max(top.values()) for value, top in pairs)
        loglikelihood[variant] = sum(logprobs.token_logprobs[1 : len(ids)])
    # float32 (vLLM) against the torch engine's dtype: the same sum within rounding
    assert loglikelihood["vllm"] == pytest.approx(loglikelihood["full"], abs=0.5)

    choices = client.completions.create(
        model=f"{MODEL}:vllm", prompt=["Hi", "Bye"], n=2, max_tokens=3, seed=1
    ).choices
    assert [c.index for c in choices] == [0, 1, 2, 3]

    banned = client.completions.create(
        model=f"{MODEL}:vllm",
        prompt="The capital of France is",
        max_tokens=3,
        temperature=0,
        logit_bias={"7042": -100},  # " Paris"
    )
    assert "Paris" not in banned.choices[0].text

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=f"{MODEL}:vllm",
        messages=QUESTION,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    assert set(json.loads(reply.choices[0].message.content)) == {"city"}
