"""2:4 semi-structured sparse weights along K: the kept half plus 2-bit position metadata.

Layout (see slimserve.kernels.packing): values [N, K/2] in the compute dtype, meta uint8
[N, ceil(K/8)] with one nibble (i0 | i1 << 2) per group of 4.

A serving engine on CPU calls `SparseLinear.pack_for_cpu()` once: where our kernels load
(fp32 in either build, bf16 with AVX-512 BF16), the weight moves into our 2:4 GEMM's block layout
(`cpu_sparse24.cpp`), which reads only the kept half and its positions at every row count, and
the plain buffers are dropped. fp32 kept values that are all bf16 numbers (a bf16 checkpoint's)
are stored as bf16 there: half the bytes, the same results bit for bit.

Unpacked, the dispatch (`select_sparse24_backend`): on CUDA the Triton kernel, which reads only
the compressed form and multiplies densely in registers; elsewhere the reference expands the
weight and runs the dense matmul (slower than dense; torch has no CPU 2:4 kernel).
"""

from __future__ import annotations

from typing import Self

import torch

from . import native
from .base import CompressedLinear
from .decode_step import NativeProjection, ProjectKind
from .dispatch import record_backend
from .packing import compress_24, pack_24_blocks
from .reference import sparse24_matmul_reference
from .triton_support import TRITON_DTYPES, triton_runs_on


def select_sparse24_backend(x: torch.Tensor) -> str:
    if triton_runs_on(x) and x.dtype in TRITON_DTYPES:
        return "triton"
    return "reference"


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ decompress(values [N, K/2], meta).T -> [M, N] in x.dtype."""
    backend = select_sparse24_backend(x)
    record_backend("sparse24", backend)
    if backend == "triton":
        from . import triton_sparse24

        return triton_sparse24.sparse24_matmul(x.contiguous(), values, meta)
    return sparse24_matmul_reference(x, values, meta)


class SparseLinear(CompressedLinear):
    """nn.Linear replacement holding a 2:4 sparse weight in compressed form."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        has_bias: bool,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocates empty buffers; use `from_dense` (or `from_meta` + `load_state_dict`)."""
        super().__init__(in_features, out_features, has_bias, compute_dtype, device)
        if in_features % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {in_features}")
        n, k = out_features, in_features
        self.register_buffer("values", torch.empty(n, k // 2, dtype=compute_dtype, device=device))
        self.register_buffer(
            "meta_bits", torch.empty(n, (k + 7) // 8, dtype=torch.uint8, device=device)
        )
        self.native_kernels: native.NativeKernels | None = None
        self.cpu_values: torch.Tensor | None = None
        self.cpu_codes: torch.Tensor | None = None

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> Self:
        values, meta = compress_24(weight.detach())
        return cls.from_compressed(values, meta, bias, compute_dtype)

    @classmethod
    def from_compressed(
        cls,
        values: torch.Tensor,
        meta: torch.Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> Self:
        """From kept values [N, K/2] and position codes [N, ceil(K/8)] (`compress_24`'s)."""
        n, k = values.shape[0], 2 * values.shape[1]
        module = cls(k, n, bias is not None, compute_dtype, values.device)
        if tuple(meta.shape) != tuple(module.meta_bits.shape):
            raise ValueError(f"meta {tuple(meta.shape)} does not fit values {tuple(values.shape)}")
        with torch.no_grad():
            module.values.copy_(values)
            module.meta_bits.copy_(meta)
            module._set_bias(bias)
        return module

    def pack_for_cpu(self) -> int:
        """Where our kernels take this dtype: serve every row count from our 2:4 GEMM's copy
        from now on and drop the plain buffers; the module can no longer be saved or moved.
        Returns the copy's bytes (0 where nothing packs: off CPU, fp16, bf16 without AVX-512
        BF16)."""
        if self.cpu_values is None:
            kernels = native.sparse24_packs(self.values)
            if kernels is None:
                return 0
            block = native.SPARSE24_BLOCKS[self.values.dtype]
            self.cpu_values, self.cpu_codes = pack_24_blocks(
                self.values, self.meta_bits, self.in_features, block
            )
            if native.is_bf16_exact(self.cpu_values):  # a bf16 checkpoint's, served in fp32
                self.cpu_values = native.bf16_high_halves(self.cpu_values)
            elif self.cpu_values.dtype == torch.bfloat16:  # bf16 rows: the coded layout
                coded = kernels.sparse24_coded_pack(
                    self.cpu_values, self.cpu_codes, self.out_features, self.in_features
                )
                if coded is not None:
                    self.cpu_values, self.cpu_codes = coded, None
            self.native_kernels = kernels
            self.values = torch.empty(0, dtype=self.values.dtype)
            self.meta_bits = torch.empty(0, dtype=torch.uint8)
        parts = (self.cpu_values, self.cpu_codes)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def _bf16_values(self) -> bool:
        """fp32 rows on kept values stored as bf16 (all bf16 numbers): half their bytes."""
        return self.compute_dtype == torch.float32 and self.cpu_values.dtype == torch.bfloat16

    @property
    def _coded(self) -> bool:
        """bf16 rows on the coded layout (values and position codes in one uint8 stream)."""
        return self.cpu_values.dtype == torch.uint8

    @property
    def _backend(self) -> str:
        if self._coded:
            return "cpu-native-sparse24-coded"
        return "cpu-native-sparse24-bf16-values" if self._bf16_values else "cpu-native-sparse24"

    @property
    def _project_kind(self) -> ProjectKind:
        if self._coded:
            return ProjectKind.SPARSE24_CODED
        return ProjectKind.SPARSE24_BF16_VALUES if self._bf16_values else ProjectKind.SPARSE24

    def native_projection(self) -> NativeProjection | None:
        if self.cpu_values is None or self.bias is not None:
            return None
        return NativeProjection(
            self._project_kind,
            self.compute_dtype,
            self.cpu_values,
            self.cpu_codes,
            self.out_features,
            self.in_features,
            self.native_kernels,
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_values is None:
            return sparse24_matmul(x, self.values, self.meta_bits)
        record_backend("sparse24", self._backend)
        rows = x if x.stride(1) == 1 else x.contiguous()
        return self.native_kernels.sparse24_gemm(
            rows, self.cpu_values, self.cpu_codes, self.out_features
        )

    def extra_repr(self) -> str:
        packed = f", packed for {self._backend}" if self.cpu_values is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse"
            f"{packed}, bias={self.bias is not None}"
        )
