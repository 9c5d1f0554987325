"""`low-rank`: Linear layers replaced by two thinner ones from a (whitened) SVD."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ..spec_base import CalibrationSpec, SpecBase
from .sparsity import decoder_linear_shapes

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class LowRankSpec(SpecBase):
    """Replace Linear layers by two thinner ones from a (whitened) SVD.

    activation_aware whitens by the calibration inputs' second moment first (SVD-LLM style), so
    the truncation minimises the output error ||(W - W')X|| rather than ||W - W'||.
    """

    method: Literal["low-rank"]
    rank: int | None = Field(None, gt=0, description="fixed rank for every target")
    energy: float | None = Field(None, gt=0, le=1, description="kept share of sum(sigma^2)")
    activation_aware: bool = True
    targets: list[str] = Field(
        default_factory=lambda: ["*.mlp.*"], description="fnmatch patterns on Linear names"
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @model_validator(mode="after")
    def _one_budget(self) -> LowRankSpec:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("set exactly one of rank or energy")
        return self

    def check_model(self, model_config: Any) -> None:
        if self.rank is None:
            return
        matched = {
            name: shape
            for name, shape in decoder_linear_shapes(model_config).items()
            if any(fnmatch.fnmatch(name, p) for p in self.targets)
            and not any(fnmatch.fnmatch(name, p) for p in self.skip)
        }
        if not matched:
            raise ValueError(f"targets {self.targets} match no Linear layer of the model")
        smallest = min(min(shape) for shape in matched.values())
        if self.rank >= smallest:
            raise ValueError(
                f"rank={self.rank} must be below the smallest targeted dimension ({smallest})"
            )

    def apply(self, model: nn.Module) -> MethodReport:
        from ..lowrank import apply_low_rank

        return apply_low_rank(model, self)
