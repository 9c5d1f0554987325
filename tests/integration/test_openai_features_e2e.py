"""The OpenAI request features through the real default gateway (SmolLM2-135M-Instruct, full and
int8, Ray Serve, HTTP), with the official `openai` client on each variant."""

from __future__ import annotations

import asyncio
import json
import math

import jsonschema
import openai
import pytest

from slimserve.serve.config import load_config
from slimserve.serve.replica.server import VariantServer

from .conftest import CONFIGS
from .decisive import CAPITAL_QUESTION

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

CONFIG = load_config(CONFIGS / "default.yaml", check_models=False)
MODEL = CONFIG.public_model_name
VARIANTS = sorted(CONFIG.variants)
QUESTION = CAPITAL_QUESTION  # answered decisively (decisive.py)
JSON_REQUEST = "Describe Paris as a JSON object with a name and a country."
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local_int8():
    """The compressed variant, built in this process from the same config: the reference."""
    as_dict = CONFIG.model_dump(mode="json")
    as_dict["self_bench"] = {**as_dict.get("self_bench", {}), "enabled": False}
    server = VariantServer("int8", as_dict)
    yield server
    server.engine.shutdown()


def test_loglikelihood_through_the_endpoint_equals_in_process(client, local_int8):
    server, variant = local_int8, "int8"
    context = server.tokenizer("Question: What is the capital of France?\nAnswer:").input_ids
    continuation = server.tokenizer(" Paris").input_ids
    ids = context + continuation
    reply = client.completions.create(
        model=f"{MODEL}:{variant}",
        prompt=[ids],
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0,
    )
    token_logprobs = reply.choices[0].logprobs.token_logprobs
    assert len(token_logprobs) == len(ids) and token_logprobs[0] is None
    through_endpoint = math.fsum(token_logprobs[len(context) :])
    expected = asyncio.run(server.engine.target_logprobs(ids))[len(context) - 1 :].sum().item()
    assert through_endpoint == pytest.approx(expected, abs=0.05)
    assert through_endpoint > -10  # " Paris" is likely after this question


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_logprobs_on_each_variant(client, variant):
    reply = client.chat.completions.create(
        model=f"{MODEL}:{variant}",
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(entry.logprob == entry.top_logprobs[0].logprob for entry in content)
    assert "Paris" in "".join(entry.token for entry in content)


@pytest.mark.parametrize("variant", VARIANTS)
def test_json_schema_and_json_object_on_each_variant(client, variant):
    reply = client.chat.completions.create(
        model=f"{MODEL}:{variant}",
        messages=[{"role": "user", "content": "Name the capital of France and its country."}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": CITY_SCHEMA, "strict": True},
        },
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY_SCHEMA)
    reply = client.chat.completions.create(
        model=f"{MODEL}:{variant}",
        messages=[{"role": "user", "content": JSON_REQUEST}],
        max_tokens=80,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("variant", VARIANTS)
def test_required_tool_call_on_each_variant(client, variant):
    reply = client.chat.completions.create(
        model=f"{MODEL}:{variant}",
        messages=[{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_TOOL["function"]["parameters"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_n_prompts_and_sampling_controls(client, variant):
    request = dict(
        model=f"{MODEL}:{variant}",
        prompt=["The capital of France is", "The capital of Italy is"],
        n=2,
        max_tokens=6,
        temperature=0.8,
        seed=42,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.1, "min_tokens": 2},
    )
    replies = client.completions.create(**request)
    assert [c.index for c in replies.choices] == [0, 1, 2, 3]
    assert replies.usage.completion_tokens >= 4 * 2  # min_tokens per choice
    again = client.completions.create(**request)
    assert [c.text for c in again.choices] == [c.text for c in replies.choices]  # the seed


def test_logit_bias_and_stop_token_ids(client, local_int8):
    tokenizer = local_int8.tokenizer
    [paris] = tokenizer(" Paris").input_ids
    reply = client.completions.create(
        model=f"{MODEL}:full",
        prompt="The capital of France is",
        max_tokens=10,
        temperature=0,
        logit_bias={str(paris): -100},
        extra_body={"stop_token_ids": [tokenizer.convert_tokens_to_ids(".")]},
    )
    assert "Paris" not in reply.choices[0].text.split(".")[0][:6]


def test_unknown_and_refused_fields_are_400_naming_them(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, extra_body={"frobnicate": True}
        )
    assert error.value.param == "frobnicate"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, reasoning_effort="high")
    assert error.value.param == "reasoning_effort"
