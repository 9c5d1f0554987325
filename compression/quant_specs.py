"""Specs of the quantization methods (one pydantic model each, keyed by `method`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from .spec_base import CalibrationSpec, SpecBase


def _power_of_two(value: int, field: str) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{field} must be a positive power of two, got {value}")
    return value


def _check_group_divides(spec: SpecBase, group_size: int, model_config: Any) -> None:
    """Every targeted Linear's in-features must be a multiple of the group size."""
    # Imported here: arch needs torch, and the specs are also read by the torch-free gateway.
    from .arch import linear_shapes, skipped

    bad = sorted(
        {
            k
            for name, (_, k) in linear_shapes(model_config).items()
            if k % group_size and not skipped(name, spec.skip)
        }
    )
    if bad:
        good = [g for g in (128, 64, 32) if all(k % g == 0 for k in bad)]
        hint = f"; {good[0]} divides them" if good else ""
        raise ValueError(
            f"group_size {group_size} does not divide the in-features {bad} of this model{hint}"
        )


class Int8WeightOnlySpec(SpecBase):
    """int8 weights with absmax scales, 16-bit activations (W8A16)."""

    method: Literal["int8-weight-only"]
    granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    # The tied embedding / lm_head matrix is a fifth of this model's bytes; quantize it too.
    include_embeddings: bool = True


class LLMInt8Spec(SpecBase):
    """LLM.int8(): input features whose calibration magnitude reaches `threshold` stay 16-bit;
    the rest is int8 (vector-wise W8A8 as in the paper, or W8A16 with activations="16bit")."""

    method: Literal["llm-int8"]
    threshold: float = Field(6.0, gt=0)
    activations: Literal["int8", "16bit"] = "int8"
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)


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
        return _power_of_two(value, "group_size")

    def check_model(self, model_config: Any) -> None:
        if self.bits < 8:
            _check_group_divides(self, self.group_size, model_config)


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


class _GroupWiseSpec(SpecBase):
    bits: Literal[4, 3] = 4
    # 64, not the usual 128: SmolLM2's hidden size 576 is not a multiple of 128.
    group_size: int = 64
    # "integer": the usual GPTQ / AWQ checkpoint layout. "float": the grid starts exactly at
    # each group's minimum (lower error; the slimserve kernels read it, exporters may not).
    zero_point: Literal["integer", "float"] = "integer"

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        return _power_of_two(value, "group_size")

    def check_model(self, model_config: Any) -> None:
        _check_group_divides(self, self.group_size, model_config)


class RTNSpec(_GroupWiseSpec):
    """Group-wise asymmetric weight-only int4 / int3 by round-to-nearest."""

    method: Literal["rtn"]


class GPTQSpec(_GroupWiseSpec):
    """GPTQ: column-by-column quantization with Hessian-based error compensation."""

    method: Literal["gptq"]
    damp: float = Field(0.01, gt=0.0, le=1.0, description="fraction of mean diag(H) added")
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy batch update")
    # On by default: with groups fixed up front it costs nothing at run time, and it lowered
    # the layer output error by 10-50% on SmolLM2.
    act_order: bool = Field(True, description="columns by decreasing Hessian diagonal")
    # Each group's range searched for the output error (as AWQ clips) instead of min-max.
    # Off by default: on SmolLM2 it helped at 3 bits and hurt at 4 (the search ignores the
    # error compensation that follows).
    clip: bool = False
    clip_grid: int = Field(20, ge=2, le=200)
    max_shrink: float = Field(0.5, gt=0.0, lt=1.0, description="smallest clip ratio is 1-this")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)


class AWQSpec(_GroupWiseSpec):
    """AWQ: per-input-channel scales s = mean|X|^a (a searched on a grid) protect salient
    weights; then a per-group clipping search."""

    method: Literal["awq"]
    grid: int = Field(20, ge=2, le=200, description="exponents tried in the scale search")
    clip: bool = True
    clip_grid: int = Field(20, ge=2, le=200)
    max_shrink: float = Field(0.5, gt=0.0, lt=1.0, description="smallest clip ratio is 1-this")
    fold: bool = Field(True, description="fold scales into the previous op when there is one")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)


QUANT_SPECS: tuple[type[SpecBase], ...] = (
    Int8WeightOnlySpec,
    LLMInt8Spec,
    GoboSpec,
    SmoothQuantSpec,
    RTNSpec,
    GPTQSpec,
    AWQSpec,
)
