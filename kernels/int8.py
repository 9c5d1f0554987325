"""W8A16: int8 weights with absmax scales, 16-bit activations.

A serving engine on CPU calls `Int8Linear.pack_for_cpu()` once: where the avx512 build of our
kernels loads, the weight moves into our W8A16 GEMM's layout (`cpu_w8a16_gemm.cpp`), which then
serves every row count, decode and prompt alike (it beat every other CPU path at 1-512 rows on
the default model's shapes, kernels/README.md); at the avx2 level with fp32 activations, into
the fp32 GEMM's panels (`cpu_f32_gemm.cpp`, each weight widened in registers: exact fp32 sums,
1.0-1.7x the GEMV at one row, level with it at 4-32, and every prompt size). The plain weight is
dropped (a tied embedding keeps its own reference for lookups).

Unpacked, the dispatch (`select_w8a16_backend`): the Triton kernel on CUDA; on CPU our own GEMV
(`native.py`, int16 activation codes x int8 weights: VPDPBUSD on avx512, VPMADDWD on avx2) up to
the build's `w8a16_max_rows`, then `torch._weight_int8pack_mm` (reads the int8 weight directly)
for small batches, and a de-quantize + dense matmul above `cpu_paths.W8A16_INT8PACK_MAX_M` rows;
the reference (de-quantize, dense matmul) elsewhere.
"""

from __future__ import annotations

from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_paths, native
from .artifact import dtype_from_name, dtype_name, require_keys
from .base import CompressedLinear
from .decode_step import NativeProjection, ProjectKind
from .dispatch import record_backend
from .triton_support import TRITON_DTYPES, triton_runs_on


def quantize_int8_absmax(
    weight: torch.Tensor, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in [-127, 127]; returns (int8 weight [N, K], fp32 scale [N])."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1) if per_channel else w.abs().amax().expand(w.shape[0])
    scale = (absmax / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.contiguous()


def int8_weight_matmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    weight = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return x @ weight.t()


# The GEMV rounds each activation row to int16 codes (a step of absmax / 32767): finer than bf16 /
# fp16 inputs, and for fp32 inputs ~250x finer than the int8 weights' own step (absmax / 127), so
# it adds well under 1% to the error the weight quantization already makes.
NATIVE_W8A16_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select_w8a16_backend(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> str:
    """Triton on CUDA; on CPU our GEMV for a few 16-bit rows, int8pack while the batch is small,
    else de-quantize + dense matmul."""
    if triton_runs_on(x) and x.dtype in TRITON_DTYPES:
        return "triton"
    if x.dtype in NATIVE_W8A16_DTYPES and native.w8a16_gemv_supported(x, qweight, scale):
        return "cpu-native-gemv"
    k = qweight.shape[1]
    if cpu_paths.int8pack_supported(x, k) and x.shape[0] <= cpu_paths.W8A16_INT8PACK_MAX_M:
        return "cpu-int8pack"
    if x.device.type == "cpu":
        return "cpu-dequant-matmul"
    return "reference"


def int8_weight_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (16/32-bit) @ dequant(qweight [N, K], scale [N]).T -> [M, N] in x.dtype."""
    backend = select_w8a16_backend(x, qweight, scale)
    record_backend("w8a16", backend)
    if backend == "triton":
        from . import triton_int8

        return triton_int8.w8a16_matmul(x.contiguous(), qweight, scale)
    if backend == "cpu-native-gemv":
        return native.kernels().w8a16_gemv(x, qweight, scale)
    if backend == "cpu-int8pack":
        return cpu_paths.int8pack_matmul(x, qweight, scale)
    if backend == "cpu-dequant-matmul":
        return cpu_paths.int8_dequant_matmul(x, qweight, scale)
    return int8_weight_matmul_reference(x, qweight, scale)


class Int8Linear(CompressedLinear):
    """Drop-in for nn.Linear with int8 weights; state saves/loads as int8 + scale."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> None:
        out_features, in_features = qweight.shape
        super().__init__(in_features, out_features, bias is not None, compute_dtype, qweight.device)
        self.register_buffer("qweight", qweight)
        # Kept in the activation dtype so the fast path needs no cast per call.
        self.register_buffer("scale", scale.to(compute_dtype))
        with torch.no_grad():
            self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True) -> Int8Linear:
        qweight, scale = quantize_int8_absmax(linear.weight, per_channel)
        return cls(qweight, scale, linear.bias, linear.weight.dtype)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        require_keys(cls.__name__, meta, ("in_features", "out_features", "has_bias", "dtype"))
        n, k = int(meta["out_features"]), int(meta["in_features"])
        dtype = dtype_from_name(meta["dtype"])
        qweight = torch.empty(n, k, dtype=torch.int8)
        bias = torch.empty(n, dtype=dtype) if meta["has_bias"] else None
        return cls(qweight, torch.empty(n, dtype=dtype), bias, dtype)

    # Our W8A16 GEMM's copy of the weight and its scales in fp32, once packed for CPU serving:
    # the avx512 GEMM's layout ("cpu-native-gemm") or, at the avx2 level, the fp32 GEMM's panels
    # ("cpu-native-panels").
    cpu_native_pack: torch.Tensor | None = None
    cpu_native_backend: str | None = None
    native_scale: torch.Tensor | None = None
    native_kernels: native.NativeKernels | None = None  # the build that packed it reads it

    def pack_for_cpu(self) -> int:
        """Where our kernels load, serve every row count from one packed copy from now on and
        drop the plain weight: the avx512 build's W8A16 GEMM, or at the avx2 level (fp32
        activations) the fp32 GEMM's panels with each weight widened in registers; the module
        can no longer be saved or moved. Returns the copy's bytes (0 where nothing packs: off
        CPU, K too long, the avx2 level in 16-bit)."""
        if self.cpu_native_pack is None:
            kernels = native.w8a16_gemm_packs(self.qweight)
            if kernels is not None:
                self.cpu_native_backend = "cpu-native-gemm"
                self.cpu_native_pack = kernels.w8a8_pack(self.qweight)  # one layout for both
            else:
                kernels = native.w8a16_panels_packs(self.qweight, self.compute_dtype)
                if kernels is None:
                    return 0
                self.cpu_native_backend = "cpu-native-panels"
                self.cpu_native_pack = kernels.w8a16_panels_pack(self.qweight)
            self.native_kernels = kernels
            self.native_scale = self.scale.float().contiguous()
            self.qweight = torch.empty(0, dtype=torch.int8)
        return self.cpu_native_pack.numel()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_native_pack is None:
            return int8_weight_matmul(x, self.qweight, self.scale)
        record_backend("w8a16", self.cpu_native_backend)
        rows = x if x.stride(1) == 1 else x.contiguous()
        if self.cpu_native_backend == "cpu-native-panels":
            return self.native_kernels.w8a16_panels_gemm(
                rows, self.cpu_native_pack, self.native_scale
            )
        return self.native_kernels.w8a16_gemm(rows, self.cpu_native_pack, self.native_scale)

    def native_projection(self) -> NativeProjection | None:
        if self.cpu_native_pack is None or self.bias is not None:
            return None
        panels = self.cpu_native_backend == "cpu-native-panels"
        return NativeProjection(
            ProjectKind.W8A16_PANELS if panels else ProjectKind.W8A16_GEMM,
            self.compute_dtype,
            self.cpu_native_pack,
            self.native_scale,
            self.out_features,
            self.in_features,
            self.native_kernels,
        )

    def extra_repr(self) -> str:
        packed = (
            f", packed for {self.cpu_native_backend}" if self.cpu_native_pack is not None else ""
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{packed}"


class Int8Embedding(nn.Module):
    """Embedding lookup from an int8 table; shares storage with a tied Int8Linear lm_head."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    def meta(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "dtype": dtype_name(self.scale.dtype),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        require_keys(cls.__name__, meta, ("num_embeddings", "embedding_dim", "dtype"))
        rows, dim = int(meta["num_embeddings"]), int(meta["embedding_dim"])
        dtype = dtype_from_name(meta["dtype"])
        return cls(torch.empty(rows, dim, dtype=torch.int8), torch.empty(rows, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight)
        return rows.to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"
