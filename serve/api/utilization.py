"""A variant's live figures over the MFU window: MFU, achieved FLOP/s, tokens/s and cost."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..observability.cost import cost_per_1k_tokens
from ..observability.flops import FlopModel
from ..observability.mfu import utilization

if TYPE_CHECKING:
    from .gateway import GatewayCore


def live(core: GatewayCore, variant: str, stats: dict[str, Any] | None) -> dict[str, Any]:
    """`stats`: the variant's latest probe; None (no answer) falls back to its last answer."""
    stats = stats or core.last_stats.get(variant)
    if not stats or not stats.get("flops") or not stats.get("peak"):
        return {"mfu": None}
    flops = FlopModel.model_validate(stats["flops"])
    peak = stats["peak"]["flops_per_second"]
    replicas = core.config.deployment_for(variant).replicas
    window = core.meter.window(variant)
    used = utilization(flops, window, peak, replicas)
    context = window.work.context_sum / window.work.body_tokens if window.work.body_tokens else 0.0
    bench = stats.get("self_bench") or {}
    capacity = max((bench.get("decode_tokens_per_second") or {}).values(), default=None)
    cost = cost_per_1k_tokens(
        core.config.dollars_per_replica_hour(variant),
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
