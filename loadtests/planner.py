"""Capacity planning from measurements: each variant's knee and highest rate within the SLO (found
by doubling then bisecting), the replicas a target rate and split need (queueing and measured
capacity, whichever asks more), what they cost, and the check of a deployed plan.

Everything here is arithmetic on measurements handed in (a `Measure` callable runs the load), so
it is tested on synthetic ones with known answers; loadtests/plan_cli.py feeds it real runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field
from scipy.stats import chisquare

from slimserve.loadtests.load_stats import SLO, Attainment, RunSummary, summarize
from slimserve.loadtests.queueing import ReplicaPlan, replicas_for_slo


class PlanError(ValueError):
    """A plan that cannot be made (a variant that misses the SLO at every rate tried, ...)."""


class SweepPoint(BaseModel):
    kind: Literal["concurrency", "rate"]
    load: float  # users (closed loop) or arrivals per second (open loop)
    summary: RunSummary
    records_file: str | None = None  # the run's CSV, relative to the report

    @property
    def meets_slo(self) -> bool:
        return self.summary.attainment is not None and self.summary.attainment.met


Measure = Callable[[Literal["concurrency", "rate"], float], SweepPoint]


class SweepSettings(BaseModel):
    max_concurrency: int = Field(32, ge=1, description="the closed-loop sweep stops here")
    knee_gain: float = Field(
        0.1, gt=0, description="a doubling that adds less throughput than this: past the knee"
    )
    max_doublings: int = Field(6, ge=0, description="rate doublings before giving up")
    bisect_steps: int = Field(3, ge=0, description="rate bisections between pass and fail")
    min_rate: float = Field(0.01, gt=0, description="halving the rate stops below this")


def find_knee(measure: Measure, settings: SweepSettings) -> tuple[list[SweepPoint], SweepPoint]:
    """Double the concurrency until a doubling adds less than `knee_gain` of throughput; the knee
    is the last point before that (the best one when throughput never levels off)."""
    points: list[SweepPoint] = []
    users = 1
    while users <= settings.max_concurrency:
        point = measure("concurrency", users)
        points.append(point)
        if len(points) >= 2:
            before = points[-2].summary.request_rate
            if point.summary.request_rate < before * (1 + settings.knee_gain):
                return points, points[-2]
        users *= 2
    return points, max(points, key=lambda p: p.summary.request_rate)


def find_slo_rate(
    measure: Measure, start_rate: float, settings: SweepSettings
) -> tuple[list[SweepPoint], SweepPoint | None]:
    """The highest arrival rate whose run meets the SLO: double from `start_rate` while runs pass
    (halve while they fail), then bisect between the best pass and the lowest fail."""
    points = [measure("rate", start_rate)]
    passed = points[0] if points[0].meets_slo else None
    failed = None if passed else points[0]
    if passed is not None:
        for _ in range(settings.max_doublings):
            point = measure("rate", passed.load * 2)
            points.append(point)
            if not point.meets_slo:
                failed = point
                break
            passed = point
    else:
        rate = start_rate / 2
        while rate >= settings.min_rate:
            point = measure("rate", rate)
            points.append(point)
            if point.meets_slo:
                passed = point
                break
            failed = point
            rate /= 2
    for _ in range(settings.bisect_steps):
        if passed is None or failed is None:
            break
        point = measure("rate", (passed.load + failed.load) / 2)
        points.append(point)
        if point.meets_slo:
            passed = point
        else:
            failed = point
    return points, passed


class VariantCapacity(BaseModel):
    variant: str
    knee_concurrency: int
    knee_request_rate: float  # completed requests/s at the knee
    knee_output_tokens_per_second: float
    slo_request_rate: float | None  # the highest arrival rate that met the SLO (None: none did)
    unloaded_ttft_seconds: float  # TTFT p50 at one stream: prefill and serving, no queueing
    mean_output_tokens: float
    replica_cpus: float  # the cores a replica had while measured (the machine's, by default)
    replica_memory_bytes: int | None  # the replica's resident memory after the sweep
    points: list[SweepPoint]


def capacity_from_sweep(
    variant: str,
    knee_points: list[SweepPoint],
    knee: SweepPoint,
    rate_points: list[SweepPoint],
    slo_point: SweepPoint | None,
    replica_cpus: float,
    replica_memory_bytes: int | None,
) -> VariantCapacity:
    single = knee_points[0].summary
    if single.ttft.p50 is None or knee.summary.mean_output_tokens is None:
        raise PlanError(f"variant {variant!r}: no request succeeded at one stream")
    return VariantCapacity(
        variant=variant,
        knee_concurrency=round(knee.load),
        knee_request_rate=knee.summary.request_rate,
        knee_output_tokens_per_second=knee.summary.output_tokens_per_second,
        slo_request_rate=None if slo_point is None else slo_point.load,
        unloaded_ttft_seconds=single.ttft.p50,
        mean_output_tokens=knee.summary.mean_output_tokens,
        replica_cpus=replica_cpus,
        replica_memory_bytes=replica_memory_bytes,
        points=[*knee_points, *rate_points],
    )


class VariantPlan(BaseModel):
    variant: str
    share: float  # of the target rate
    request_rate: float
    replicas: int
    replicas_by_queueing: int  # Erlang C on the knee (slots = knee concurrency)
    replicas_by_measurement: int  # the rate measured to meet the SLO, less the headroom
    queueing: ReplicaPlan
    cpus: float
    memory_bytes: int | None
    max_ongoing_requests: int  # per replica: the knee concurrency
    dollars_per_hour: float
    dollars_per_million_output_tokens: float | None


def plan_variant(
    capacity: VariantCapacity,
    share: float,
    target_rate: float,
    slo: SLO,
    headroom: float,
    dollars_per_replica_hour: float,
) -> VariantPlan:
    """Replicas for `share` of `target_rate`: the larger of what queueing theory asks to keep the
    TTFT quantile's queueing wait within the SLO less the unloaded TTFT, and what the measured
    SLO rate asks with the headroom kept free."""
    rate = target_rate * share
    if capacity.slo_request_rate is None:
        raise PlanError(
            f"variant {capacity.variant!r} met the SLO at no rate tried; relax the SLO "
            "or leave it out of the split"
        )
    budget = slo.ttft_seconds - capacity.unloaded_ttft_seconds
    if budget <= 0:
        raise PlanError(
            f"variant {capacity.variant!r}: its unloaded TTFT "
            f"({capacity.unloaded_ttft_seconds:.3f} s) already exceeds the TTFT SLO"
        )
    queueing = replicas_for_slo(
        rate,
        capacity.knee_request_rate,
        max(1, capacity.knee_concurrency),
        budget,
        quantile=slo.quantile,
        headroom=headroom,
    )
    measured = max(1, math.ceil(rate / (capacity.slo_request_rate * (1 - headroom))))
    replicas = max(queueing.replicas, measured) if rate > 0 else 0
    tokens_per_hour = rate * capacity.mean_output_tokens * 3600
    dollars = replicas * dollars_per_replica_hour
    return VariantPlan(
        variant=capacity.variant,
        share=share,
        request_rate=rate,
        replicas=replicas,
        replicas_by_queueing=queueing.replicas,
        replicas_by_measurement=measured,
        queueing=queueing,
        cpus=replicas * capacity.replica_cpus,
        memory_bytes=None
        if capacity.replica_memory_bytes is None
        else replicas * capacity.replica_memory_bytes,
        max_ongoing_requests=max(1, capacity.knee_concurrency),
        dollars_per_hour=dollars,
        dollars_per_million_output_tokens=dollars / tokens_per_hour * 1e6
        if tokens_per_hour > 0
        else None,
    )


def normalized_split(split: dict[str, float]) -> dict[str, float]:
    total = sum(split.values())
    if total <= 0 or any(w < 0 for w in split.values()):
        raise PlanError(f"a split needs non-negative weights with a positive sum, got {split}")
    return {name: weight / total for name, weight in split.items()}


class VariantCheck(BaseModel):
    variant: str
    requests: int
    expected_share: float
    observed_share: float
    ttft_p95_seconds: float | None
    itl_p95_seconds: float | None
    ttft_margin_seconds: float | None  # SLO less the measured quantile: > 0 held with room
    itl_margin_seconds: float | None
    attainment: Attainment | None
    held: bool


class Validation(BaseModel):
    request_rate: float  # offered
    needed_cpus: float  # the plan's, at the cores each replica had while measured
    available_cpus: int  # where it was deployed: fewer than needed and it cannot hold
    seconds: float
    requests: int
    errors: dict[str, int]
    split_chi_square: float | None
    split_p_value: float | None
    split_held: bool  # the observed split is consistent with the configured one (p >= 0.01)
    attainment: Attainment | None  # over every request, refused ones included
    variants: list[VariantCheck]
    held: bool  # the SLO over all requests, every variant's, and the split


def check_validation(
    records: list[dict[str, Any]],
    split: dict[str, float],
    slo: SLO,
    request_rate: float,
    seconds: float,
    needed_cpus: float,
    available_cpus: int,
    significance: float = 0.01,
) -> Validation:
    """Did the deployed plan hold: every variant's SLO (at the SLO's quantile, over the requests
    it served) and the split (chi-square goodness of fit of the served counts)."""
    shares = normalized_split(split)
    everything = summarize(records, seconds, slo)
    served = {name: [r for r in records if r.get("variant") == name] for name in shares}
    counted = sum(len(v) for v in served.values())
    checks = []
    for name, share in shares.items():
        summary = summarize(served[name], seconds, slo)
        attainment = summary.attainment
        quantile = slo.quantile
        ttft = _quantile([r["ttft_seconds"] for r in served[name] if "ttft_seconds" in r], quantile)
        itl = _quantile([r["itl_seconds"] for r in served[name] if "itl_seconds" in r], quantile)
        checks.append(
            VariantCheck(
                variant=name,
                requests=len(served[name]),
                expected_share=share,
                observed_share=len(served[name]) / counted if counted else 0.0,
                ttft_p95_seconds=ttft,
                itl_p95_seconds=itl,
                ttft_margin_seconds=None if ttft is None else slo.ttft_seconds - ttft,
                itl_margin_seconds=None if itl is None else slo.itl_seconds - itl,
                attainment=attainment,
                held=share == 0 or (attainment is not None and attainment.met),
            )
        )
    statistic = p_value = None
    live = [name for name, share in shares.items() if share > 0]
    if counted and len(live) > 1:
        observed = [len(served[name]) for name in live]
        expected = [shares[name] * counted / sum(shares[n] for n in live) for name in live]
        result = chisquare(observed, expected)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    split_held = p_value is None or p_value >= significance
    return Validation(
        request_rate=request_rate,
        needed_cpus=needed_cpus,
        available_cpus=available_cpus,
        seconds=seconds,
        requests=len(records),
        errors=everything.errors,
        split_chi_square=statistic,
        split_p_value=p_value,
        split_held=split_held,
        attainment=everything.attainment,
        variants=checks,
        held=split_held
        and everything.attainment is not None
        and everything.attainment.met
        and all(c.held for c in checks),
    )


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]
