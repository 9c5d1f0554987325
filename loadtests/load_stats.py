"""What one load run measured, from its records: quantiles, errors, the serving variants and
the share of requests within an SLO (with a Wilson interval). Plain arithmetic: no locust here,
so the gateway's tests and the planner import it without gevent patching their process."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from slimserve.serve.routing.stats_math import wilson_interval


class Quantiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


def quantiles(values: list[float]) -> Quantiles:
    if not values:
        return Quantiles()
    p50, p95, p99 = np.quantile(np.asarray(values, dtype=float), [0.5, 0.95, 0.99])
    return Quantiles(p50=float(p50), p95=float(p95), p99=float(p99))


class SLO(BaseModel):
    """A request meets it when it succeeds within both bounds; the load meets it when at least
    `quantile` of its requests do (so 'p95 TTFT <= 1 s' is ttft_seconds=1, quantile=0.95)."""

    ttft_seconds: float = Field(1.0, gt=0)
    itl_seconds: float = Field(0.2, gt=0)
    quantile: float = Field(0.95, gt=0, lt=1)

    def met_by(self, record: dict[str, Any]) -> bool:
        if record.get("status") != 200 or record.get("error") or "ttft_seconds" not in record:
            return False
        itl = record.get("itl_seconds")
        return record["ttft_seconds"] <= self.ttft_seconds and (
            itl is None or itl <= self.itl_seconds
        )


class Attainment(BaseModel):
    fraction: float
    low: float  # Wilson 95% interval
    high: float
    met: bool  # fraction >= the SLO's quantile


class RunSummary(BaseModel):
    requests: int
    succeeded: int
    errors: dict[str, int]  # by error code or HTTP status
    seconds: float
    request_rate: float  # completed requests / s (succeeded)
    output_tokens_per_second: float
    mean_output_tokens: float | None
    ttft: Quantiles
    itl: Quantiles
    e2e: Quantiles
    client_wait: Quantiles  # open loop: how long arrivals waited for a free client user
    variants: dict[str, int]  # succeeded requests per serving variant
    attainment: Attainment | None = None
    interrupted: bool = False


def summarize(records: list[dict[str, Any]], seconds: float, slo: SLO | None = None) -> RunSummary:
    ok = [r for r in records if r.get("status") == 200 and not r.get("error")]
    errors: dict[str, int] = {}
    for record in records:
        if record not in ok:
            key = str(record.get("error") or record.get("status"))
            errors[key] = errors.get(key, 0) + 1
    variants: dict[str, int] = {}
    for record in ok:
        variants[str(record.get("variant"))] = variants.get(str(record.get("variant")), 0) + 1
    tokens = [r.get("output_tokens", 0) for r in ok]
    attainment = None
    if slo is not None and records:
        met = sum(slo.met_by(r) for r in records)
        low, high = wilson_interval(met, len(records))
        fraction = met / len(records)
        attainment = Attainment(fraction=fraction, low=low, high=high, met=fraction >= slo.quantile)
    return RunSummary(
        requests=len(records),
        succeeded=len(ok),
        errors=errors,
        seconds=seconds,
        request_rate=len(ok) / seconds if seconds > 0 else 0.0,
        output_tokens_per_second=sum(tokens) / seconds if seconds > 0 else 0.0,
        mean_output_tokens=sum(tokens) / len(tokens) if tokens else None,
        ttft=quantiles([r["ttft_seconds"] for r in ok if "ttft_seconds" in r]),
        itl=quantiles([r["itl_seconds"] for r in ok if "itl_seconds" in r]),
        e2e=quantiles([r["e2e_seconds"] for r in ok]),
        client_wait=quantiles([r.get("client_wait_seconds", 0.0) for r in records]),
        variants=variants,
        attainment=attainment,
    )


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def summary_table(summary: RunSummary) -> str:
    """A plain-text table of one run, for the terminal."""
    rows = [
        ("requests (ok / all)", f"{summary.succeeded} / {summary.requests}"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in summary.errors.items()) or "none"),
        ("duration s", f"{summary.seconds:.1f}"),
        ("completed requests/s", f"{summary.request_rate:.2f}"),
        ("output tokens/s", f"{summary.output_tokens_per_second:.1f}"),
        ("TTFT ms p50 / p95 / p99", " / ".join(ms(v) for v in summary.ttft.model_dump().values())),
        ("ITL ms p50 / p95 / p99", " / ".join(ms(v) for v in summary.itl.model_dump().values())),
        ("E2E ms p50 / p95 / p99", " / ".join(ms(v) for v in summary.e2e.model_dump().values())),
        ("client wait ms p95", ms(summary.client_wait.p95)),
        ("variants", ", ".join(f"{k}: {v}" for k, v in sorted(summary.variants.items()))),
    ]
    if summary.attainment is not None:
        a = summary.attainment
        rows.append(
            (
                "SLO attainment",
                f"{a.fraction:.1%} (95% CI {a.low:.1%}-{a.high:.1%}), "
                f"{'met' if a.met else 'missed'}",
            )
        )
    if summary.interrupted:
        rows.append(("stopped", "interrupted: figures cover the requests that finished"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
