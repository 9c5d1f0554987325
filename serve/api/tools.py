"""Tool calls on chat completions: the JSON schema a required or named call is decoded under, and
the calls read back out of the constrained output.

A required call is decoded as `[{"name": ..., "parameters": {...}}, ...]` (one of the tools'
schemas per item, as vLLM does); a named call as that function's arguments object alone.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from .protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _call_schema(request: ChatCompletionRequest) -> dict[str, Any]:
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": tool.function.name},
                "parameters": tool.function.parameters or _ANY_OBJECT,
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in request.tools or []
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not request.parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def tool_call_schema(request: ChatCompletionRequest) -> str:
    """The JSON schema (as text) the answer to a request that must call a tool is decoded under."""
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in request.tools or [] if t.function.name == choice.function.name)
        return json.dumps(tool.function.parameters or _ANY_OBJECT)
    return json.dumps(_call_schema(request))


def _call(name: str, arguments: Any) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        type="function",
        function=FunctionCall(name=name, arguments=json.dumps(arguments)),
    )


def parse_tool_calls(request: ChatCompletionRequest, text: str) -> list[ToolCall] | None:
    """The calls in a constrained answer; None when it is not complete JSON (cut off by
    max_tokens): the caller then gets the text as it is, with finish_reason "length"."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        return [_call(choice.function.name, value)]
    return [_call(item["name"], item["parameters"]) for item in value]
