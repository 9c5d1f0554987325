"""Which variants are up: a variant is down from a failure that says so (its replica died, it
failed to load) until it answers again. Overload and slow answers do not make a variant down:
a busy variant is refused by its own queue, not by the router."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Outage:
    reason: str
    since: float  # time.time()


class VariantAvailability:
    def __init__(self, variants: list[str]) -> None:
        self.variants = list(variants)
        self._down: dict[str, Outage] = {}

    def mark_down(self, variant: str, reason: str) -> bool:
        """Record an outage; True when the variant was up until now."""
        was_up = variant not in self._down
        if was_up:
            self._down[variant] = Outage(reason, time.time())
        return was_up

    def mark_up(self, variant: str) -> bool:
        """The variant answered; True when it was down until now."""
        return self._down.pop(variant, None) is not None

    def is_up(self, variant: str) -> bool:
        return variant not in self._down

    def down(self) -> frozenset[str]:
        return frozenset(self._down)

    def outage(self, variant: str) -> Outage | None:
        return self._down.get(variant)
