"""`prune-ffn`: remove MLP channels, the same count in every layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..spec_base import CalibrationSpec, UniformStructuredSpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class FFNPruneSpec(UniformStructuredSpec):
    """Remove MLP channels (gate/up rows, down columns), the same count in every layer."""

    method: Literal["prune-ffn"]
    keep_fraction: float = Field(gt=0, lt=1, description="of intermediate_size")
    multiple_of: int = Field(64, ge=1, description="round the kept width to a multiple")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def kept_width(self, intermediate_size: int) -> int:
        width = round(intermediate_size * self.keep_fraction / self.multiple_of) * self.multiple_of
        return max(self.multiple_of, min(width, intermediate_size))

    def check_model(self, model_config: Any) -> None:
        size = model_config.intermediate_size
        if self.kept_width(size) >= size:
            raise ValueError(
                f"keep_fraction={self.keep_fraction} with multiple_of={self.multiple_of} keeps all "
                f"{size} channels; lower keep_fraction or multiple_of"
            )

    def apply(self, model: nn.Module) -> MethodReport:
        from ..structured import apply_ffn_pruning

        return apply_ffn_pruning(model, self)
