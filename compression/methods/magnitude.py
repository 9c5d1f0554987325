"""`magnitude`: one-shot magnitude pruning."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import model_validator

from .sparsity import SparsitySpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class MagnitudeSpec(SparsitySpec):
    """Zero the smallest |W| (Han et al. 2015 style one-shot magnitude pruning)."""

    method: Literal["magnitude"]
    # per-layer: every Linear reaches the target; global: one threshold over all of them.
    scope: Literal["per-layer", "global"] = "per-layer"

    @model_validator(mode="after")
    def _global_is_unstructured(self) -> MagnitudeSpec:
        if self.scope == "global" and self.nm is not None:
            raise ValueError("scope: 'global' needs a float sparsity; N:M is per group already")
        return self

    def apply(self, model: nn.Module) -> MethodReport:
        from ..magnitude import apply_magnitude

        return apply_magnitude(model, self)
