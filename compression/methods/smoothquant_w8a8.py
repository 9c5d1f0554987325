"""`smoothquant-w8a8`: SmoothQuant, activation outliers folded into the weights, then W8A8."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from ..spec_base import CalibrationSpec, Engine, SpecBase

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport

SmoothTarget = Literal["qkv", "o", "gate_up", "down"]


class SmoothQuantSpec(SpecBase):
    """SmoothQuant W8A8: activation outliers moved into the weights by a per-channel scale
    s = max|X|^alpha / max|W|^(1-alpha), folded into the previous op; int8 weights per channel,
    int8 activations per token (dynamic). alpha="auto" picks it per input group from a grid,
    for the W8A8 output error on calibration tokens."""

    method: Literal["smoothquant-w8a8"]
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = 0.5
    # Which input groups take a folded scale (qkv <- input norm, o <- v_proj, gate_up <-
    # post-attention norm, down <- up_proj); the others are quantized unsmoothed.
    smooth: list[SmoothTarget] = Field(default_factory=lambda: ["qkv", "o", "gate_up", "down"])
    include_embeddings: bool = True
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def apply(self, model: nn.Module) -> MethodReport:
        from ..smoothquant import apply_smoothquant

        return apply_smoothquant(model, self)

    def runs_on(self, engine: Engine) -> bool:
        if engine == "vllm":  # vLLM has W8A8 Linear kernels but no int8 embedding
            return not self.include_embeddings
        return super().runs_on(engine)
