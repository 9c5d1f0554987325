"""The ingress core: routing, the variant backends, metrics, shadow copies and the canary. Holds
no model.

`GatewayCore` holds the state every endpoint shares; `create_api` assembles the FastAPI app from
one router per endpoint. In Ray Serve the backends are DeploymentHandles; in-process they can be
VariantServer objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import RoutingConfig, ShadowRule, SlimserveConfig, check_routing_names
from ..observability.metrics import GatewayMetrics
from ..observability.mfu import WorkMeter
from ..routing.canary_controller import CanaryController
from ..routing.router import RoutingError, UnknownModelError, VariantRouter
from ..routing.shadow import ShadowManager
from .admin import admin_router, admin_token
from .backends import VariantBackend
from .chat import chat_router
from .completions import completions_router
from .errors import OpenAIError, error_response
from .health import health_router
from .metrics import metrics_router
from .models import models_router
from .openapi import publish_openapi
from .variants import variants_router

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


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
        # Each variant's last answer to a stats probe, for the windows in which it does not answer.
        self.last_stats: dict[str, dict[str, Any]] = {}
        self._background: list[asyncio.Task] = []

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

    # ---- routing -----------------------------------------------------------------------------

    def choose(self, model: str, headers: Mapping[str, str]) -> str:
        """The variant that serves a request for `model`."""
        try:
            return self.router.choose(model, headers)
        except UnknownModelError:
            raise OpenAIError.of(
                404,
                f"The model `{model}` does not exist. "
                f"Available: {', '.join(self.router.model_ids())}",
                param="model",
                code="model_not_found",
            ) from None

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

    # ---- variant probes ----------------------------------------------------------------------

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
                self.last_stats[name] = stats
        return dict(zip(names, results, strict=True))


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
        # Starlette's headers (Allow on a 405) go out with the OpenAI-shaped body.
        info = OpenAIError.of(error.status_code, str(error.detail)).info
        return error_response(info, headers=error.headers)

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(OpenAIError.of(500, f"internal error: {error}").info)

    for router in (
        chat_router(core),
        completions_router(core),
        models_router(core),
        variants_router(core),
        health_router(core),
        metrics_router(core),
    ):
        api.include_router(router)
    publish_openapi(api, core.router.model_ids())
    return api
