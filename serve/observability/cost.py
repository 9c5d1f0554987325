"""Dollars per 1k generated tokens, three ways.

- observed: what the variant's replicas cost per hour over the tokens they generated per second
  in the MFU window (None when idle);
- capacity: one replica's cost over its best self-benchmark decode rate (a batch of streams);
- at_peak: one replica's cost if every peak FLOP went into tokens at the observed context (the
  floor MFU allows: at_peak / MFU-at-capacity is what a replica really costs).
"""

from __future__ import annotations

from pydantic import BaseModel

SECONDS_PER_HOUR = 3600.0


class CostEstimate(BaseModel):
    dollars_per_replica_hour: float
    observed: float | None = None
    capacity: float | None = None
    at_peak: float | None = None


def _per_1k(dollars_per_hour: float, tokens_per_second: float | None) -> float | None:
    if not tokens_per_second or tokens_per_second <= 0:
        return None
    return dollars_per_hour / (tokens_per_second * SECONDS_PER_HOUR) * 1000.0


def cost_per_1k_tokens(
    dollars_per_replica_hour: float,
    replicas: int,
    observed_tokens_per_second: float | None,
    capacity_tokens_per_second: float | None,
    peak_flops_per_second: float | None,
    flops_per_token: float | None,
) -> CostEstimate:
    peak_rate = (
        peak_flops_per_second / flops_per_token
        if peak_flops_per_second and flops_per_token
        else None
    )
    return CostEstimate(
        dollars_per_replica_hour=dollars_per_replica_hour,
        observed=_per_1k(dollars_per_replica_hour * replicas, observed_tokens_per_second),
        capacity=_per_1k(dollars_per_replica_hour, capacity_tokens_per_second),
        at_peak=_per_1k(dollars_per_replica_hour, peak_rate),
    )
