"""GET /v1/variants and GET /v1/canary: each variant's stats and live figures, the shadow
comparisons, and the canary's view of its candidates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter

from .utilization import live

if TYPE_CHECKING:
    from .gateway import GatewayCore


async def variants_report(core: GatewayCore) -> dict[str, Any]:
    stats = await core.variant_stats()
    variants = {
        name: None if s is None else {**s, "live": live(core, name, s)} for name, s in stats.items()
    }
    shadow = {
        f"{s}->{t}": summary.model_dump() for (s, t), summary in core.shadow.summaries().items()
    }
    return {"split": core.router.split, "variants": variants, "shadow": shadow}


async def canary_report(core: GatewayCore) -> dict[str, Any]:
    stats = await core.variant_stats()
    figures = {name: live(core, name, s) for name, s in stats.items()}
    return core.canary.report(stats, figures)


def variants_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/variants")
    async def variants() -> dict:
        return await variants_report(core)

    @router.get("/v1/canary")
    async def canary() -> dict:
        return await canary_report(core)

    return router
