"""W8A8 (SmoothQuant-style): int8 per-channel weights, int8 per-token dynamic activations.

The smoothing factors are folded into the previous layer by the compression code; this module
only sees the already-smoothed int8 weight and its per-output-channel scale.

Dispatch (`select_w8a8_backend`): Triton on CUDA (int8 tensor cores); on CPU `torch._int_mm`
(oneDNN, int8 dot products) where its sums are exact; the reference (exact int32 products via
fp32 chunks) elsewhere. Activations are quantized per token in torch before the matmul on every
path.

Every path is exact in its int32 sums. oneDNN's int8 GEMMs are not on CPUs without VNNI (their
u8 x s8 pair sums saturate at 16 bits: outputs ~7% off on AMD Zen 2), so there
(`cpu_paths.int8_gemms_exact` probes it once) a packed module serves every row count from our own
GEMM, whose AVX2 build computes the same exact sums, and keeps the plain weight for the exact
reference when our kernels do not serve (more than one compute thread, no compiler).

A serving engine on CPU calls `W8A8Linear.pack_for_cpu()` once: the weight moves into oneDNN's
blocked int8 layout (`cpu_paths.onednn_int8_matmul`: 1.7-4.9x `_int_mm` at 8-32 rows on large
weights; on small ones the per-token quantization's fixed cost dominates, kernels/README.md) and
the plain copy is dropped, as the dense weights are. Where the native kernels load
(`native.py`), the per-token quantization before that GEMM and the rescale after it are one call
each (`cpu_w8a8.cpp`, identical codes), not ~12 torch ops per projection; and at 1-32 rows our
own int8 GEMM in the same file (identical outputs) reads its own copy of the weight instead.
"""

from __future__ import annotations

import logging
from typing import Self

import torch

from . import cpu_paths, native
from .base import CompressedLinear
from .decode_step import NativeProjection, ProjectKind
from .dispatch import record_backend
from .reference import (
    int8_int8_matmul_reference,
    quantize_per_token_int8,
)
from .triton_support import TRITON_DTYPES, triton_runs_on

log = logging.getLogger(__name__)


def select_w8a8_backend(x: torch.Tensor) -> str:
    if triton_runs_on(x) and x.dtype in TRITON_DTYPES:
        return "triton"
    if cpu_paths.int_mm_supported(x):
        return "cpu-int-mm"
    return "reference"


def w8a8_matmul(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float -> per-token int8, @ int8 qweight [N, K].T -> int32, scaled -> x.dtype."""
    backend = select_w8a8_backend(x)
    record_backend("w8a8", backend)
    xq, x_scale = quantize_per_token_int8(x)
    if backend == "triton":
        from . import triton_int8

        return triton_int8.w8a8_matmul(xq, x_scale, qweight, weight_scale, x.dtype)
    if backend == "cpu-int-mm":
        acc = cpu_paths.int_mm(xq, qweight)
    else:
        acc = int8_int8_matmul_reference(xq, qweight)
    return (acc.float() * x_scale[:, None] * weight_scale.float()[None, :]).to(x.dtype)


class W8A8Linear(CompressedLinear):
    """nn.Linear replacement: int8 x int8 -> int32 matmul with per-token x per-channel scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        has_bias: bool,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocates empty buffers; use `from_quantized` (or `from_meta` + `load_state_dict`)."""
        super().__init__(in_features, out_features, has_bias, compute_dtype, device)
        n, k = out_features, in_features
        self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
        # fp32: the int32 accumulator is rescaled in fp32 before the cast to the compute dtype.
        self.register_buffer("weight_scale", torch.empty(n, dtype=torch.float32, device=device))

    @classmethod
    def from_quantized(
        cls,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> Self:
        if qweight.dim() != 2 or qweight.dtype != torch.int8:
            raise ValueError(
                f"qweight must be int8 [N, K], got {qweight.dtype} {tuple(qweight.shape)}"
            )
        n, k = qweight.shape
        if tuple(weight_scale.shape) != (n,):
            raise ValueError(
                f"weight_scale must have shape ({n},), got {tuple(weight_scale.shape)}"
            )
        module = cls(k, n, bias is not None, compute_dtype, qweight.device)
        with torch.no_grad():
            module.qweight.copy_(qweight)
            module.weight_scale.copy_(weight_scale.detach())
            module._set_bias(bias)
        return module

    cpu_pack: tuple[torch.Tensor, torch.Tensor] | None = None
    # Our own GEMM's copy of the weight (its own layout), where the native kernels load.
    cpu_native_pack: torch.Tensor | None = None

    def pack_for_cpu(self) -> int:
        """On CPU, serve from oneDNN's int8 layout from now on (and, where the native kernels
        load, from our own GEMM's copy at 1-32 rows); the module can no longer be saved or
        moved. Where oneDNN's int8 sums are not exact, our GEMM's copy serves every row count
        and the plain weight stays for the exact reference. Returns the bytes of the weight
        copies held for CPU serving: 0 off CPU (nothing to pack) and where this torch has no
        oneDNN int8 kernels (the module keeps `torch._int_mm`, and says so)."""
        if self.qweight.device.type != "cpu":
            return 0
        if not cpu_paths.int8_gemms_exact():
            return self._pack_native_only()
        if not cpu_paths.onednn_int8_supported():
            log.warning("W8A8 %dx%d: no oneDNN int8 kernels in this torch, staying on _int_mm",
                        self.out_features, self.in_features)  # fmt: skip
            return 0
        if self.cpu_pack is None:
            self.cpu_pack = cpu_paths.onednn_int8_prepack(self.qweight)
            kernels = native.kernels()
            if kernels is not None:
                # A second int8 copy: decode steps at 1-32 rows ran 1.1-1.5x faster on it than
                # on oneDNN's (kernels/README.md), which stays for larger batches and prompts.
                self.cpu_native_pack = kernels.w8a8_pack(self.qweight)
            self.qweight = torch.empty(0, dtype=torch.int8)
        own = 0 if self.cpu_native_pack is None else self.cpu_native_pack.numel()
        return self.out_features * self.in_features + own

    def _pack_native_only(self) -> int:
        """Where oneDNN's int8 GEMM saturates: our GEMM's copy, for every row count."""
        kernels = native.kernels()
        if kernels is None:
            log.warning("W8A8 %dx%d: no exact int8 GEMM on this CPU, the fp32-chunk reference "
                        "runs", self.out_features, self.in_features)  # fmt: skip
            return 0
        if self.cpu_native_pack is None:
            self.cpu_native_pack = kernels.w8a8_pack(self.qweight)
        return self.cpu_native_pack.numel()

    def native_projection(self) -> NativeProjection | None:
        kernels = native.kernels()
        if self.cpu_native_pack is None or self.bias is not None or kernels is None:
            return None
        if self.in_features > kernels.w8a8_gemm_max_k:
            return None
        # Beside oneDNN's copy, ours serves only decode batches up to the GEMM's rows.
        max_rows = None if self.cpu_pack is None else kernels.w8a8_gemm_max_rows
        return NativeProjection(
            ProjectKind.W8A8_GEMM,
            self.compute_dtype,
            self.cpu_native_pack,
            self.weight_scale,
            self.out_features,
            self.in_features,
            kernels,
            max_rows,
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        own = self.cpu_native_pack
        if own is not None and native.w8a8_gemm_supported(
            x, self.in_features, any_rows=self.cpu_pack is None
        ):
            record_backend("w8a8", "cpu-native-gemm")
            return native.kernels().w8a8_gemm(x, own, self.weight_scale)
        if self.cpu_pack is None:
            return w8a8_matmul(x, self.qweight, self.weight_scale)
        packed, zero_points = self.cpu_pack
        if native.quantize_rows_supported(x):
            # The same codes and scales as torch's ops below, in one call each side of the GEMM.
            record_backend("w8a8", "cpu-onednn-packed-native-quantize")
            kernels = native.kernels()
            codes, x_scale = kernels.quantize_rows_u8(x)
            acc = cpu_paths.onednn_int8_gemm(codes, packed, self.weight_scale, zero_points)
            return kernels.rescale_rows(acc, x_scale, x.dtype)
        record_backend("w8a8", "cpu-onednn-packed")
        return cpu_paths.onednn_int8_matmul(x, packed, self.weight_scale, zero_points)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, w8a8, "
            f"bias={self.bias is not None}"
        )
