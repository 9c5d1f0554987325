"""Which variant serves a request: pinned by model name, else a weighted (sticky) split."""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping
from itertools import accumulate


class UnknownModelError(LookupError):
    pass


class NoVariantUpError(LookupError):
    """Every variant that could serve the request is down."""


class RoutingError(ValueError):
    """A routing change that cannot be applied; `param` names the bad field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class VariantRouter:
    def __init__(
        self,
        public_name: str,
        variants: list[str],
        split: Mapping[str, float],
        sticky_header: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.public_name = public_name
        self.variants = list(variants)
        self.sticky_header = sticky_header
        self._rng = rng or random.Random()
        self.set_split(split)

    def set_split(self, split: Mapping[str, float]) -> None:
        weights = {name: w for name, w in split.items() if w > 0}
        unknown = set(weights) - set(self.variants)
        if unknown or not weights:
            raise ValueError(f"split must weigh known variants {self.variants}; got {dict(split)}")
        total = sum(weights.values())
        # One assignment: a draw never sees the names of one split with the sums of another.
        self._table = (list(weights), list(accumulate(w / total for w in weights.values())))

    @property
    def split(self) -> dict[str, float]:
        names, cumulative = self._table
        previous = [0.0, *cumulative[:-1]]
        return {n: c - p for n, c, p in zip(names, cumulative, previous, strict=True)}

    def model_ids(self) -> list[str]:
        return [self.public_name, *(f"{self.public_name}:{v}" for v in self.variants)]

    def pinned_variant(self, model: str) -> str | None:
        """The variant a model name pins, None for the public name; raises if unknown."""
        if model == self.public_name:
            return None
        name = model.removeprefix(f"{self.public_name}:")
        if name in self.variants:
            return name
        raise UnknownModelError(model)

    def _draw(self, headers: Mapping[str, str]) -> float:
        key = headers.get(self.sticky_header) if self.sticky_header else None
        if not key:
            return self._rng.random()
        digest = hashlib.sha256(key.encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def choose(
        self, model: str, headers: Mapping[str, str], avoid: frozenset[str] = frozenset()
    ) -> str:
        """The variant for a request: the pinned one (even if down: the caller asked for it),
        else a draw from the split. A draw that lands on a variant in `avoid` (down) is spread
        over the others by their weights, so callers of the others keep theirs (sticky keys
        stay put); with every split variant down, the first other variant up serves."""
        pinned = self.pinned_variant(model)
        if pinned is not None:
            return pinned
        names, cumulative = self._table
        draw = self._draw(headers)
        index = min(bisect.bisect_right(cumulative, draw), len(names) - 1)
        if names[index] not in avoid:
            return names[index]
        low = cumulative[index - 1] if index else 0.0
        within = (draw - low) / (cumulative[index] - low)  # where in the down one's share
        weights = {n: w for n, w in self.split.items() if n not in avoid}
        if weights:
            total = sum(weights.values())
            for name, running in zip(weights, accumulate(weights.values()), strict=True):
                if within * total < running:
                    return name
            return name
        spare = [n for n in self.variants if n not in avoid]
        if not spare:
            raise NoVariantUpError(model)
        return spare[0]
