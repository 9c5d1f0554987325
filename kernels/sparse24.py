"""2:4 semi-structured sparse weights along K: the kept half plus 2-bit position metadata.

Layout (see slimserve.kernels.packing): values [N, K/2] in the compute dtype, meta uint8
[N, ceil(K/8)] with one nibble (i0 | i1 << 2) per group of 4.

Dispatch (`select_sparse24_backend`): on CUDA the Triton kernel, which reads only the compressed
form and multiplies densely in registers; on CPU there is no sparse kernel in torch,
so the reference expands the weight and runs the dense matmul (slower than dense: 2:4 is a GPU
format here).
"""

from __future__ import annotations

from typing import Self

import torch

from .base import CompressedLinear
from .dispatch import record_backend
from .packing import compress_24
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

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> Self:
        values, meta = compress_24(weight.detach())
        n, k = weight.shape
        module = cls(k, n, bias is not None, compute_dtype, weight.device)
        with torch.no_grad():
            module.values.copy_(values)
            module.meta_bits.copy_(meta)
            module._set_bias(bias)
        return module

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_matmul(x, self.values, self.meta_bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse, "
            f"bias={self.bias is not None}"
        )
