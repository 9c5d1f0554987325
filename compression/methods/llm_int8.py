"""`llm-int8`: LLM.int8(), int8 matmuls with the outlier input features kept in 16 bits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..spec_base import CalibrationSpec, SpecBase

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class LLMInt8Spec(SpecBase):
    """LLM.int8(): input features whose calibration magnitude reaches `threshold` stay 16-bit;
    the rest is int8 (vector-wise W8A8 as in the paper, or W8A16 with activations="16bit")."""

    method: Literal["llm-int8"]
    threshold: float = Field(6.0, gt=0)
    activations: Literal["int8", "16bit"] = "int8"
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def apply(self, model: nn.Module) -> MethodReport:
        from ..llm_int8 import apply_llm_int8

        return apply_llm_int8(model, self)
