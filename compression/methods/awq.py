"""`awq`: AWQ, activation-aware per-channel scales and a clipping search, then 4 / 3 bits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..spec_base import CalibrationSpec
from .groupwise import GroupWiseSpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class AWQSpec(GroupWiseSpec):
    """AWQ: per-input-channel scales s = mean|X|^a (a searched on a grid) protect salient
    weights; then a per-group clipping search."""

    method: Literal["awq"]
    grid: int = Field(20, ge=2, le=200, description="exponents tried in the scale search")
    clip: bool = True
    clip_grid: int = Field(20, ge=2, le=200)
    max_shrink: float = Field(0.5, gt=0.0, lt=1.0, description="smallest clip ratio is 1-this")
    fold: bool = Field(True, description="fold scales into the previous op when there is one")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def apply(self, model: nn.Module) -> MethodReport:
        from ..awq import apply_awq

        return apply_awq(model, self)
