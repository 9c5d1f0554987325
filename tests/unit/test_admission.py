"""Early refusal: the expected wait of a new request, from the start rate measured while
requests queue (synthetic timelines on a fake clock, answers known by hand)."""

from __future__ import annotations

import pytest

from slimserve.serve.routing.admission import MIN_GAPS, VariantAdmission


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_unknown_until_enough_starts_under_backlog():
    clock = _Clock()
    admission = VariantAdmission(clock)
    for _ in range(50):  # one request at a time: nobody ever waits behind another
        admission.arrived()
        clock.now += 1.0
        admission.started()
    assert admission.start_rate() is None and admission.expected_wait() is None


def test_wait_is_queue_length_over_the_rate_while_backlogged():
    clock = _Clock()
    admission = VariantAdmission(clock)
    for _ in range(40):
        admission.arrived()
    for _ in range(20):  # two starts a second while the queue never empties
        clock.now += 0.5
        admission.started()
    assert admission.start_rate() == pytest.approx(2.0)
    assert admission.waiting == 20
    assert admission.expected_wait() == pytest.approx(10.0)


def test_an_idle_spell_before_a_burst_does_not_count_as_slowness():
    clock = _Clock()
    admission = VariantAdmission(clock)
    for _ in range(MIN_GAPS + 2):  # a busy period at 4 starts/s
        admission.arrived()
    for _ in range(MIN_GAPS + 2):
        clock.now += 0.25
        admission.started()
    clock.now += 600.0  # idle for ten minutes
    for _ in range(12):  # then a burst
        admission.arrived()
    clock.now += 0.25
    admission.started()  # the first start after the idle spell measures no gap
    assert admission.start_rate() == pytest.approx(4.0)
    assert admission.expected_wait() == pytest.approx(11 / 4.0)


def test_requests_that_leave_before_starting_stop_counting():
    admission = VariantAdmission(_Clock())
    admission.arrived()
    admission.arrived()
    admission.left()
    assert admission.waiting == 1
