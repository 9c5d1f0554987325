"""POST /v1/chat/completions: chat messages in; assistant messages (text or tool calls), or
their chunks, out."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..engine.types import EngineEvent, GenerateRequest, StructuredOutput, TokenLogprob
from .body import read_body
from .choices import Choice, fan_out, usage
from .generation import generate
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    TokenLogprobOut,
    ToolCall,
    ToolCallDelta,
    TopLogprobOut,
    Usage,
    new_id,
    now,
)
from .tools import parse_tool_calls, tool_call_schema

if TYPE_CHECKING:
    from .gateway import GatewayCore


def _engine_message(message: ChatMessage) -> dict:
    # "developer" is OpenAI's newer name for the system role. Earlier tool calls are written
    # into the turn's text, which every chat template can render.
    text = message.text()
    if message.tool_calls:
        calls = [
            {"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls
        ]
        text = f"{text}\n{json.dumps(calls)}" if text else json.dumps(calls)
    return {"role": "system" if message.role == "developer" else message.role, "content": text}


def engine_messages(request: ChatCompletionRequest) -> list[dict]:
    """The messages as the variant's chat template takes them."""
    return [_engine_message(m) for m in request.messages]


def _structured(request: ChatCompletionRequest) -> StructuredOutput | None:
    if request.calls_tools:
        return StructuredOutput(json_schema=tool_call_schema(request))
    if isinstance(request.response_format, JsonObjectFormat):
        return StructuredOutput()
    if isinstance(request.response_format, JsonSchemaResponseFormat):
        return StructuredOutput(
            json_schema=json.dumps(request.response_format.json_schema.json_schema)
        )
    return None


def _top(entry: TokenLogprob) -> TopLogprobOut:
    return TopLogprobOut(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode()))


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprobOut(**_top(e).model_dump(), top_logprobs=[_top(t) for t in e.top])
            for e in entries
        ]
    )


def _answer(
    request: ChatCompletionRequest, choice: Choice
) -> tuple[str | None, list[ToolCall] | None, str | None]:
    """A choice's content, tool calls and finish reason."""
    if request.calls_tools:
        calls = parse_tool_calls(request, choice.text)
        if calls is not None:
            return None, calls, "tool_calls"
    return choice.text, None, choice.finish_reason


class ChatChunks:
    """One streamed answer: a role chunk per choice, content deltas, an empty delta with the
    finish reason, and the usage chunk when asked for. A tool call is sent whole at the end
    (it is known only once its JSON is complete)."""

    def __init__(self, model: str, request: ChatCompletionRequest) -> None:
        self.id = new_id("chatcmpl")
        self.created = now()
        self.model = model
        self.request = request

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def opening(self, choices: list[Choice]) -> list[ChatCompletionChunk]:
        return [
            self._chunk(
                [ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""))]
            )
            for c in choices
        ]

    def event(self, choice: Choice, event: EngineEvent) -> list[ChatCompletionChunk]:
        if event.kind != "delta" or self.request.calls_tools:
            return []
        if not event.text and not event.logprobs:
            return []
        logprobs = chat_logprobs(event.logprobs or []) if self.request.logprobs else None
        delta = ChatDelta(content=event.text)
        return [self._chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)])]

    def finish(self, choice: Choice) -> list[ChatCompletionChunk]:
        chunks = []
        reason = choice.finish_reason
        if self.request.calls_tools:
            content, calls, reason = _answer(self.request, choice)
            deltas = [
                ToolCallDelta(index=i, **call.model_dump()) for i, call in enumerate(calls or [])
            ]
            logprobs = chat_logprobs(choice.logprobs) if self.request.logprobs else None
            delta = ChatDelta(content=content, tool_calls=deltas or None)
            chunks.append(
                self._chunk([ChatChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)])
            )
        end = ChatChunkChoice(index=choice.index, delta=ChatDelta(), finish_reason=reason)
        return [*chunks, self._chunk([end])]

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)


class ChatEndpoint:
    label = "chat"
    request_model = ChatCompletionRequest

    def choices(self, request: ChatCompletionRequest) -> list[Choice]:
        sampling = request.sampling()
        sampling.structured = _structured(request)
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
        base = GenerateRequest(
            request_id="",
            messages=engine_messages(request),
            tools=tools or None,
            sampling=sampling,
        )
        return fan_out([base], request.n)

    def response(
        self, model: str, request: ChatCompletionRequest, choices: list[Choice]
    ) -> ChatCompletionResponse:
        answers = []
        for choice in choices:
            content, calls, reason = _answer(request, choice)
            answers.append(
                ChatChoice(
                    index=choice.index,
                    message=AssistantMessage(content=content, tool_calls=calls),
                    finish_reason=reason,
                    logprobs=chat_logprobs(choice.logprobs) if request.logprobs else None,
                )
            )
        return ChatCompletionResponse(
            id=new_id("chatcmpl"), created=now(), model=model, usage=usage(choices), choices=answers
        )

    def chunks(self, model: str, request: ChatCompletionRequest) -> ChatChunks:
        return ChatChunks(model, request)


def chat_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()
    endpoint = ChatEndpoint()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, core.config.server.max_request_bytes)
        return await generate(core, endpoint, body, request.headers)

    return router
