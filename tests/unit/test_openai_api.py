"""The OpenAI request features, in-process: real FastAPI app, a real VariantServer on a tiny model.

Log-probabilities are checked against the variant's own scoring path (a separate forward pass over
the whole sequence), penalties and biases by what they force, structured output by parsing it.
"""

from __future__ import annotations

import asyncio
import json
import math
import typing

import jsonschema
import pytest
from fastapi.testclient import TestClient
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from slimserve.serve.api.backends import InProcessBackend
from slimserve.serve.api.gateway import GatewayCore, create_api
from slimserve.serve.api.protocol import ChatCompletionRequest, CompletionRequest
from slimserve.serve.config import parse_config
from slimserve.serve.replica.server import VariantServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    config = parse_config(
        {
            "model": str(tiny_model_dir),
            "served_model_name": "tiny",
            "variants": {"full": {}},
            # Small prefill chunks: prompts span several steps, so prompt log-probabilities
            # are gathered across chunks.
            "engine": {
                "max_model_len": 256,
                "max_num_seqs": 8,
                "torch_threads": 1,
                "prefill_chunk_tokens": 16,
            },
        }
    )
    server = VariantServer("full", config.model_dump(mode="json"))
    core = GatewayCore(config, {"full": InProcessBackend(server)})
    with TestClient(create_api(core)) as client:
        yield client, server
    server.engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return served[0]


def _post(client, path, **body):
    body.setdefault("model", "tiny")
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _events(response) -> list[dict]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _stream(client, path, **body) -> list[dict]:
    body.setdefault("model", "tiny")
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return _events(response)


def _error(client, path, body) -> dict:
    response = client.post(path, json={"model": "tiny", **body})
    assert response.status_code == 400, response.text
    return response.json()["error"]


# 44 tokens: three prefill chunks.
PROMPT_IDS = [504, 3458, 314, 260, 1345, 282, 1118, 30, 378, 2593, 314] * 4


# ---- log-probabilities -------------------------------------------------------------------------


def test_echo_logprobs_equal_the_variants_own_scoring(served, tokenizer):
    """lm-eval's loglikelihood request, verbatim: the prompt's log-probabilities through the
    endpoint are those of a whole-sequence forward pass in the variant itself."""
    client, server = served
    body = _post(
        client,
        COMPLETIONS,
        prompt=[PROMPT_IDS],
        max_tokens=1,
        temperature=0,
        logprobs=1,
        echo=True,
        seed=1234,
    )
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(PROMPT_IDS) + 1
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = asyncio.run(server.engine.target_logprobs(PROMPT_IDS)).tolist()
    got = logprobs["token_logprobs"][1 : len(PROMPT_IDS)]
    assert got == pytest.approx(expected, abs=2e-3)
    for token, value, top in zip(
        logprobs["tokens"][1:],
        logprobs["token_logprobs"][1:],
        logprobs["top_logprobs"][1:],
        strict=True,
    ):
        assert top[token] == value  # the token itself is among the alternatives sent
        assert value <= max(top.values())
    # Greedy: the generated token is the most likely one, at exactly the same float.
    last_top = logprobs["top_logprobs"][-1]
    assert logprobs["token_logprobs"][-1] == max(last_top.values())
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert choice["text"].startswith(tokenizer.decode(PROMPT_IDS))
    assert body["usage"]["prompt_tokens"] == len(PROMPT_IDS)


def test_echo_with_max_tokens_zero_is_the_prompt_alone(client, tokenizer):
    body = _post(client, COMPLETIONS, prompt=PROMPT_IDS, max_tokens=0, echo=True, logprobs=0)
    choice = body["choices"][0]
    assert choice["text"] == tokenizer.decode(PROMPT_IDS)
    assert len(choice["logprobs"]["token_logprobs"]) == len(PROMPT_IDS)
    assert body["usage"]["completion_tokens"] == 0
    assert choice["finish_reason"] == "length"


def test_chat_logprobs_shape_and_greedy_top(client):
    body = _post(
        client,
        CHAT,
        messages=[{"role": "user", "content": "Count to five"}],
        max_tokens=6,
        temperature=0,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=3,
    )
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 6
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]  # greedy
        assert entry["bytes"] == list(entry["token"].encode())
    text = "".join(entry["token"] for entry in content)
    assert body["choices"][0]["message"]["content"] == text


def test_sampled_logprobs_are_after_temperature(client):
    """At temperature 2 the reported distribution is flatter than the model's own."""
    common = dict(prompt=PROMPT_IDS, max_tokens=1, logprobs=5, seed=7)
    cold = _post(client, COMPLETIONS, temperature=0, **common)["choices"][0]["logprobs"]
    hot = _post(client, COMPLETIONS, temperature=2.0, **common)["choices"][0]["logprobs"]
    cold_top = max(cold["top_logprobs"][0].values())
    hot_top = max(hot["top_logprobs"][0].values())
    assert hot_top < cold_top
    for alternatives in (cold["top_logprobs"][0], hot["top_logprobs"][0]):
        assert math.fsum(math.exp(v) for v in alternatives.values()) <= 1.0 + 1e-6


def test_streamed_completion_logprobs_match_the_whole_answer(client):
    common = dict(prompt="The capital of France", max_tokens=5, temperature=0, logprobs=2)
    whole = _post(client, COMPLETIONS, ignore_eos=True, echo=True, **common)["choices"][0]
    events = _stream(client, COMPLETIONS, ignore_eos=True, echo=True, **common)
    parts = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(p["text"] for p in parts) == whole["text"]
    streamed = [p["logprobs"] for p in parts if p["logprobs"]]
    tokens = [t for part in streamed for t in part["tokens"]]
    offsets = [o for part in streamed for o in part["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"]
    assert offsets == whole["logprobs"]["text_offset"]


# ---- prompts and choices -----------------------------------------------------------------------


def test_prompt_lists_and_n_number_choices_prompt_major(client, tokenizer):
    prompts = ["Once upon a time", "The quick brown fox"]
    body = _post(client, COMPLETIONS, prompt=prompts, n=2, max_tokens=3, temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    prompt_tokens = sum(len(tokenizer(p).input_ids) for p in prompts)
    assert body["usage"]["prompt_tokens"] == prompt_tokens  # once per prompt, not per choice
    by_ids = _post(
        client,
        COMPLETIONS,
        prompt=[tokenizer(p).input_ids for p in prompts],
        n=2,
        max_tokens=3,
        temperature=0,
    )
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in body["choices"]]


def test_n_choices_with_a_seed_differ_and_repeat(client):
    body = dict(
        messages=[{"role": "user", "content": "Tell me a story"}],
        n=3,
        max_tokens=8,
        temperature=1.0,
        seed=11,
        ignore_eos=True,
    )
    first = [c["message"]["content"] for c in _post(client, CHAT, **body)["choices"]]
    again = [c["message"]["content"] for c in _post(client, CHAT, **body)["choices"]]
    assert first == again
    assert len(set(first)) == 3


def test_best_of_returns_the_most_likely_of_its_candidates(client):
    common = dict(prompt="A long time ago", max_tokens=6, temperature=1.0, seed=3, logprobs=0)
    candidates = _post(client, COMPLETIONS, n=4, **common)["choices"]
    best = _post(client, COMPLETIONS, n=1, best_of=4, **common)["choices"]
    assert len(best) == 1 and best[0]["index"] == 0

    def score(choice):
        return math.fsum(choice["logprobs"]["token_logprobs"])

    assert best[0]["text"] == max(candidates, key=score)["text"]


def test_streamed_choices_carry_their_index(client):
    common = dict(
        messages=[{"role": "user", "content": "Hi"}],
        n=2,
        max_tokens=4,
        temperature=0,
        ignore_eos=True,
    )
    whole = _post(client, CHAT, **common)["choices"]
    events = _stream(client, CHAT, stream_options={"include_usage": True}, **common)
    texts = {0: "", 1: ""}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"].get("content", "")
    assert texts == {c["index"]: c["message"]["content"] for c in whole}
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_continuous_usage_stats_put_usage_in_every_chunk(client):
    events = _stream(
        client,
        COMPLETIONS,
        prompt="Hello",
        max_tokens=4,
        ignore_eos=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 4


# ---- sampling controls -------------------------------------------------------------------------


def test_logit_bias_forces_and_forbids(client, tokenizer):
    forced = tokenizer.encode(" banana")[0]
    body = _post(
        client,
        COMPLETIONS,
        prompt=PROMPT_IDS,
        max_tokens=4,
        temperature=0,
        ignore_eos=True,
        logit_bias={str(forced): 100},
    )
    assert body["choices"][0]["text"] == tokenizer.decode([forced] * 4)
    plain = _post(client, COMPLETIONS, prompt=PROMPT_IDS, max_tokens=1, temperature=0, logprobs=0)
    first = plain["choices"][0]["logprobs"]["tokens"][0]
    first_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(first))[0]
    banned = _post(
        client,
        COMPLETIONS,
        prompt=PROMPT_IDS,
        max_tokens=1,
        temperature=0,
        logit_bias={str(first_id): -100},
    )
    assert banned["choices"][0]["text"] != first


def test_min_tokens_holds_back_a_stop_token(client, tokenizer):
    stop = tokenizer.encode(" banana")[0]
    common = dict(
        prompt=PROMPT_IDS,
        max_tokens=20,
        temperature=0,
        stop_token_ids=[stop],
        logit_bias={str(stop): 50},
    )
    early = _post(client, COMPLETIONS, **common)
    assert early["choices"][0]["finish_reason"] == "stop"
    assert early["usage"]["completion_tokens"] == 1
    late = _post(client, COMPLETIONS, min_tokens=5, **common)
    assert late["choices"][0]["finish_reason"] == "stop"
    assert late["usage"]["completion_tokens"] == 6


def test_penalties_change_greedy_output(client):
    common = dict(prompt=PROMPT_IDS, max_tokens=12, temperature=0, ignore_eos=True)
    plain = _post(client, COMPLETIONS, **common)["choices"][0]["text"]
    for penalty in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"repetition_penalty": 2.0},
    ):
        assert _post(client, COMPLETIONS, **common, **penalty)["choices"][0]["text"] != plain


def test_a_stop_list_of_any_length(client):
    stops = [f"never-{i}" for i in range(12)]
    body = _post(client, COMPLETIONS, prompt="Hi", max_tokens=3, stop=stops, ignore_eos=True)
    assert body["choices"][0]["finish_reason"] == "length"


# ---- structured output -------------------------------------------------------------------------

FLAG_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}},
    "required": ["ok", "size"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_matches(client, stream):
    body = dict(
        messages=[{"role": "user", "content": "Answer in JSON"}],
        max_tokens=40,
        temperature=1.0,
        seed=5,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "flag", "schema": FLAG_SCHEMA, "strict": True},
        },
    )
    if stream:
        events = _stream(client, CHAT, **body)
        text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
    else:
        text = _post(client, CHAT, **body)["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), FLAG_SCHEMA)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_tool_calls_match_the_tools_schemas(client, tool_choice, stream):
    body = dict(
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=[WEATHER, TIME],
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        max_tokens=40,
        temperature=1.0,
        seed=2,
    )
    if stream:
        events = _stream(client, CHAT, **body)
        deltas = [c for e in events for c in e["choices"]]
        calls = [call for d in deltas for call in d["delta"].get("tool_calls", [])]
        reason = deltas[-1]["finish_reason"]
    else:
        choice = _post(client, CHAT, **body)["choices"][0]
        calls, reason = choice["message"]["tool_calls"], choice["finish_reason"]
        assert choice["message"]["content"] is None
    assert reason == "tool_calls" and len(calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    name = calls[0]["function"]["name"]
    if isinstance(tool_choice, dict):
        assert name == "get_time"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[name])
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


def test_tool_history_and_none_choice_are_accepted(client):
    body = _post(
        client,
        CHAT,
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=3,
    )
    assert "tool_calls" not in body["choices"][0]["message"]


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}, "tool_choice"),
        (
            CHAT,
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [WEATHER],
                "tool_choice": "auto",
            },
            "tool_choice",
        ),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            "tool_choice",
        ),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "store": True}, "store"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": "x"}], "service_tier": "flex"},
            "service_tier",
        ),
        (
            CHAT,
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                },
            },
            "response_format",
        ),
        (
            CHAT,
            {
                "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": True},
            },
            "stream_options",
        ),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, "frobnicate"),
        (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"prompt": "x", "best_of": 1, "n": 2}, "best_of"),
        (COMPLETIONS, {"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
        (COMPLETIONS, {"prompt": [10**7]}, "prompt"),
        (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        (COMPLETIONS, {"prompt": "x", "stop_token_ids": [10**7]}, "stop_token_ids"),
        (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
    ],
)
def test_refusals_name_the_field(client, path, body, param):
    assert _error(client, path, body)["param"] == param


def _openai_fields(params_type) -> list[str]:
    return sorted(typing.get_type_hints(params_type))


@pytest.mark.parametrize(
    ("path", "model", "fields"),
    [
        (CHAT, ChatCompletionRequest, _openai_fields(chat_params.CompletionCreateParamsStreaming)),
        (
            COMPLETIONS,
            CompletionRequest,
            _openai_fields(completion_params.CompletionCreateParamsStreaming),
        ),
    ],
)
def test_every_openai_field_is_honoured_or_refused_by_name(client, path, model, fields):
    """Walks the request schema the official SDK publishes: each field is one the request
    model declares, or a refusal that names it."""
    declared = {f.alias or name for name, f in model.model_fields.items()}
    base = {"messages": [{"role": "user", "content": "x"}]} if path == CHAT else {"prompt": "x"}
    for field in fields:
        if field in declared:
            continue
        assert field in model.REFUSED, f"{field} is neither honoured nor refused"
        error = _error(client, path, {**base, field: "some value"})
        assert error["param"] == field
        assert error["code"] == "unsupported_parameter"


def test_a_null_field_is_an_absent_one(client):
    body = _post(
        client,
        CHAT,
        messages=[{"role": "user", "content": "x", "name": None}],
        max_tokens=2,
        stop=None,
        seed=None,
        audio=None,
    )
    assert body["choices"][0]["message"]["content"] is not None
