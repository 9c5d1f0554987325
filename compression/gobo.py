"""GOBO (Zadeh et al., 2020): outlier weights kept apart.

Per Linear, weights further than `sigma` standard deviations from the layer's mean (the tail
the paper finds outside the layer's Gaussian) are stored exactly, in 16-bit, as a sparse list;
the remaining weights are quantized with a range no longer stretched by the tail. GOBO's own
inlier code is a per-layer dictionary of centroids; here the inliers go on the grids the
kernels read (int8 per channel, or group-wise 4 / 3 bits). Outlier positions get the code of
exact zero, so inner + sparse reproduces them bit for bit.
"""

from __future__ import annotations

import time
from typing import Any, Self

import torch
from torch import nn
from tqdm.auto import tqdm

from slimserve.kernels import Int8Linear, quantize_int8_absmax
from slimserve.kernels.artifact import dtype_from_name, dtype_name, require_keys

from .arch import set_submodule, target_linears
from .composite import inner_from_meta, inner_meta
from .grid import quantize_groups
from .lowbit import lowbit_linear
from .methods.gobo import GoboSpec
from .report import MethodReport, resident_weight_bytes


def outlier_mask(weight: torch.Tensor, sigma: float) -> torch.Tensor:
    w = weight.detach().float()
    return (w - w.mean()).abs() > sigma * w.std()


class OutlierSparseLinear(nn.Module):
    """y = inner(x) + x Sᵀ with S sparse ([N, K], `values` at (`rows`, `cols`), 16-bit)."""

    def __init__(
        self, inner: nn.Module, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
    ) -> None:
        super().__init__()
        self.inner = inner
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        # int32 indices: half the bytes of int64 for the same positions.
        self.register_buffer("rows", rows.to(torch.int32))
        self.register_buffer("cols", cols.to(torch.int32))
        self.register_buffer("values", values.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        shape = out.shape
        flat_x = x.reshape(-1, self.in_features)
        contrib = flat_x.index_select(1, self.cols) * self.values.to(flat_x.dtype)
        flat_out = out.reshape(-1, self.out_features)
        flat_out = flat_out.index_add(1, self.rows, contrib.to(flat_out.dtype))
        return flat_out.reshape(shape)

    def meta(self) -> dict[str, Any]:
        return {
            "inner": inner_meta(self.inner),
            "nnz": int(self.values.numel()),
            "dtype": dtype_name(self.values.dtype),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        require_keys(cls.__name__, meta, ("inner", "nnz", "dtype"))
        nnz = int(meta["nnz"])
        index = torch.zeros(nnz, dtype=torch.int32)
        values = torch.empty(nnz, dtype=dtype_from_name(meta["dtype"]))
        return cls(inner_from_meta(meta["inner"]), index, index.clone(), values)

    def extra_repr(self) -> str:
        return f"outliers={self.values.numel()}"


def gobo_linear(linear: nn.Linear, spec: GoboSpec) -> tuple[nn.Module, int]:
    """The replacement module and its number of outlier weights."""
    weight = linear.weight.detach()
    dtype = weight.dtype
    mask = outlier_mask(weight, spec.sigma)
    inliers = weight.masked_fill(mask, 0)  # zero: exactly representable on every grid used
    if spec.bits == 8:
        qweight, scale = quantize_int8_absmax(inliers, per_channel=True)
        inner: nn.Module = Int8Linear(qweight, scale, linear.bias, dtype)
    else:
        quant = quantize_groups(inliers, spec.bits, spec.group_size)
        inner = lowbit_linear(quant, linear.bias, dtype)
    rows, cols = mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return inner, 0
    return OutlierSparseLinear(inner, rows, cols, weight[rows, cols]), int(rows.numel())


def apply_gobo(model: nn.Module, spec: GoboSpec) -> MethodReport:
    spec.check_model(model.config)  # a clear error before any work, not a kernel's
    started = time.perf_counter()
    before = resident_weight_bytes(model)
    targets = target_linears(model, spec.skip)
    outliers = 0
    weights = 0
    for name, linear in tqdm(targets, desc=f"gobo w{spec.bits}", unit="layer", disable=None):
        module, count = gobo_linear(linear, spec)
        outliers += count
        weights += linear.weight.numel()
        set_submodule(model, name, module)
    return MethodReport(
        method=spec.method,
        spec=spec.model_dump(),
        modules_replaced=len(targets),
        seconds=time.perf_counter() - started,
        bytes_before=before,
        bytes_after=resident_weight_bytes(model),
        detail={"outlier_weights": outliers, "outlier_fraction": outliers / max(weights, 1)},
    )
