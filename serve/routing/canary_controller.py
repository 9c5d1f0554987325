"""The canary at run time: request samples in, report and (when enabled) split changes out.

Every finished caller request leaves a sample (time, TTFT, end-to-end, status) in its
variant's bounded reservoir. Every `canary.interval_seconds` each candidate whose evaluation
window is complete is judged on the samples of that window, its self-benchmark perplexity
against the baseline's, and the baseline -> candidate shadow scores (serve.canary.decide). With
`canary.enabled` the decision moves the split: promote -> next step, rollback -> weight 0. A
manual split (admin API or Ray Serve reconfigure) pauses the automatic stepping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config import SlimserveConfig
from ..observability.metrics import GatewayMetrics
from .canary import (
    CandidateEvidence,
    CandidateState,
    Decision,
    advance,
    compose_split,
    decide,
    percent,
    window_complete,
)
from .router import VariantRouter
from .shadow import ShadowManager
from .stats_math import quantile_with_ci

log = logging.getLogger(__name__)

QUANTILES = (0.5, 0.95, 0.99)
STATES = ("canary", "promoted", "rolled_back")
ACTIONS = ("promote", "hold", "rollback")


@dataclass(frozen=True)
class RequestSample:
    at: float
    ttft: float | None
    e2e: float
    status: int


def _counts_for_errors(status: int) -> bool:
    """200s and server errors; client errors (4xx) and callers who left (499) say nothing."""
    return status == 200 or status >= 500


class CanaryController:
    def __init__(
        self,
        config: SlimserveConfig,
        router: VariantRouter,
        shadow: ShadowManager,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = config.canary
        self.baseline = config.canary_baseline
        self.candidates = config.canary_candidates
        self.router = router
        self.shadow = shadow
        self.metrics = metrics
        self._clock = clock
        self.samples: dict[str, deque[RequestSample]] = {
            name: deque(maxlen=self.options.reservoir) for name in config.variants
        }
        now = clock()
        self.states = {c: CandidateState(variant=c, window_started=now) for c in self.candidates}
        self.auto = False
        self.events: deque[dict[str, Any]] = deque(maxlen=100)
        for name in self.candidates:  # every series exists from the first scrape
            for action in ("promote", "rollback"):
                metrics.canary_transitions.labels(name, action)
            for action in ACTIONS:
                metrics.canary_decision.labels(name, action)
        self.refresh_metrics()
        metrics.canary_auto.set(0)
        if self.options.enabled:
            self.set_auto(True)

    # ---- inputs ------------------------------------------------------------------------------

    def record(self, variant: str, ttft: float | None, e2e: float, status: int) -> None:
        reservoir = self.samples.get(variant)
        if reservoir is not None:
            reservoir.append(RequestSample(self._clock(), ttft, e2e, status))

    def set_auto(self, enabled: bool) -> None:
        """Start (or stop) moving the split; starting applies the candidates' current steps."""
        self.auto = enabled
        self.metrics.canary_auto.set(1 if enabled else 0)
        if enabled and self.candidates:
            now = self._clock()
            for state in self.states.values():
                state.window_started = now  # judge only traffic under the split it applies
            self._apply_split()

    def manual_split(self) -> None:
        """Someone set the split by hand: stop overriding it."""
        if self.auto:
            log.info("manual split: canary stepping paused")
            self.set_auto(False)

    # ---- evidence and decisions -------------------------------------------------------------

    def _window(self, variant: str) -> list[RequestSample]:
        state = self.states.get(variant)
        start = state.window_started if state else float("-inf")
        return [s for s in self.samples.get(variant, ()) if s.at >= start]

    def evidence(self, variant: str, stats: dict[str, dict | None]) -> CandidateEvidence:
        window = self._window(variant)
        ok = [s for s in window if s.status == 200]
        counted = [s for s in window if _counts_for_errors(s.status)]
        confidence = self.options.confidence
        ttfts = [s.ttft for s in ok if s.ttft is not None]
        return CandidateEvidence(
            requests=len(counted),
            errors=sum(s.status >= 500 for s in counted),
            ttft_p95=quantile_with_ci(ttfts, 0.95, confidence),
            e2e_p95=quantile_with_ci([s.e2e for s in ok], 0.95, confidence),
            perplexity=_perplexity(stats.get(variant)),
            baseline_perplexity=_perplexity(stats.get(self.baseline)),
            shadow=self.shadow.summary(self.baseline, variant),
        )

    def evaluate(self, stats: dict[str, dict | None], force: bool = False) -> dict[str, Decision]:
        """Judge each candidate whose window is complete (every candidate with `force`); with
        auto stepping on, act on the decisions."""
        now = self._clock()
        decisions: dict[str, Decision] = {}
        changed = False
        for name, state in self.states.items():
            if state.status != "canary":
                continue
            if not force and not window_complete(state, self.options.interval_seconds, now):
                continue
            decision = decide(self.evidence(name, stats), self.options.slo)
            decisions[name] = decision
            self._set_decision_metric(name, decision.action)
            if not self.auto:
                state.last_decision = decision
                continue
            new = advance(state, decision, self.options.steps, now)
            if new.status != state.status or new.step != state.step:
                changed = True
                self.metrics.canary_transitions.labels(name, decision.action).inc()
                self._log_event(name, decision, percent(state, self.options.steps), new)
            self.states[name] = new
        if changed:
            self._apply_split()
        return decisions

    def _log_event(self, name: str, decision: Decision, before: float, new: CandidateState) -> None:
        after = percent(new, self.options.steps)
        event = {
            "variant": name,
            "action": decision.action,
            "from_percent": before,
            "to_percent": after,
            "state": new.status,
            "reasons": decision.reasons,
            "unix_time": time.time(),
        }
        self.events.append(event)
        log.info(
            "canary %s: %s %g%% -> %g%% (%s)",
            name,
            decision.action,
            before,
            after,
            "; ".join(decision.reasons),
        )

    def _apply_split(self) -> None:
        inside = {self.baseline, *self.candidates}
        others = {n: w * 100 for n, w in self.router.split.items() if n not in inside}
        split = compose_split(self.baseline, list(self.states.values()), self.options.steps, others)
        self.router.set_split(split)
        for name, state in self.states.items():
            for value in STATES:
                self.metrics.canary_state.labels(name, value).set(int(state.status == value))

    def _set_decision_metric(self, name: str, action: str) -> None:
        for value in ACTIONS:
            self.metrics.canary_decision.labels(name, value).set(int(action == value))

    def refresh_metrics(self) -> None:
        for name, state in self.states.items():
            for value in STATES:
                self.metrics.canary_state.labels(name, value).set(int(state.status == value))

    # ---- the loop ----------------------------------------------------------------------------

    async def run(self, stats: Callable[[], Awaitable[dict[str, dict | None]]]) -> None:
        period = min(self.options.interval_seconds, 5.0)
        while True:
            await asyncio.sleep(period)
            if not self.auto:
                continue
            try:
                self.evaluate(await stats())
            except Exception:
                log.exception("canary evaluation failed")

    # ---- the report --------------------------------------------------------------------------

    def latency(self, variant: str) -> dict[str, Any]:
        window = self._window(variant)
        ok = [s for s in window if s.status == 200]
        counted = [s for s in window if _counts_for_errors(s.status)]
        errors = sum(s.status >= 500 for s in counted)
        confidence = self.options.confidence
        ttfts = [s.ttft for s in ok if s.ttft is not None]
        e2es = [s.e2e for s in ok]
        started = window[0].at if window else None
        state = self.states.get(variant)
        if state is not None:
            started = state.window_started
        return {
            "window_seconds": round(self._clock() - started, 3) if started is not None else 0.0,
            "samples": len(ok),
            "requests": len(counted),
            "errors": errors,
            "error_rate": errors / len(counted) if counted else None,
            "ttft_seconds": {
                f"p{round(q * 100)}": _dump(quantile_with_ci(ttfts, q, confidence))
                for q in QUANTILES
            },
            "e2e_seconds": {
                f"p{round(q * 100)}": _dump(quantile_with_ci(e2es, q, confidence))
                for q in QUANTILES
            },
        }

    def report(self, stats: dict[str, dict | None], live: dict[str, dict[str, Any]]) -> dict:
        base_ppl = _perplexity(stats.get(self.baseline))
        variants = {}
        split = self.router.split
        for name in self.samples:
            role = (
                "baseline"
                if name == self.baseline
                else "candidate"
                if name in self.states
                else "other"
            )
            ppl = _perplexity(stats.get(name))
            shadow = self.shadow.summary(self.baseline, name) if name != self.baseline else None
            entry: dict[str, Any] = {
                "role": role,
                "weight": split.get(name, 0.0),
                "latency": self.latency(name),
                "quality": {
                    "perplexity": ppl,
                    "perplexity_delta": (ppl - base_ppl) / base_ppl
                    if ppl is not None and base_ppl
                    else None,
                    "shadow_vs_baseline": shadow.model_dump() if shadow else None,
                },
                **live.get(name, {}),
            }
            state = self.states.get(name)
            if state is not None:
                entry["canary"] = {
                    "status": state.status,
                    "percent": percent(state, self.options.steps),
                    "step": state.step,
                    "history": state.history,
                    "last_decision": state.last_decision.model_dump()
                    if state.last_decision
                    else None,
                    "decision_now": decide(
                        self.evidence(name, stats), self.options.slo
                    ).model_dump()
                    if state.status == "canary"
                    else None,
                }
            variants[name] = entry
        return {
            "baseline": self.baseline,
            "candidates": self.candidates,
            "auto": self.auto,
            "steps": self.options.steps,
            "interval_seconds": self.options.interval_seconds,
            "slo": self.options.slo.model_dump(),
            "variants": variants,
            "events": list(self.events),
        }


def _perplexity(stats: dict | None) -> float | None:
    bench = (stats or {}).get("self_bench") or {}
    return bench.get("perplexity")


def _dump(estimate: Any) -> dict | None:
    return estimate.model_dump() if estimate is not None else None
