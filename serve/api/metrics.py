"""GET /metrics: Prometheus text, with the variants' gauges refreshed from a probe first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .utilization import live

if TYPE_CHECKING:
    from .gateway import GatewayCore


async def render_metrics(core: GatewayCore) -> bytes:
    metrics = core.metrics
    for variant, stats in (await core.variant_stats()).items():
        metrics.update_variant(variant, stats)
        metrics.replicas.labels(variant).set(core.config.deployment_for(variant).replicas)
        figures = live(core, variant, stats)
        if figures["mfu"] is not None:
            metrics.mfu.labels(variant).set(figures["mfu"])
            metrics.achieved_flops.labels(variant).set(figures["achieved_flops_per_second"])
            for basis, value in figures["cost_per_1k_tokens"].items():
                if basis != "dollars_per_replica_hour" and value is not None:
                    metrics.cost.labels(variant, basis).set(value)
    for (source, target), summary in core.shadow.summaries().items():
        metrics.update_shadow(source, target, summary)
    metrics.update_split(list(core.config.variants), core.router.split)
    core.canary.refresh_metrics()
    return metrics.render()


def metrics_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(await render_metrics(core), media_type=CONTENT_TYPE_LATEST)

    return router
