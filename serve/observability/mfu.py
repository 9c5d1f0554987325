"""Achieved model FLOP/s and MFU per variant, over a sliding window, measured at the gateway.

Every token the gateway sees a variant produce (callers' requests, shadow copies, shadow
scoring) is recorded as `TokenWork` in one-second buckets. At scrape time the variant's FLOP
model turns the window's work into FLOPs; over the window's seconds that is the achieved FLOP/s,
and over the peak of all the variant's replicas, the MFU.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .flops import FlopModel, TokenWork, decode_work, prefill_work

log = logging.getLogger(__name__)

MIN_WINDOW_SECONDS = 1.0


@dataclass
class _Bucket:
    second: int
    work: TokenWork = field(default_factory=TokenWork)
    generated: int = 0


@dataclass
class WindowWork:
    work: TokenWork
    generated_tokens: int
    seconds: float

    @property
    def generated_tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds


class WorkMeter:
    def __init__(self, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_seconds = window_seconds
        self._clock = clock
        self._started = clock()
        self._buckets: dict[str, deque[_Bucket]] = {}

    def add(self, variant: str, work: TokenWork, generated: int = 0) -> None:
        now = int(self._clock())
        buckets = self._buckets.setdefault(variant, deque())
        if not buckets or buckets[-1].second != now:
            buckets.append(_Bucket(now))
            self._prune(buckets, now)
        buckets[-1].work += work
        buckets[-1].generated += generated

    def _first_second(self, now: float) -> int:
        """The oldest whole second inside the window ending now."""
        return int(now) - max(math.ceil(self.window_seconds), 1) + 1

    def _prune(self, buckets: deque[_Bucket], now: float) -> None:
        first = self._first_second(now)
        while buckets and buckets[0].second < first:
            buckets.popleft()

    def window(self, variant: str) -> WindowWork:
        """The work of the buckets in the window, over the time those buckets span (whole
        seconds up to now; since the start when the gateway is younger than the window)."""
        now = self._clock()
        buckets = self._buckets.get(variant, deque())
        self._prune(buckets, now)
        total, generated = TokenWork(), 0
        for bucket in buckets:
            total += bucket.work
            generated += bucket.generated
        span = now - max(self._first_second(now), self._started)
        return WindowWork(total, generated, max(span, MIN_WINDOW_SECONDS))


@dataclass
class Utilization:
    achieved_flops_per_second: float
    mfu: float  # achieved over the peak of every replica; above 1 only through a bug
    generated_tokens_per_second: float


def utilization(
    flops: FlopModel, window: WindowWork, peak_flops_per_second: float, replicas: int
) -> Utilization:
    achieved = flops.flops(window.work) / window.seconds
    peak = peak_flops_per_second * max(replicas, 1)
    ratio = achieved / peak
    if ratio > 1.0:
        # Exported as is, never clamped: a peak measured in another dtype than the model runs
        # in, or a FLOP model counting work that does not run, shows here.
        log.warning(
            "MFU %.3f is above 1 (achieved %.3g FLOP/s over a peak of %.3g): the peak or the "
            "FLOP model is wrong",
            ratio,
            achieved,
            peak,
        )
    return Utilization(achieved, ratio, window.generated_tokens_per_second)


class RequestWork:
    """Turns one request's event stream into TokenWork: the prompt's prefill at the first
    generated token, then one decode step per further token."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generated = 0

    def accepted(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens

    def tokens(self, count: int) -> TokenWork:
        work = (
            prefill_work(self.prompt_tokens) if self.generated == 0 and count > 0 else TokenWork()
        )
        work += decode_work(self.prompt_tokens, self.generated + 1, count)
        self.generated += count
        return work
