"""GET /health: whether the gateway can serve, and each variant's state.

A variant is "up" when it answers its probe, "busy" when it answered before but not in time now
(still serving), "down" when its replicas are lost or it failed to load, "starting" until it
first answers. 200 once no variant is starting and at least one serves (the router moves
unpinned requests off the down ones, so a load balancer should keep sending traffic), else 503."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from .gateway import GatewayCore


def health_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        stats = await core.variant_stats()
        variants: dict[str, dict[str, Any]] = {}
        for name, answer in stats.items():
            outage = core.availability.outage(name)
            if outage is not None:
                variants[name] = {"state": "down", "reason": outage.reason, "since": outage.since}
            elif answer is not None:
                variants[name] = {"state": "up"}
            else:
                variants[name] = {"state": "busy" if name in core.last_stats else "starting"}
        states = [v["state"] for v in variants.values()]
        serving = sum(state in ("up", "busy") for state in states)
        if "starting" in states:
            status = "starting"
        elif serving == len(states):
            status = "ok"
        else:
            status = "degraded" if serving else "unavailable"
        ready = status in ("ok", "degraded")
        return JSONResponse(
            {"status": status, "variants": variants}, status_code=200 if ready else 503
        )

    return router
