"""2:4 semi-structured sparse weights along K: the kept half plus 2-bit position metadata.

Layout (see slimserve.kernels.packing): values [N, K/2] in the compute dtype, meta uint8
[N, ceil(K/8)] with one nibble (i0 | i1 << 2) per group of 4.

Dispatch (`select_sparse24_backend`): on CUDA, torch's semi-structured sparse tensor-core matmul
when `SparseLinear.enable_semi_structured()` prepared it (Ampere or newer, fp16/bf16), else the
Triton kernel, which reads only the compressed form; on CPU there is no sparse kernel in torch,
so the reference expands the weight and runs the dense matmul (slower than dense: 2:4 is a GPU
format here).
"""

from __future__ import annotations

from typing import Self

import torch
import torch.nn.functional as F

from .base import CompressedLinear
from .dispatch import record_backend
from .packing import compress_24, decompress_24
from .reference import sparse24_matmul_reference
from .triton_support import TRITON_DTYPES, triton_runs_on

# torch's CUTLASS semi-structured kernels need compute capability 8.0+ and these shape multiples.
SEMI_STRUCTURED_MIN_CAPABILITY = (8, 0)
SEMI_STRUCTURED_N_MULTIPLE = 64
SEMI_STRUCTURED_K_MULTIPLE = 64


def semi_structured_supported(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return (
        weight.is_cuda
        and weight.dtype in TRITON_DTYPES
        and torch.cuda.get_device_capability(weight.device) >= SEMI_STRUCTURED_MIN_CAPABILITY
        and n % SEMI_STRUCTURED_N_MULTIPLE == 0
        and k % SEMI_STRUCTURED_K_MULTIPLE == 0
    )


def select_sparse24_backend(x: torch.Tensor, semi_structured: torch.Tensor | None) -> str:
    if semi_structured is not None and x.is_cuda and x.dtype == semi_structured.dtype:
        return "cuda-semi-structured"
    if triton_runs_on(x) and x.dtype in TRITON_DTYPES:
        return "triton"
    return "reference"


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    semi_structured: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ decompress(values [N, K/2], meta).T -> [M, N] in x.dtype. `semi_structured` is
    torch's sparse tensor-core form of the same weight, if prepared."""
    backend = select_sparse24_backend(x, semi_structured)
    record_backend("sparse24", backend)
    if backend == "cuda-semi-structured":
        return F.linear(x, semi_structured)
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
        # torch's semi-structured tensor (a tensor subclass, CUDA only); opt-in, never saved.
        self.semi_structured: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._drop_semi())

    def _drop_semi(self) -> None:
        self.semi_structured = None  # stale after new weights; enable_semi_structured() again

    def enable_semi_structured(self) -> bool:
        """Prepare torch's sparse tensor-core form of the weight (CUDA, Ampere+); returns whether
        it applies. A baseline next to the Triton kernel; not exercised without such a GPU."""
        dense = decompress_24(self.values, self.meta_bits, self.in_features)
        if not semi_structured_supported(dense):
            self.semi_structured = None
            return False
        self.semi_structured = torch.sparse.to_sparse_semi_structured(dense)
        return True

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
        return sparse24_matmul(x, self.values, self.meta_bits, self.semi_structured)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse, "
            f"bias={self.bias is not None}"
        )
