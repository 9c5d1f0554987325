"""GET /health: 200 while every variant answers its stats probe, 503 otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from .gateway import GatewayCore


def health_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> JSONResponse:
        stats = await core.variant_stats()
        ready = {name: s is not None for name, s in stats.items()}
        return JSONResponse(
            {"status": "ok" if all(ready.values()) else "unavailable", "variants": ready},
            status_code=200 if all(ready.values()) else 503,
        )

    return router
