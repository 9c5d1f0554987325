"""Early refusal under overload: a request that would wait longer than its queue timeout to start
is refused on arrival instead of at its deadline.

Per variant, the gateway counts the requests it has sent that have not started yet and the rate
at which requests started recently. By Little's law a new request waits about
waiting / start rate; when that exceeds its queue timeout it would be dropped anyway, so it is
answered 503 at once and its caller can go elsewhere without waiting the timeout out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

# Gaps remembered per variant: enough for a steady rate, few enough to follow a change.
RATE_WINDOW = 64
# Below this many gaps the rate is not known well enough to refuse anyone.
MIN_GAPS = 8


class VariantAdmission:
    """Its start rate is measured only while requests queue (the gap between two starts with
    others waiting throughout), so it is the variant's capacity, not its recent traffic: an idle
    spell before a burst does not make the burst look hopeless."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.waiting = 0
        self._gaps: deque[float] = deque(maxlen=RATE_WINDOW)
        self._last_start: float | None = None
        self._backlog_since_last = False  # requests were still waiting after the last start

    def start_rate(self) -> float | None:
        """Requests started per second while others waited; None until it is known."""
        if len(self._gaps) < MIN_GAPS:
            return None
        total = sum(self._gaps)
        return len(self._gaps) / total if total > 0 else None

    def expected_wait(self) -> float | None:
        """Seconds a request arriving now would wait to start, None when unknown."""
        rate = self.start_rate()
        return None if rate is None else self.waiting / rate

    def arrived(self) -> None:
        self.waiting += 1

    def started(self) -> None:
        now = self._clock()
        if self._backlog_since_last and self._last_start is not None:
            self._gaps.append(now - self._last_start)
        self.waiting -= 1
        self._last_start = now
        self._backlog_since_last = self.waiting > 0

    def left(self) -> None:
        """Refused, timed out or failed before starting."""
        self.waiting -= 1
