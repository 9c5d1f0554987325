"""Canary decisions: evidence about a candidate against the SLOs -> promote / hold / roll back,
and the step schedule that turns decisions into traffic weights. Pure: no clocks, no I/O.

Each SLO becomes a check:
- pass: the evidence meets the limit;
- fail: it breaks the limit beyond reasonable doubt (latency: the lower end of the p95's
  confidence interval is above the limit; error rate: the lower end of its Wilson interval is);
- inconclusive: the point estimate breaks the limit but the interval still reaches it;
- insufficient: fewer samples than the SLO's minimum;
- unavailable: the variant cannot provide the evidence (e.g. no score() for perplexity).

Any fail -> rollback; else anything not a pass -> hold; else promote.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from ..config import CanarySLO
from .shadow_scores import ShadowSummary
from .stats_math import QuantileEstimate, wilson_interval

Action = Literal["promote", "hold", "rollback"]
CheckStatus = Literal["pass", "fail", "inconclusive", "insufficient", "unavailable"]
Status = Literal["canary", "promoted", "rolled_back"]


class Check(BaseModel):
    name: str
    status: CheckStatus
    value: float | None = None
    limit: float | None = None
    detail: str = ""


class Decision(BaseModel):
    action: Action
    checks: list[Check]
    reasons: list[str]


class CandidateEvidence(BaseModel):
    """What one evaluation window says about a candidate (and the baseline's quality)."""

    requests: int = 0  # finished requests that count for the error rate (200s and 5xx)
    errors: int = 0  # 5xx among them
    ttft_p95: QuantileEstimate | None = None
    e2e_p95: QuantileEstimate | None = None
    perplexity: float | None = None
    baseline_perplexity: float | None = None
    shadow: ShadowSummary | None = None


def _latency_check(
    name: str, estimate: QuantileEstimate | None, limit: float, min_samples: int
) -> Check:
    samples = estimate.samples if estimate else 0
    if estimate is None or samples < min_samples:
        return Check(name=name, status="insufficient", limit=limit, detail=f"{samples} samples")
    ci = f"CI [{estimate.low}, {estimate.high}] over {samples} samples"
    if estimate.low is not None and estimate.low > limit:
        return Check(name=name, status="fail", value=estimate.value, limit=limit, detail=ci)
    status: CheckStatus = "pass" if estimate.value <= limit else "inconclusive"
    return Check(name=name, status=status, value=estimate.value, limit=limit, detail=ci)


def _error_check(evidence: CandidateEvidence, limit: float, min_samples: int) -> Check:
    n, errors = evidence.requests, evidence.errors
    if n < min_samples:
        return Check(name="error_rate", status="insufficient", limit=limit, detail=f"{n} requests")
    rate = errors / n
    low, high = wilson_interval(errors, n)
    detail = f"{errors}/{n}, Wilson 95% [{low:.4f}, {high:.4f}]"
    if low > limit:
        return Check(name="error_rate", status="fail", value=rate, limit=limit, detail=detail)
    status: CheckStatus = "pass" if rate <= limit else "inconclusive"
    return Check(name="error_rate", status=status, value=rate, limit=limit, detail=detail)


def _perplexity_check(evidence: CandidateEvidence, limit: float) -> Check:
    ppl, base = evidence.perplexity, evidence.baseline_perplexity
    if ppl is None or base is None:
        return Check(
            name="perplexity_delta",
            status="unavailable",
            limit=limit,
            detail="no self-benchmark perplexity for the candidate or the baseline",
        )
    delta = (ppl - base) / base
    status: CheckStatus = "pass" if delta <= limit else "fail"
    detail = f"candidate {ppl:.4g} vs baseline {base:.4g}"
    return Check(name="perplexity_delta", status=status, value=delta, limit=limit, detail=detail)


def _shadow_check(
    name: str, value: float | None, count: int, limit: float, minimum: int, higher_is_better: bool
) -> Check:
    if count < minimum:
        return Check(name=name, status="insufficient", limit=limit, detail=f"{count} comparisons")
    if value is None:
        return Check(name=name, status="unavailable", limit=limit, detail="not scored")
    ok = value >= limit if higher_is_better else value <= limit
    detail = f"mean of {count} comparisons"
    return Check(
        name=name, status="pass" if ok else "fail", value=value, limit=limit, detail=detail
    )


def checks_for(evidence: CandidateEvidence, slo: CanarySLO) -> list[Check]:
    checks = []
    if slo.max_p95_ttft_seconds is not None:
        checks.append(
            _latency_check(
                "p95_ttft_seconds", evidence.ttft_p95, slo.max_p95_ttft_seconds, slo.min_samples
            )
        )
    if slo.max_p95_e2e_seconds is not None:
        checks.append(
            _latency_check(
                "p95_e2e_seconds", evidence.e2e_p95, slo.max_p95_e2e_seconds, slo.min_samples
            )
        )
    if slo.max_error_rate is not None:
        checks.append(_error_check(evidence, slo.max_error_rate, slo.min_samples))
    if slo.max_perplexity_delta is not None:
        checks.append(_perplexity_check(evidence, slo.max_perplexity_delta))
    shadow = evidence.shadow
    comparisons = shadow.comparisons if shadow else 0
    scored = shadow.scored if shadow else 0
    if slo.min_token_agreement is not None:
        value = shadow.token_agreement if shadow else None
        checks.append(
            _shadow_check(
                "token_agreement",
                value,
                scored,
                slo.min_token_agreement,
                slo.min_shadow_samples,
                True,
            )
        )
    if slo.max_next_token_kl_nats is not None:
        value = shadow.next_token_kl_nats if shadow else None
        checks.append(
            _shadow_check(
                "next_token_kl_nats",
                value,
                scored,
                slo.max_next_token_kl_nats,
                slo.min_shadow_samples,
                False,
            )
        )
    if slo.min_exact_match is not None:
        value = shadow.exact_match if shadow else None
        checks.append(
            _shadow_check(
                "exact_match", value, comparisons, slo.min_exact_match, slo.min_shadow_samples, True
            )
        )
    return checks


def decide(evidence: CandidateEvidence, slo: CanarySLO) -> Decision:
    checks = checks_for(evidence, slo)
    failed = [c for c in checks if c.status == "fail"]
    pending = [c for c in checks if c.status != "pass"]
    if failed:
        action: Action = "rollback"
        reasons = [
            f"{c.name} {c.value:.4g} breaks limit {c.limit:.4g} ({c.detail})" for c in failed
        ]
    elif pending:
        action = "hold"
        reasons = [f"{c.name}: {c.status} ({c.detail})" for c in pending]
    else:
        action = "promote"
        reasons = ["every SLO check passes"]
    return Decision(action=action, checks=checks, reasons=reasons)


# ---- the step schedule ------------------------------------------------------------------------


class CandidateState(BaseModel):
    variant: str
    step: int = 0  # index into the steps; the candidate's traffic percent is steps[step]
    status: Status = "canary"
    window_started: float = 0.0  # when the current evaluation window began (caller's clock)
    last_decision: Decision | None = None
    history: list[str] = Field(default_factory=list)


def percent(state: CandidateState, steps: list[float]) -> float:
    if state.status == "rolled_back":
        return 0.0
    if state.status == "promoted":
        return 100.0
    return steps[state.step]


def advance(
    state: CandidateState, decision: Decision, steps: list[float], now: float
) -> CandidateState:
    """The state after acting on a decision; a promote or a rollback starts a new window."""
    new = state.model_copy(deep=True)
    new.last_decision = decision
    if state.status != "canary" or decision.action == "hold":
        return new
    if decision.action == "rollback":
        new.status = "rolled_back"
        new.history.append(f"rolled back at {percent(state, steps):g}%")
    else:
        new.step = min(state.step + 1, len(steps) - 1)
        if new.step == len(steps) - 1:
            new.status = "promoted"
        new.history.append(f"{percent(state, steps):g}% -> {percent(new, steps):g}%")
    new.window_started = now
    return new


def window_complete(state: CandidateState, interval_seconds: float, now: float) -> bool:
    return state.status == "canary" and now - state.window_started >= interval_seconds


def compose_split(
    baseline: str,
    states: list[CandidateState],
    steps: list[float],
    others: dict[str, float] | None = None,
) -> dict[str, float]:
    """Percent weights: candidates get their step's percent, variants outside the canary keep
    theirs (`others`), the baseline gets what is left (never below 0). Weights above 100 in all
    are shared in proportion (the router normalizes)."""
    split = dict(others or {})
    split.update({s.variant: percent(s, steps) for s in states})
    split[baseline] = max(0.0, 100.0 - sum(split.values()))
    if not any(split.values()):
        split[baseline] = 100.0
    return split
