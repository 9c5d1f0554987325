"""Canary decisions and the step schedule on synthetic evidence; quantile CIs."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.serve.config import CanarySLO, ShadowOptions, parse_config
from slimserve.serve.observability.metrics import GatewayMetrics
from slimserve.serve.observability.mfu import WorkMeter
from slimserve.serve.routing.canary import (
    CandidateEvidence,
    CandidateState,
    advance,
    compose_split,
    decide,
    percent,
    window_complete,
)
from slimserve.serve.routing.canary_controller import CanaryController
from slimserve.serve.routing.router import VariantRouter
from slimserve.serve.routing.shadow import ShadowManager
from slimserve.serve.routing.shadow_scores import ShadowScores, ShadowSummary
from slimserve.serve.routing.stats_math import (
    order_statistic_bounds,
    quantile_with_ci,
    wilson_interval,
)

SLO = CanarySLO(
    max_p95_ttft_seconds=1.0,
    max_error_rate=0.05,
    max_perplexity_delta=0.05,
    min_token_agreement=0.8,
    max_next_token_kl_nats=0.2,
    min_samples=20,
    min_shadow_samples=5,
)
STEPS = [10.0, 25.0, 50.0, 100.0]


def _shadow(agreement: float = 0.95, kl: float = 0.05, n: int = 10) -> ShadowSummary:
    return ShadowSummary(
        comparisons=n,
        scored=n,
        exact_match=0.5,
        token_agreement=agreement,
        next_token_kl_nats=kl,
        source_reference_perplexity=3.0,
        target_reference_perplexity=3.1,
    )


def _evidence(ttfts, errors: int = 0, ppl: float = 10.2, shadow=None) -> CandidateEvidence:
    return CandidateEvidence(
        requests=len(ttfts) + errors,
        errors=errors,
        ttft_p95=quantile_with_ci(ttfts, 0.95),
        perplexity=ppl,
        baseline_perplexity=10.0,
        shadow=shadow if shadow is not None else _shadow(),
    )


def _statuses(decision) -> dict[str, str]:
    return {c.name: c.status for c in decision.checks}


FAST = list(np.linspace(0.1, 0.5, 100))


def test_everything_within_the_slo_promotes():
    decision = decide(_evidence(FAST), SLO)
    assert decision.action == "promote", decision.reasons
    assert set(_statuses(decision).values()) == {"pass"}


def test_too_few_samples_holds():
    decision = decide(_evidence(FAST[:10], shadow=_shadow(n=2)), SLO)
    assert decision.action == "hold"
    statuses = _statuses(decision)
    assert statuses["p95_ttft_seconds"] == statuses["error_rate"] == "insufficient"
    assert statuses["token_agreement"] == "insufficient"


@pytest.mark.parametrize(
    ("evidence", "check"),
    [
        (_evidence(FAST, ppl=12.0), "perplexity_delta"),  # +20% perplexity
        (_evidence(FAST, shadow=_shadow(agreement=0.3)), "token_agreement"),
        (_evidence(FAST, shadow=_shadow(kl=2.0)), "next_token_kl_nats"),
        (_evidence(FAST, errors=30), "error_rate"),
        (_evidence(list(np.linspace(2.0, 3.0, 100))), "p95_ttft_seconds"),
    ],
)
def test_a_clear_breach_rolls_back(evidence, check):
    decision = decide(evidence, SLO)
    assert decision.action == "rollback"
    assert _statuses(decision)[check] == "fail"
    assert any(check in reason for reason in decision.reasons)


def test_a_breach_within_the_confidence_interval_holds():
    # p95 just above the limit, but the interval still reaches below it: not proven
    samples = [0.5] * 90 + [0.95, 0.98, 1.02, 1.05, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]
    estimate = quantile_with_ci(samples, 0.95)
    assert estimate.value > 1.0 and estimate.low <= 1.0
    decision = decide(_evidence(samples), SLO)
    assert decision.action == "hold"
    assert _statuses(decision)["p95_ttft_seconds"] == "inconclusive"


def test_missing_quality_evidence_holds_and_null_limits_are_skipped():
    evidence = _evidence(FAST).model_copy(update={"perplexity": None})
    assert decide(evidence, SLO).action == "hold"
    relaxed = SLO.model_copy(update={"max_perplexity_delta": None})
    assert decide(evidence, relaxed).action == "promote"
    assert "perplexity_delta" not in _statuses(decide(evidence, relaxed))


def test_steps_promote_until_100_then_stop():
    promote = decide(_evidence(FAST), SLO)
    state = CandidateState(variant="c")
    seen = [percent(state, STEPS)]
    for now in range(1, 6):
        state = advance(state, promote, STEPS, float(now))
        seen.append(percent(state, STEPS))
    assert seen == [10, 25, 50, 100, 100, 100]
    assert state.status == "promoted"
    assert state.history == ["10% -> 25%", "25% -> 50%", "50% -> 100%"]


def test_rollback_zeroes_the_weight_and_is_final():
    state = advance(
        CandidateState(variant="c", step=2), decide(_evidence(FAST, ppl=20), SLO), STEPS, 5
    )
    assert state.status == "rolled_back" and percent(state, STEPS) == 0
    again = advance(state, decide(_evidence(FAST), SLO), STEPS, 6)
    assert again.status == "rolled_back"


def test_hold_keeps_the_step_and_the_window():
    state = CandidateState(variant="c", step=1, window_started=3.0)
    held = advance(state, decide(_evidence(FAST[:5]), SLO), STEPS, 9.0)
    assert held.step == 1 and held.window_started == 3.0
    assert window_complete(held, 5.0, 9.0) and not window_complete(held, 10.0, 9.0)


def test_compose_split_gives_the_baseline_the_rest():
    a = CandidateState(variant="a", step=1)
    b = CandidateState(variant="b", status="rolled_back")
    assert compose_split("full", [a, b], STEPS) == {"a": 25.0, "b": 0.0, "full": 75.0}
    assert compose_split("full", [a], STEPS, others={"x": 5.0}) == {
        "x": 5.0,
        "a": 25.0,
        "full": 70.0,
    }
    promoted = CandidateState(variant="a", status="promoted")
    assert compose_split("full", [promoted, b], STEPS)["full"] == 0.0


def test_order_statistic_ci_covers_the_true_quantile():
    rng = np.random.default_rng(0)
    true_p95 = -np.log(0.05)  # of Exp(1)
    covered = 0
    for _ in range(400):
        estimate = quantile_with_ci(rng.exponential(size=200), 0.95, 0.95)
        covered += estimate.low <= true_p95 <= estimate.high
    assert covered / 400 > 0.92


def test_ci_bounds_need_enough_samples():
    assert order_statistic_bounds(20, 0.95, 0.95) == (17, None)  # no upper bound below 72
    assert order_statistic_bounds(72, 0.95, 0.95)[1] == 72
    lower, upper = order_statistic_bounds(100, 0.95, 0.95)
    assert lower < 95 < upper <= 100
    assert quantile_with_ci([], 0.95) is None
    low, high = wilson_interval(0, 100)
    assert low == 0.0 and 0.0 < high < 0.05


def _controller(clock):
    config = parse_config(
        {
            "model": "m",
            "variants": {"full": {}, "good": {}, "bad": {}},
            "canary": {
                "enabled": True,
                "interval_seconds": 10,
                "steps": [10, 50, 100],
                "slo": SLO.model_dump(),
            },
        }
    )
    router = VariantRouter("m", list(config.variants), config.effective_split())
    metrics = GatewayMetrics(list(config.variants))
    shadow = ShadowManager([], ShadowOptions(), {}, metrics, WorkMeter(30))
    return CanaryController(config, router, shadow, metrics, clock=clock), shadow, router


def test_controller_steps_the_good_candidate_and_rolls_back_the_bad():
    now = [0.0]
    controller, shadow, router = _controller(lambda: now[0])
    assert router.split == pytest.approx({"good": 0.1, "bad": 0.1, "full": 0.8})
    stats = {
        "full": {"self_bench": {"perplexity": 10.0}},
        "good": {"self_bench": {"perplexity": 10.1}},
        "bad": {"self_bench": {"perplexity": 10.1}},
    }
    for _ in range(6):
        shadow.record(
            "full",
            "good",
            ShadowScores(exact_match=True, token_agreement=0.97, next_token_kl_nats=0.01),
        )
        shadow.record(
            "full",
            "bad",
            ShadowScores(exact_match=False, token_agreement=0.2, next_token_kl_nats=3.0),
        )
    for step in range(2):  # 10% -> 50% -> 100%
        for i in range(30):
            now[0] += 0.1
            controller.record("good", ttft=0.2 + 0.01 * (i % 5), e2e=1.0, status=200)
            controller.record("bad", ttft=0.2, e2e=1.0, status=200)
        assert controller.evaluate(stats) == {}  # the window is not complete yet
        now[0] += 10
        decisions = controller.evaluate(stats)
        assert decisions["good"].action == "promote", decisions["good"].reasons
        if step == 0:
            assert decisions["bad"].action == "rollback"
    assert controller.states["good"].status == "promoted"
    assert controller.states["bad"].status == "rolled_back"
    assert router.split == {"good": 1.0}
    assert [e["action"] for e in controller.events] == ["promote", "rollback", "promote"]


def test_a_manual_split_pauses_the_controller():
    now = [0.0]
    controller, _, router = _controller(lambda: now[0])
    controller.manual_split()
    router.set_split({"full": 1})
    now[0] += 100
    controller.evaluate({}, force=True)
    assert router.split == {"full": 1.0} and not controller.auto
