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

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import RoutingConfig, ShadowRule, SlimserveConfig, check_routing_names
from ..engine.limits import unavailable_error
from ..observability.metrics import GatewayMetrics
from ..observability.mfu import WorkMeter
from ..routing.admission import VariantAdmission
from ..routing.availability import VariantAvailability
from ..routing.canary_controller import CanaryController
from ..routing.router import NoVariantUpError, RoutingError, UnknownModelError, VariantRouter
from ..routing.shadow import ShadowManager
from .access import add_cors, api_key, key_guard
from .admin import admin_router, admin_token
from .backends import VariantBackend
from .chat import chat_router
from .completions import completions_router
from .errors import OpenAIError, error_response
from .failures import VariantDownError, unavailable
from .health import health_router
from .metrics import metrics_router
from .models import models_router
from .openapi import publish_openapi
from .variants import variants_router

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
# A variant with another live replica answers at once; one with none does not answer at all.
LOST_REPLICA_PROBE_S = 1.0


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
        self.availability = VariantAvailability(list(config.variants))
        self.admission = {name: VariantAdmission() for name in config.variants}
        for name in config.variants:
            self.metrics.variant_up.labels(name).set(1)
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
        self._checks: set[asyncio.Task] = set()  # replica_lost_later's, referenced until done

    # ---- lifecycle ---------------------------------------------------------------------------

    def start_background(self) -> None:
        """The canary loop and the variants' health probes; call from inside the serving
        event loop."""
        if not self._background:
            self._background.append(asyncio.create_task(self.canary.run(self.variant_stats)))
            self._background.append(asyncio.create_task(self._probe_loop()))

    async def _probe_loop(self) -> None:
        period = self.config.server.health_probe_seconds
        while True:
            await asyncio.sleep(period)
            try:
                await self.variant_stats()
            except Exception:
                log.exception("variant probes failed")

    async def stop_background(self) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._background.clear()
        await self.shadow.close()

    # ---- routing -----------------------------------------------------------------------------

    def choose(
        self, model: str, headers: Mapping[str, str], avoid: frozenset[str] = frozenset()
    ) -> str:
        """The variant that serves a request for `model`: never a down variant unless the
        request pins it (then the caller is answered 503 at once), nor one in `avoid`."""
        try:
            variant = self.router.choose(model, headers, self.availability.down() | avoid)
        except NoVariantUpError:
            raise OpenAIError(unavailable_error("every variant is down; retry shortly")) from None
        except UnknownModelError:
            raise OpenAIError.of(
                404,
                f"The model `{model}` does not exist. "
                f"Available: {', '.join(self.router.model_ids())}",
                param="model",
                code="model_not_found",
            ) from None
        outage = self.availability.outage(variant)
        if outage is not None:
            raise OpenAIError(unavailable_error(outage.reason))
        return variant

    def variant_down(self, variant: str, reason: str) -> None:
        """`reason`: the whole message a request for it is answered with while it is down."""
        if self.availability.mark_down(variant, reason):
            log.warning("%s", reason)
        self.metrics.variant_up.labels(variant).set(0)

    async def replica_lost(self, variant: str, message: str) -> bool:
        """After a replica of `variant` was lost: True (and the variant marked down) unless
        another replica answers a probe at once, as one of several does."""
        try:
            stats = await asyncio.wait_for(self.backends[variant].stats(), LOST_REPLICA_PROBE_S)
        except Exception:
            self.variant_down(variant, message)
            return True
        if "failed" in stats:
            self.variant_down(variant, message)
            return True
        return False

    def replica_lost_later(self, variant: str, message: str) -> None:
        """replica_lost, off the caller's path (a stream that already answered)."""
        task = asyncio.get_running_loop().create_task(self.replica_lost(variant, message))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def variant_up(self, variant: str) -> None:
        if self.availability.mark_up(variant):
            log.info("variant %s is up again", variant)
        self.metrics.variant_up.labels(variant).set(1)

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
        """A variant's stats, None when it does not answer. Marks it up when it answers, down
        when it says it failed or its replicas are lost; a slow answer (busy) changes nothing."""
        try:
            stats = await asyncio.wait_for(self.backends[variant].stats(), PROBE_TIMEOUT_S)
        except VariantDownError as error:
            self.variant_down(variant, unavailable(variant, str(error)).message)
            return None
        except Exception as error:
            log.warning("variant %s did not answer its stats probe: %s", variant, error)
            return None
        if "failed" in stats:
            self.variant_down(variant, unavailable(variant, stats["failed"]).message)
            return None
        self.variant_up(variant)
        return stats

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

    guarded = [Depends(key_guard(api_key(core.config.server)))]
    v1 = (chat_router(core), completions_router(core), models_router(core), variants_router(core))
    for router in v1:
        api.include_router(router, dependencies=guarded)
    for router in (health_router(core), metrics_router(core)):
        api.include_router(router)
    add_cors(api, core.config.server, [core.variant_header, "Retry-After"])
    publish_openapi(api, core.router.model_ids())
    return api
