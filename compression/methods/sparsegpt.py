"""`sparsegpt`: one-shot pruning with OBS weight updates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..spec_base import CalibrationSpec
from .sparsity import SparsitySpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class SparseGPTSpec(SparsitySpec):
    """One-shot OBS solver: prune and update the remaining weights (Frantar & Alistarh 2023)."""

    method: Literal["sparsegpt"]
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy update block")
    damp: float = Field(0.01, gt=0, lt=1, description="added to the Hessian diagonal, x mean")

    def apply(self, model: nn.Module) -> MethodReport:
        from ..sparsegpt import apply_sparsegpt

        return apply_sparsegpt(model, self)
