"""`gobo`: GOBO, outlier weights kept exactly in 16 bits, the rest quantized."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from ..spec_base import SpecBase
from .groupwise import check_group_divides, power_of_two

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class GoboSpec(SpecBase):
    """GOBO: weights beyond `sigma` standard deviations of their layer stay 16-bit (sparse);
    the rest is quantized (int8 per channel, or a 4/3-bit group grid)."""

    method: Literal["gobo"]
    sigma: float = Field(3.0, gt=0)
    bits: Literal[8, 4, 3] = 4
    group_size: int = Field(64, description="used at 4 and 3 bits")

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        return power_of_two(value, "group_size")

    def check_model(self, model_config: Any) -> None:
        if self.bits < 8:
            check_group_divides(self, self.group_size, model_config)

    def apply(self, model: nn.Module) -> MethodReport:
        from ..gobo import apply_gobo

        return apply_gobo(model, self)
