"""The ingress: OpenAI API, routing, streaming, metrics. Holds no model.

`GatewayCore` does the work against a set of variant backends; `create_api` wraps it in FastAPI.
In Ray Serve the backends are DeploymentHandles; in-process they can be VariantServer objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimserve.serve.config import SlimserveConfig
from slimserve.serve.engine.types import EngineEvent, GenerateRequest
from slimserve.serve.errors import (
    OpenAIError,
    error_payload,
    error_response,
    from_validation_error,
    parse_json_body,
)
from slimserve.serve.metrics import GatewayMetrics
from slimserve.serve.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)
from slimserve.serve.router import UnknownModelError, VariantRouter

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


class VariantBackend(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineEvent]: ...
    async def stats(self) -> dict[str, Any]: ...


class InProcessBackend:
    """A VariantServer in this process (tests, tools)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineEvent]:
        async for item in self.server.generate(request.model_dump()):
            yield EngineEvent.model_validate(item)

    async def stats(self) -> dict[str, Any]:
        return await self.server.stats()


class RayBackend:
    """A VariantServer deployment behind a Ray Serve DeploymentHandle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._stream = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineEvent]:
        response = self._stream.generate.remote(request.model_dump())
        try:
            async for item in response:
                yield EngineEvent.model_validate(item)
        finally:
            response.cancel()  # frees the replica's batch slot when the caller went away

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats.remote()


class _RequestClock:
    """Latency bookkeeping for one request, reported per variant."""

    def __init__(self, metrics: GatewayMetrics, variant: str) -> None:
        self.metrics = metrics
        self.variant = variant
        self.arrived = time.perf_counter()
        self.last: float | None = None

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        stamp = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.variant).observe(stamp - self.arrived)
            count -= 1
        else:
            gap = (stamp - self.last) / count
            for _ in range(count):
                self.metrics.inter_token.labels(self.variant).observe(gap)
        self.last = stamp

    def done(self, event: EngineEvent) -> None:
        self.metrics.e2e.labels(self.variant).observe(time.perf_counter() - self.arrived)
        self.metrics.prompt_tokens.labels(self.variant).inc(event.prompt_tokens)
        self.metrics.generation_tokens.labels(self.variant).inc(event.completion_tokens)


class GatewayCore:
    def __init__(self, config: SlimserveConfig, backends: Mapping[str, VariantBackend]) -> None:
        self.config = config
        self.backends = dict(backends)
        self.router = VariantRouter(
            config.public_model_name,
            list(config.variants),
            config.effective_split(),
            config.routing.sticky_header,
        )
        self.metrics = GatewayMetrics(list(config.variants))
        self.variant_header = config.routing.variant_header

    # ---- generation --------------------------------------------------------------------------

    async def handle(self, endpoint: str, raw: bytes, headers: Mapping[str, str]) -> Response:
        variant = "none"
        try:
            body = parse_json_body(raw)
            model_cls = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
            try:
                request = model_cls.model_validate(body)
            except ValidationError as error:
                raise from_validation_error(error) from None
            try:
                variant = self.router.choose(request.model, headers)
            except UnknownModelError:
                raise OpenAIError.of(
                    404,
                    f"The model `{request.model}` does not exist. "
                    f"Available: {', '.join(self.router.model_ids())}",
                    param="model",
                    code="model_not_found",
                ) from None
            return await self._generate(endpoint, request, variant)
        except OpenAIError as error:
            self.metrics.requests.labels(variant, endpoint, str(error.info.status)).inc()
            extra = {self.variant_header: variant} if variant != "none" else None
            return error_response(error.info, headers=extra)

    async def _generate(
        self, endpoint: str, request: ChatCompletionRequest | CompletionRequest, variant: str
    ) -> Response:
        generate_request = GenerateRequest(
            request_id=new_id("req"),
            prompt=request.prompt_text() if isinstance(request, CompletionRequest) else None,
            messages=request.chat_messages()
            if isinstance(request, ChatCompletionRequest)
            else None,
            sampling=request.sampling(),
        )
        clock = _RequestClock(self.metrics, variant)
        events = self.backends[variant].generate(generate_request)
        first = await anext(events)
        if first.kind == "error":
            await events.aclose()
            raise OpenAIError(first.error)
        headers = {self.variant_header: variant}
        model_name = f"{self.config.public_model_name}:{variant}"
        if request.stream:
            stream = self._sse(endpoint, request, events, clock, model_name)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        return await self._collect(endpoint, events, clock, model_name, headers)

    async def _collect(self, endpoint, events, clock, model_name, headers) -> Response:
        parts: list[str] = []
        final: EngineEvent | None = None
        try:
            async for event in events:
                if event.kind == "delta":
                    clock.tokens(event.tokens)
                    parts.append(event.text)
                elif event.kind == "error":
                    raise OpenAIError(event.error)
                elif event.kind == "done":
                    clock.done(event)
                    final = event
                    break
        finally:
            await events.aclose()
        if final is None:
            raise OpenAIError.of(500, "the variant ended the stream without finishing")
        text = "".join(parts)
        usage = Usage.of(final.prompt_tokens, final.completion_tokens)
        event = final
        if endpoint == "chat":
            body = ChatCompletionResponse(
                id=new_id("chatcmpl"),
                created=now(),
                model=model_name,
                usage=usage,
                choices=[
                    ChatChoice(
                        message=AssistantMessage(content=text), finish_reason=event.finish_reason
                    )
                ],
            )
        else:
            body = CompletionResponse(
                id=new_id("cmpl"),
                created=now(),
                model=model_name,
                usage=usage,
                choices=[CompletionChoice(text=text, finish_reason=event.finish_reason)],
            )
        self.metrics.requests.labels(clock.variant, endpoint, "200").inc()
        return JSONResponse(body.model_dump(), headers=headers)

    async def _sse(self, endpoint, request, events, clock, model_name) -> AsyncIterator[str]:
        chat = endpoint == "chat"
        ident, created = new_id("chatcmpl" if chat else "cmpl"), now()

        def chunk(text: str | None, finish=None, role=None, usage=None) -> str:
            if chat:
                body = ChatCompletionChunk(
                    id=ident,
                    created=created,
                    model=model_name,
                    usage=usage,
                    choices=[]
                    if usage
                    else [
                        ChatChunkChoice(
                            delta=ChatDelta(role=role, content=text), finish_reason=finish
                        )
                    ],
                )
            else:
                body = CompletionResponse(
                    id=ident,
                    created=created,
                    model=model_name,
                    usage=usage,
                    choices=[]
                    if usage
                    else [CompletionChoice(text=text or "", finish_reason=finish)],
                )
            payload = body.model_dump()
            if usage is None:
                payload.pop("usage")
            for choice in payload["choices"]:  # OpenAI omits unset delta fields
                if "delta" in choice:
                    choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            return f"data: {json.dumps(payload)}\n\n"

        status = "499"  # until the stream completes, the caller is the one who left
        try:
            if chat:
                yield chunk("", role="assistant")
            async for event in events:
                if event.kind == "delta":
                    clock.tokens(event.tokens)
                    if event.text:
                        yield chunk(event.text)
                elif event.kind == "error":
                    status = str(event.error.status)
                    yield f"data: {json.dumps(error_payload(event.error))}\n\n"
                    break
                elif event.kind == "done":
                    clock.done(event)
                    status = "200"
                    yield chunk(None if chat else "", finish=event.finish_reason)
                    if request.include_usage:
                        yield chunk(
                            None, usage=Usage.of(event.prompt_tokens, event.completion_tokens)
                        )
                    break
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
            self.metrics.requests.labels(clock.variant, endpoint, status).inc()

    # ---- the rest of the surface -------------------------------------------------------------

    def models(self) -> ModelList:
        created = now()
        return ModelList(data=[ModelCard(id=m, created=created) for m in self.router.model_ids()])

    async def _probe(self, variant: str) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.backends[variant].stats(), PROBE_TIMEOUT_S)
        except Exception as error:
            log.warning("variant %s did not answer its stats probe: %s", variant, error)
            return None

    async def variant_stats(self) -> dict[str, dict[str, Any] | None]:
        names = list(self.backends)
        results = await asyncio.gather(*(self._probe(n) for n in names))
        return dict(zip(names, results, strict=True))

    async def render_metrics(self) -> bytes:
        for variant, stats in (await self.variant_stats()).items():
            self.metrics.update_variant(variant, stats)
        return self.metrics.render()


def create_api(core: GatewayCore) -> FastAPI:
    api = FastAPI(title="slimserve", docs_url=None, redoc_url=None)

    @api.exception_handler(OpenAIError)
    async def _openai_error(_: Request, error: OpenAIError) -> JSONResponse:
        return error_response(error.info)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(OpenAIError.of(error.status_code, str(error.detail)).info)

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(OpenAIError.of(500, f"internal error: {error}").info)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await core.handle("chat", await request.body(), request.headers)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await core.handle("completion", await request.body(), request.headers)

    @api.get("/v1/models")
    async def models() -> dict:
        return core.models().model_dump()

    @api.get("/v1/variants")
    async def variants() -> dict:
        return {"split": core.router.split, "variants": await core.variant_stats()}

    @api.get("/health")
    async def health() -> JSONResponse:
        stats = await core.variant_stats()
        ready = {name: s is not None for name, s in stats.items()}
        return JSONResponse(
            {"status": "ok" if all(ready.values()) else "unavailable", "variants": ready},
            status_code=200 if all(ready.values()) else 503,
        )

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(await core.render_metrics(), media_type=CONTENT_TYPE_LATEST)

    return api


class GatewayDeployment:
    """Ray Serve ingress: built with the variants' handles, serves the FastAPI app above."""

    def __init__(self, config: dict[str, Any], variants: dict[str, Any]) -> None:
        from slimserve.serve.logs import configure_logging

        configure_logging()
        backends = {name: RayBackend(handle) for name, handle in variants.items()}
        self.core = GatewayCore(SlimserveConfig.model_validate(config), backends)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.core)
