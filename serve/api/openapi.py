"""The published OpenAPI document, with the very models the handlers validate and answer with.

The handlers read raw bodies (so that every refusal is an OpenAI error, not FastAPI's 422), which
hides their bodies from FastAPI's generated schema; this adds them back, with every status a path
can answer and the shape of its body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .admin import CanaryToggle, RoutingUpdate
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
)

# What both generation endpoints may answer besides 200.
_GENERATION_ERRORS = {
    400: "a field is missing, unknown, mistyped, out of range, or refused",
    404: "no such model",
    413: "the request body is larger than server.max_request_bytes",
    500: "the variant failed",
    503: "overloaded (the variant's queue is full, or the request would wait or waited past its "
    "queue timeout) or the variant is down; retry after Retry-After seconds",
}

# path -> method -> (request body, 200 body, the statuses it may answer with besides 200)
_OPERATIONS: dict[str, dict[str, tuple[type[BaseModel] | None, Any, dict[int, str]]]] = {
    "/v1/chat/completions": {
        "post": (
            ChatCompletionRequest,
            ChatCompletionResponse,
            _GENERATION_ERRORS,
        )
    },
    "/v1/completions": {
        "post": (
            CompletionRequest,
            CompletionResponse,
            _GENERATION_ERRORS,
        )
    },
    "/v1/models": {"get": (None, ModelList, {})},
    "/health": {"get": (None, dict, {503: "variants are starting, or every one is down"})},
    "/v1/variants": {"get": (None, dict, {})},
    "/v1/canary": {"get": (None, dict, {})},
    "/admin/routing": {
        "get": (None, dict, {401: "no token", 403: "wrong token or admin disabled"}),
        "put": (
            RoutingUpdate,
            dict,
            {400: "invalid update", 401: "no token", 403: "wrong token or admin disabled"},
        ),
    },
    "/admin/canary": {
        "put": (
            CanaryToggle,
            dict,
            {400: "invalid body", 401: "no token", 403: "wrong token or admin disabled"},
        )
    },
    "/admin/canary/evaluate": {
        "post": (None, dict, {401: "no token", 403: "wrong token or admin disabled"})
    },
}
_STREAM_CHUNKS = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": CompletionResponse,
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _null_means_absent(schema: dict[str, Any]) -> None:
    """The handlers take a null optional field as an absent one (errors.validate_body): say so."""
    required = set(schema.get("required", ()))
    for name, field in schema["properties"].items():
        if name not in required:
            schema["properties"][name] = {"anyOf": [field, {"type": "null"}]}


def openapi_document(api: FastAPI, model_ids: list[str]) -> dict[str, Any]:
    """The document; `model_ids` are the names a request's `model` may take."""
    document = get_openapi(title=api.title, version=api.version, routes=api.routes)
    models: list[tuple[type[BaseModel], Any]] = [(ErrorResponse, "serialization")]
    for methods in _OPERATIONS.values():
        for request, response, _ in methods.values():
            if request is not None:
                models.append((request, "validation"))
            if isinstance(response, type) and issubclass(response, BaseModel):
                models.append((response, "serialization"))
    models += [(chunk, "serialization") for chunk in _STREAM_CHUNKS.values()]
    refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(top.get("$defs", {}))
    for request in (ChatCompletionRequest, CompletionRequest):
        name = refs[(request, "validation")]["$ref"].rsplit("/", 1)[1]
        schemas[name]["properties"]["model"] = {"type": "string", "enum": model_ids}
        _null_means_absent(schemas[name])
    _null_means_absent(schemas["ChatMessage"])

    def ref(model: Any, mode: str) -> dict[str, Any]:
        if model is dict:
            return {"type": "object"}
        return refs[(model, mode)]

    error = {"description": "", "content": _json(ref(ErrorResponse, "serialization"))}
    for path, methods in _OPERATIONS.items():
        for method, (request, response, statuses) in methods.items():
            operation = document["paths"][path][method]
            if request is not None:
                operation["requestBody"] = {
                    "required": True,
                    "content": _json(ref(request, "validation")),
                }
            ok = {"description": "OK", "content": _json(ref(response, "serialization"))}
            if path in _STREAM_CHUNKS:
                ok["description"] = (
                    "the answer; with `stream: true`, server-sent events each holding a "
                    f"{_STREAM_CHUNKS[path].__name__}, then `[DONE]`"
                )
                # One server-sent event: its data is a chunk as JSON (or the error that ended
                # the stream), or the closing "[DONE]".
                chunk = ref(_STREAM_CHUNKS[path], "serialization")
                payload = {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"anyOf": [chunk, ref(ErrorResponse, "serialization")]},
                }
                event = {
                    "type": "object",
                    "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]}},
                    "required": ["data"],
                }
                ok["content"]["text/event-stream"] = {"schema": event}
            operation["responses"] = {
                "200": ok,
                **{str(code): {**error, "description": why} for code, why in statuses.items()},
            }
    document["paths"]["/metrics"]["get"]["responses"] = {
        "200": {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    }
    return document


def publish_openapi(api: FastAPI, model_ids: list[str]) -> None:
    """Serve `openapi_document` at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = openapi_document(api, model_ids)
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
