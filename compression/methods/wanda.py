"""`wanda`: pruning by |W| times the input feature norm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..spec_base import CalibrationSpec
from .sparsity import SparsitySpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class WandaSpec(SparsitySpec):
    """Score |W_ij| * ||X_j||_2 and prune per output row (Sun et al. 2023)."""

    method: Literal["wanda"]
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def apply(self, model: nn.Module) -> MethodReport:
        from ..wanda import apply_wanda

        return apply_wanda(model, self)
