"""The published OpenAPI document against the app itself: schemathesis generates requests from it
(valid and invalid) for every public path and checks each answer against what it documents (no
5xx, documented statuses, content types, headers and bodies; schema-valid requests accepted,
invalid ones refused; 405 with `Allow`). Real FastAPI app, real VariantServer on a tiny model."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.generation import GenerationMode

from slimserve.serve.api.backends import InProcessBackend
from slimserve.serve.api.gateway import GatewayCore, create_api
from slimserve.serve.api.protocol import ChatCompletionRequest
from slimserve.serve.config import parse_config
from slimserve.serve.replica.server import VariantServer

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    config = parse_config(
        {
            "model": str(tiny_model_dir),
            "served_model_name": "tiny",
            "variants": {"full": {}},
            # A short context bounds the work any generated request can ask for.
            "engine": {"max_model_len": 48, "max_num_seqs": 8, "torch_threads": 1},
            "self_bench": {"enabled": False},
        }
    )
    server = VariantServer("full", config.model_dump(mode="json"))
    yield create_api(GatewayCore(config, {"full": InProcessBackend(server)}))
    server.engine.shutdown()


def test_public_api_answers_as_documented(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [
        result.ok()
        for result in schema.include(path_regex="^/(v1/|health|metrics)").get_all_operations()
    ]
    assert len(operations) == 7
    statuses: Counter[int] = Counter()
    # Invalid data only where there is a body to break: the GET paths take no input.
    runs = [
        (operation, mode)
        for operation in operations
        for mode in (
            GenerationMode if operation.method.upper() == "POST" else [GenerationMode.POSITIVE]
        )
    ]
    for operation, mode in runs:

        @given(case=operation.as_strategy(generation_mode=mode))
        # derandomize: the same cases on every run (random seeds found the bugs fixed here).
        @settings(
            max_examples=40,
            derandomize=True,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def answers_as_documented(case):
            # Every check but "schema-valid data is accepted": some refusals depend on what a
            # schema cannot say (the prompt's token count against the context window, token ids
            # against the vocabulary, a response schema xgrammar cannot compile, rules across
            # fields such as top_logprobs needing logprobs); each is a 400 naming its field,
            # which the other checks hold to the documented error body.
            # n up to 128 choices on one CPU thread takes seconds: a generous read timeout.
            response = case.call_and_validate(
                excluded_checks=[positive_data_acceptance], timeout=120
            )
            statuses[response.status_code] += 1

        answers_as_documented()
    log.info("answers by status: %s", dict(statuses))
    # Both kinds of answer were exercised: generations served, and refusals.
    assert statuses[200] > 20 and statuses[400] > 20


def test_a_wrong_method_is_405_with_allow(app):
    with TestClient(app) as client:
        response = client.get("/v1/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_document_publishes_the_validating_models(app):
    with TestClient(app) as client:
        document = client.get("/openapi.json").json()
    operation = document["paths"]["/v1/chat/completions"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = document["components"]["schemas"][body.rsplit("/", 1)[1]]
    assert request["additionalProperties"] is False
    assert set(request["properties"]) == set(ChatCompletionRequest.model_fields)
    assert {"200", "400", "404", "500", "503"} <= set(operation["responses"])
