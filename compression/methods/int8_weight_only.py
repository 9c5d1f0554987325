"""`int8-weight-only`: absmax int8 weights, 16-bit activations (W8A16)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from ..spec_base import SpecBase

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class Int8WeightOnlySpec(SpecBase):
    """int8 weights with absmax scales, 16-bit activations (W8A16)."""

    method: Literal["int8-weight-only"]
    granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    # The tied embedding / lm_head matrix is a fifth of this model's bytes; quantize it too.
    include_embeddings: bool = True

    def apply(self, model: nn.Module) -> MethodReport:
        from ..int8 import apply_int8_weight_only

        return apply_int8_weight_only(model, self)
