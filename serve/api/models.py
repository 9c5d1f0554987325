"""GET /v1/models: the public model name and one `name:variant` id per variant."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter

from .protocol import ModelCard, ModelList, now

if TYPE_CHECKING:
    from .gateway import GatewayCore


def models_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> dict:
        created = now()
        cards = [ModelCard(id=m, created=created) for m in core.router.model_ids()]
        return ModelList(data=cards).model_dump()

    return router
