"""Quantiles with distribution-free confidence intervals, and a binomial rate interval.

The quantile CI is the classic order-statistic interval: with n samples, the number of them
below the true q-quantile is Binomial(n, q), so [x_(l), x_(u)] covers it with probability
P(l <= B < u); l and u are the widest-inside indices that keep each tail at most alpha / 2.
With few samples a bound does not exist (it would lie beyond the smallest or largest sample):
it is then None, which callers read as "not enough data".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel


class QuantileEstimate(BaseModel):
    quantile: float
    value: float
    low: float | None  # None: fewer samples than a lower bound needs
    high: float | None  # None: fewer samples than an upper bound needs
    samples: int
    confidence: float


def binomial_cdf(n: int, p: float) -> np.ndarray:
    """P(B <= k) for k = 0..n, B ~ Binomial(n, p), computed in log space."""
    k = np.arange(n + 1)
    log_comb = np.array(
        [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k]
    )
    with np.errstate(divide="ignore"):
        log_pmf = log_comb + k * np.log(p) + (n - k) * np.log1p(-p)
    return np.minimum(np.cumsum(np.exp(log_pmf)), 1.0)


def order_statistic_bounds(n: int, q: float, confidence: float) -> tuple[int | None, int | None]:
    """1-based ranks (l, u) of the sorted samples bounding the q-quantile; None where the bound
    needs more samples."""
    alpha = 1.0 - confidence
    cdf = binomial_cdf(n, q)
    below = np.nonzero(cdf <= alpha / 2)[0]
    lower = int(below[-1]) + 1 if below.size else None
    above = np.nonzero(cdf >= 1 - alpha / 2)[0]
    upper = int(above[0]) + 1 if above.size else None
    if upper is not None and upper > n:
        upper = None
    return lower, upper


def quantile_with_ci(
    samples: Sequence[float], q: float, confidence: float = 0.95
) -> QuantileEstimate | None:
    ordered = np.sort(np.asarray(samples, dtype=float))
    n = ordered.size
    if n == 0:
        return None
    lower, upper = order_statistic_bounds(n, q, confidence)
    return QuantileEstimate(
        quantile=q,
        value=float(np.quantile(ordered, q)),
        low=float(ordered[lower - 1]) if lower else None,
        high=float(ordered[upper - 1]) if upper else None,
        samples=int(n),
        confidence=confidence,
    )


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) with no trials."""
    if trials == 0:
        return 0.0, 1.0
    z = _normal_quantile(1 - (1 - confidence) / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF by bisection on erf (plenty for a confidence level)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
