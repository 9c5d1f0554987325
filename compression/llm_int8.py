"""LLM.int8() (Dettmers et al., 2022): mixed-precision decomposition.

Input features where activations reach `threshold` in magnitude (found on calibration data;
the paper finds them per batch at run time) go through a 16-bit matmul; all other features
through int8 (vector-wise: per-token activations x per-channel weights, W8A8Linear), or
int8 weights with 16-bit activations (Int8Linear) with activations="16bit".
"""

from __future__ import annotations

import time
from typing import Any, Literal, Self

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.kernels import Int8Linear, W8A8Linear, quantize_int8_absmax
from slimserve.kernels.artifact import dtype_from_name, dtype_name, require_keys

from .arch import InputGroup, set_submodule
from .calib_data import calibration_ids
from .composite import inner_from_meta, inner_meta
from .hooks import InputStats, input_stats
from .layerwise import run_layerwise
from .methods.llm_int8 import LLMInt8Spec
from .report import MethodReport, resident_weight_bytes


class MixedInt8Linear(nn.Module):
    """y = int8_part(x with outlier features zeroed) + x[..., outliers] @ W[:, outliers]ᵀ.

    The int8 part keeps the full width K (its weight is zero on the outlier columns), so the
    kernel shapes stay those of the original Linear; zeroing the outliers first keeps them out
    of the per-token activation scale.
    """

    def __init__(
        self, inner: nn.Module, outlier_index: torch.Tensor, outlier_weight: torch.Tensor
    ) -> None:
        super().__init__()
        self.inner = inner
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        self.register_buffer("outlier_index", outlier_index.to(torch.int64))
        self.register_buffer("outlier_weight", outlier_weight.detach().contiguous())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        outliers: torch.Tensor,
        activations: Literal["int8", "16bit"] = "int8",
    ) -> Self:
        weight = linear.weight.detach()
        index = outliers.nonzero().flatten()
        regular = weight.clone()
        regular[:, index] = 0
        qweight, scale = quantize_int8_absmax(regular, per_channel=True)
        dtype = weight.dtype
        if activations == "int8":
            inner: nn.Module = W8A8Linear.from_quantized(qweight, scale, linear.bias, dtype)
        else:
            inner = Int8Linear(qweight, scale, linear.bias, dtype)
        return cls(inner, index, weight[:, index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regular = x.index_fill(-1, self.outlier_index, 0)
        out = self.inner(regular)
        outlier_x = x.index_select(-1, self.outlier_index).to(self.outlier_weight.dtype)
        return out + F.linear(outlier_x, self.outlier_weight).to(out.dtype)

    def meta(self) -> dict[str, Any]:
        return {
            "inner": inner_meta(self.inner),
            "outliers": int(self.outlier_index.numel()),
            "dtype": dtype_name(self.outlier_weight.dtype),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        require_keys(cls.__name__, meta, ("inner", "outliers", "dtype"))
        inner = inner_from_meta(meta["inner"])
        count = int(meta["outliers"])
        weight = torch.empty(inner.out_features, count, dtype=dtype_from_name(meta["dtype"]))
        return cls(inner, torch.zeros(count, dtype=torch.int64), weight)

    def extra_repr(self) -> str:
        return f"outlier_features={self.outlier_index.numel()}"


def apply_llm_int8(
    model: nn.Module, spec: LLMInt8Spec, calibration: torch.Tensor | None = None
) -> MethodReport:
    """`calibration`: token ids [n, seq_len] to use instead of spec.calibration's text."""
    started = time.perf_counter()
    before = resident_weight_bytes(model)
    # The first windows (not spread): the calibration the README's quality table measured.
    ids = (
        calibration
        if calibration is not None
        else calibration_ids(model, spec.calibration, pick="first")
    )
    outliers_by_group: dict[str, list[int]] = {}
    replaced = 0

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        nonlocal replaced
        for group in groups:
            outliers = stats[group.name].absmax >= spec.threshold
            outliers_by_group.setdefault(group.name, []).append(int(outliers.sum()))
            for name, linear in group.linears:
                if outliers.any():
                    module = MixedInt8Linear.from_linear(linear, outliers, spec.activations)
                else:  # nothing to keep apart: the plain int8 module
                    module = MixedInt8Linear.from_linear(linear, outliers, spec.activations).inner
                set_submodule(model, name, module)
                replaced += 1

    run_layerwise(
        model,
        ids,
        input_stats(),
        process,
        skip=spec.skip,
        propagate="float",  # outliers of the float model's activations
        desc=f"llm-int8 t={spec.threshold}",
    )
    total = sum(sum(v) for v in outliers_by_group.values())
    return MethodReport(
        method=spec.method,
        spec=spec.model_dump(),
        modules_replaced=replaced,
        seconds=time.perf_counter() - started,
        bytes_before=before,
        bytes_after=resident_weight_bytes(model),
        detail={
            "calibration_tokens": int(ids.numel()),
            "outlier_features_total": total,
            "outlier_features_per_group": {g: sum(v) for g, v in outliers_by_group.items()},
            "max_outlier_features_in_a_layer": max(
                (max(v) for v in outliers_by_group.values()), default=0
            ),
        },
    )
