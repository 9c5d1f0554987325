"""The ingress: OpenAI API, routing, streaming, metrics, shadow copies, canary. Holds no model.

`GatewayCore` does the work against a set of variant backends; `create_api` wraps it in FastAPI.
In Ray Serve the backends are DeploymentHandles; in-process they can be VariantServer objects.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from ..config import RoutingConfig, ShadowRule, SlimserveConfig, check_routing_names
from ..engine.types import EngineEvent, GenerateRequest
from ..observability.cost import cost_per_1k_tokens
from ..observability.flops import FlopModel
from ..observability.metrics import GatewayMetrics
from ..observability.mfu import RequestWork, WorkMeter, utilization
from ..routing.canary_controller import CanaryController
from ..routing.router import RoutingError, UnknownModelError, VariantRouter
from ..routing.shadow import ShadowManager
from .admin import admin_router, admin_token
from .errors import (
    OpenAIError,
    error_payload,
    error_response,
    from_validation_error,
    parse_json_body,
)
from .protocol import (
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

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


class VariantBackend(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineEvent]: ...
    async def stats(self) -> dict[str, Any]: ...
    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict: ...


class InProcessBackend:
    """A VariantServer in this process (tests, tools)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineEvent]:
        async for item in self.server.generate(request.model_dump()):
            yield EngineEvent.model_validate(item)

    async def stats(self) -> dict[str, Any]:
        return await self.server.stats()

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.server.score(request.model_dump(), reference, limit)


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

    async def score(self, request: GenerateRequest, reference: str, limit: int) -> dict:
        return await self.handle.score.remote(request.model_dump(), reference, limit)


class _RequestClock:
    """Bookkeeping of one caller request, reported per variant: latency, tokens, FLOPs of work,
    the canary's sample, and the text a shadow copy is compared with."""

    def __init__(self, core: GatewayCore, variant: str, shadows: list[ShadowRule]) -> None:
        self.core = core
        self.metrics = core.metrics
        self.variant = variant
        self.shadows = shadows
        self.arrived = time.perf_counter()
        self.last: float | None = None
        self.ttft: float | None = None
        self.work = RequestWork()
        self.parts: list[str] = []
        self.finished = False
        core.in_flight += 1

    def accepted(self, event: EngineEvent) -> None:
        self.work.accepted(event.prompt_tokens)

    def tokens(self, count: int, text: str = "") -> None:
        if self.shadows:
            self.parts.append(text)
        if count <= 0:
            return
        self.core.meter.add(self.variant, self.work.tokens(count), count)
        stamp = time.perf_counter()
        if self.last is None:
            self.ttft = stamp - self.arrived
            self.metrics.ttft.labels(self.variant).observe(self.ttft)
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
        if event.queue_seconds is not None:
            self.metrics.queue_wait.labels(self.variant).observe(event.queue_seconds)

    def finish(self, endpoint: str, status: str, request: GenerateRequest | None = None) -> None:
        """Once per request: the status counter, the canary's sample, the shadow copies."""
        if self.finished:
            return
        self.finished = True
        self.core.in_flight -= 1
        self.metrics.requests.labels(self.variant, endpoint, status).inc()
        e2e = time.perf_counter() - self.arrived
        self.core.canary.record(self.variant, self.ttft, e2e, int(status))
        if status == "200" and self.shadows and request is not None:
            self.core.shadow.submit(self.shadows, request, "".join(self.parts), self.core.in_flight)


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
        self.meter = WorkMeter(config.mfu.window_seconds)
        self.shadow = ShadowManager(
            config.routing.shadow, config.shadow, self.backends, self.metrics, self.meter
        )
        self.canary = CanaryController(config, self.router, self.shadow, self.metrics)
        self.in_flight = 0
        self._background: list[asyncio.Task] = []
        self._last_stats: dict[str, dict[str, Any]] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    def start_background(self) -> None:
        """The canary loop; call from inside the serving event loop."""
        if not self._background:
            self._background.append(asyncio.create_task(self.canary.run(self.variant_stats)))

    async def stop_background(self) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        await self.shadow.close()

    # ---- live routing changes ----------------------------------------------------------------

    def apply_routing(
        self,
        split: Mapping[str, float] | None = None,
        shadow: list[ShadowRule] | None = None,
    ) -> None:
        """Reweight and/or replace the shadow rules, live. A split set by hand pauses the
        canary's automatic stepping."""
        if shadow is not None:
            try:
                check_routing_names(RoutingConfig(shadow=shadow), list(self.config.variants))
            except ValueError as error:
                raise RoutingError(str(error), "shadow") from None
        if split is not None:
            unknown = sorted(set(split) - set(self.config.variants))
            if unknown:
                raise RoutingError(f"split names unknown variants {unknown}", "split")
            try:
                self.router.set_split(split)
            except ValueError as error:
                raise RoutingError(str(error), "split") from None
            self.canary.manual_split()
            log.info("split set to %s", self.router.split)
        if shadow is not None:
            self.shadow.set_rules(shadow)
            log.info("shadow rules set to %s", [r.model_dump() for r in shadow])

    def apply_routing_section(self, routing: RoutingConfig, previous: RoutingConfig) -> None:
        """A whole routing section (Ray Serve's user_config): what differs from `previous` is
        applied (an unchanged split does not pause the canary)."""
        split = None
        if routing.split != previous.split:
            split = routing.split or {next(iter(self.config.variants)): 1.0}
        shadow = routing.shadow if routing.shadow != previous.shadow else None
        self.apply_routing(split=split, shadow=shadow)
        self.router.sticky_header = routing.sticky_header
        self.variant_header = routing.variant_header

    def routing_state(self) -> dict[str, Any]:
        return {
            "split": self.router.split,
            "shadow": [r.model_dump() for r in self.shadow.rules],
            "canary_auto": self.canary.auto,
            "canary": {
                name: {"status": s.status, "step": s.step} for name, s in self.canary.states.items()
            },
        }

    # ---- generation --------------------------------------------------------------------------

    async def handle(self, endpoint: str, raw: bytes, headers: Mapping[str, str]) -> Response:
        variant = "none"
        clock: _RequestClock | None = None
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
            clock = _RequestClock(self, variant, self.shadow.pick(variant))
            return await self._generate(endpoint, request, clock)
        except OpenAIError as error:
            if clock is not None:
                clock.finish(endpoint, str(error.info.status))
            else:
                self.metrics.requests.labels(variant, endpoint, str(error.info.status)).inc()
            extra = {self.variant_header: variant} if variant != "none" else None
            return error_response(error.info, headers=extra)
        except asyncio.CancelledError:
            if clock is not None:
                clock.finish(endpoint, "499")
            raise
        except Exception:
            if clock is not None:
                clock.finish(endpoint, "500")
            raise

    async def _generate(
        self,
        endpoint: str,
        request: ChatCompletionRequest | CompletionRequest,
        clock: _RequestClock,
    ) -> Response:
        variant = clock.variant
        generate_request = GenerateRequest(
            request_id=new_id("req"),
            prompt=request.prompt_text() if isinstance(request, CompletionRequest) else None,
            messages=request.chat_messages()
            if isinstance(request, ChatCompletionRequest)
            else None,
            sampling=request.sampling(),
        )
        events = self.backends[variant].generate(generate_request)
        first = await anext(events)
        if first.kind == "error":
            await events.aclose()
            raise OpenAIError(first.error)
        clock.accepted(first)
        headers = {self.variant_header: variant}
        model_name = f"{self.config.public_model_name}:{variant}"
        if request.stream:
            stream = self._sse(endpoint, request, events, clock, model_name, generate_request)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        return await self._collect(endpoint, events, clock, model_name, headers, generate_request)

    async def _collect(
        self, endpoint, events, clock, model_name, headers, generate_request
    ) -> Response:
        parts: list[str] = []
        final: EngineEvent | None = None
        try:
            async for event in events:
                if event.kind == "delta":
                    clock.tokens(event.tokens, event.text)
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
        clock.finish(endpoint, "200", generate_request)
        return JSONResponse(body.model_dump(), headers=headers)

    async def _sse(
        self, endpoint, request, events, clock, model_name, generate_request
    ) -> AsyncIterator[str]:
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
                    clock.tokens(event.tokens, event.text)
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
            clock.finish(endpoint, status, generate_request)

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
        for name, stats in zip(names, results, strict=True):
            if stats is not None:
                self._last_stats[name] = stats
        return dict(zip(names, results, strict=True))

    def live(self, variant: str, stats: dict[str, Any] | None) -> dict[str, Any]:
        """MFU, achieved FLOP/s, tokens/s and cost of a variant over the MFU window."""
        stats = stats or self._last_stats.get(variant)
        if not stats or not stats.get("flops") or not stats.get("peak"):
            return {"mfu": None}
        flops = FlopModel.model_validate(stats["flops"])
        peak = stats["peak"]["flops_per_second"]
        replicas = self.config.deployment_for(variant).replicas
        window = self.meter.window(variant)
        used = utilization(flops, window, peak, replicas)
        context = (
            window.work.context_sum / window.work.body_tokens if window.work.body_tokens else 0.0
        )
        bench = stats.get("self_bench") or {}
        capacity = max((bench.get("decode_tokens_per_second") or {}).values(), default=None)
        cost = cost_per_1k_tokens(
            self.config.dollars_per_replica_hour(variant),
            replicas,
            used.generated_tokens_per_second,
            capacity,
            peak,
            flops.flops_per_token_at(context),
        )
        return {
            "mfu": used.mfu,
            "achieved_flops_per_second": used.achieved_flops_per_second,
            "peak_flops_per_second": peak,
            "replicas": replicas,
            "generated_tokens_per_second": used.generated_tokens_per_second,
            "mean_context_tokens": context,
            "window_seconds": window.seconds,
            "cost_per_1k_tokens": cost.model_dump(),
        }

    async def render_metrics(self) -> bytes:
        for variant, stats in (await self.variant_stats()).items():
            self.metrics.update_variant(variant, stats)
            self.metrics.replicas.labels(variant).set(self.config.deployment_for(variant).replicas)
            live = self.live(variant, stats)
            if live["mfu"] is not None:
                self.metrics.mfu.labels(variant).set(live["mfu"])
                self.metrics.achieved_flops.labels(variant).set(live["achieved_flops_per_second"])
                for basis, value in live["cost_per_1k_tokens"].items():
                    if basis != "dollars_per_replica_hour" and value is not None:
                        self.metrics.cost.labels(variant, basis).set(value)
        for (source, target), summary in self.shadow.summaries().items():
            self.metrics.update_shadow(source, target, summary)
        self.metrics.update_split(list(self.config.variants), self.router.split)
        self.canary.refresh_metrics()
        return self.metrics.render()

    async def variants_report(self) -> dict[str, Any]:
        stats = await self.variant_stats()
        variants = {
            name: None if s is None else {**s, "live": self.live(name, s)}
            for name, s in stats.items()
        }
        shadow = {
            f"{s}->{t}": summary.model_dump() for (s, t), summary in self.shadow.summaries().items()
        }
        return {"split": self.router.split, "variants": variants, "shadow": shadow}

    async def canary_report(self) -> dict[str, Any]:
        stats = await self.variant_stats()
        live = {name: self.live(name, s) for name, s in stats.items()}
        return self.canary.report(stats, live)


def create_api(core: GatewayCore) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        core.start_background()
        try:
            yield
        finally:
            await core.stop_background()

    api = FastAPI(title="slimserve", docs_url=None, redoc_url=None, lifespan=lifespan)
    api.include_router(admin_router(core, admin_token(core.config.admin)))

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
        return await core.variants_report()

    @api.get("/v1/canary")
    async def canary() -> dict:
        return await core.canary_report()

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
        from ..logs import configure_logging

        configure_logging()
        backends = {name: RayBackend(handle) for name, handle in variants.items()}
        self.core = GatewayCore(SlimserveConfig.model_validate(config), backends)
        self._user_config = routing_user_config(self.core.config.routing)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self.core)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve calls this with the deployment's user_config: at start, and live whenever
        `serve deploy` brings a new one. It takes the routing section (bare or under
        "routing"). The one it was built with is skipped, so a running canary keeps its split.
        """
        routing = RoutingConfig.model_validate(user_config.get("routing", user_config))
        as_dict = routing_user_config(routing)
        if as_dict == self._user_config:
            return
        self.core.apply_routing_section(routing, RoutingConfig.model_validate(self._user_config))
        self._user_config = as_dict
        log.info("reconfigured routing: %s", as_dict)


def routing_user_config(routing: RoutingConfig) -> dict[str, Any]:
    """The gateway deployment's user_config: the routing section as JSON."""
    return routing.model_dump(mode="json")
