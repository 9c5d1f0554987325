"""The capacity planner's queueing arithmetic against answers known by hand and by simulation."""

from __future__ import annotations

import math
import random

import pytest

from slimserve.loadtests.queueing import (
    erlang_c,
    mean_wait,
    replicas_for_slo,
    wait_exceeds,
)


def test_erlang_c_textbook_values():
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: the probability of waiting is rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    # c = 3, A = 2: (8/6 * 3) / (1 + 2 + 2 + 8/6 * 3) = 4 / 9
    assert erlang_c(3, 2.0) == pytest.approx(4 / 9)
    assert erlang_c(4, 4.0) == 1.0 and erlang_c(4, 9.0) == 1.0  # saturated
    assert 0 < erlang_c(2000, 1900.0) < 1.0  # large fleets: no overflow


def test_mm1_wait_tail_and_mean():
    # M/M/1, lambda 3, mu 4: P(W > t) = rho * exp(-(mu - lambda) t), E[W] = rho / (mu - lambda)
    assert wait_exceeds(1, 3.0, 4.0, 2.0) == pytest.approx(0.75 * math.exp(-2.0))
    assert mean_wait(1, 3.0, 4.0) == pytest.approx(0.75)
    assert mean_wait(1, 4.0, 4.0) == math.inf


def test_mmc_tail_matches_a_simulation():
    """Simulated M/M/c (first come, first served) against the closed form."""
    rng = random.Random(7)
    servers, arrival, service, budget = 4, 3.2, 1.0, 0.5
    free_at = [0.0] * servers
    clock, over, count = 0.0, 0, 200_000
    for _ in range(count):
        clock += rng.expovariate(arrival)
        server = min(range(servers), key=free_at.__getitem__)
        start = max(clock, free_at[server])
        over += start - clock > budget
        free_at[server] = start + rng.expovariate(service)
    assert over / count == pytest.approx(wait_exceeds(servers, arrival, service, budget), abs=0.01)


def test_replicas_for_slo_is_the_fewest_that_meets_it():
    plan = replicas_for_slo(
        arrival_rate=20.0,
        capacity_per_replica=3.5,
        slots_per_replica=32,
        wait_budget_seconds=1.0,
        quantile=0.95,
        headroom=0.2,
    )
    # 20 / 3.5 = 5.7 replicas at 100%; 0.8 busy at most needs 20 / (0.8 * 3.5) = 7.14 -> 8.
    assert plan.replicas == 8
    assert plan.utilization == pytest.approx(20 / (8 * 3.5))
    assert plan.p_wait_over_budget <= 0.05
    # Without headroom the tail alone decides, and one replica fewer fails it.
    tight = replicas_for_slo(20.0, 3.5, 32, 1.0, 0.95, headroom=0.0)
    service = 3.5 / 32
    assert wait_exceeds(tight.replicas * 32, 20.0, service, 1.0) <= 0.05
    assert wait_exceeds((tight.replicas - 1) * 32, 20.0, service, 1.0) > 0.05


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="quantile"):
        replicas_for_slo(1.0, 1.0, 1, 1.0, quantile=1.0)
    with pytest.raises(ValueError, match="headroom"):
        replicas_for_slo(1.0, 1.0, 1, 1.0, headroom=1.0)
    with pytest.raises(ValueError, match="servers"):
        erlang_c(0, 1.0)
