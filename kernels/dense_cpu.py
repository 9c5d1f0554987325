"""Dense 16/32-bit Linear on CPU with the weight prepacked once for oneDNN.

`F.linear` on CPU hands oneDNN a plain row-major weight, which it re-lays out on every call; at
decode sizes that costs more than the matmul. Packing once at load time was measured 1.3-3.6x
faster at this model's shapes, with bit-identical results (kernels/README.md).
"""

from __future__ import annotations

import torch
from torch import nn

from . import native
from .dispatch import record_backend

# The blocked layout oneDNN picks depends on this batch-size hint; 8 was as fast as the best
# hint from M=1 to M=32 in bf16 and fp32.
PACK_BATCH_HINT = 8


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


class PackedLinear(nn.Module):
    """Inference-only: the packed weight is an opaque oneDNN tensor, not a saveable buffer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if not can_pack(weight):
            raise ValueError(f"cannot prepack a {weight.dtype} weight on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        self.bias = None if bias is None else bias.detach().clone()
        self.packed_bytes = weight.numel() * weight.element_size()
        # Our own bf16 GEMM's copy (`with_native_gemm`), for decode batches.
        self.native_packed: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def with_native_gemm(self, weight: torch.Tensor) -> int:
        """Also serve decode rows from our own GEMM's copy of `weight` (the one this module was
        packed from): bf16 at 1-32 rows where this CPU has AVX-512 BF16, fp32 at 1-4 rows,
        where the native kernels load; returns the copy's bytes (0 where it does not apply).
        The engine does it for the lm_head: read whole by every decode step, it streamed at
        ~20 GB/s (bf16) and ~11 GB/s (fp32) through oneDNN's copy (kernels/README.md)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight {tuple(weight.shape)} is not this module's")
        kernels = native.kernels()
        if kernels is None:
            return 0
        if weight.dtype == torch.bfloat16 and kernels.bf16_gemm_max_rows > 0:
            self.native_packed = kernels.bf16_pack(weight)
        elif weight.dtype == torch.float32:
            self.native_packed = kernels.f32_pack(weight)
        else:
            return 0
        return self.native_packed.numel() * self.native_packed.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_packed is not None:
            if native.bf16_gemm_supported(x, self.in_features):
                record_backend("dense", "cpu-native-bf16-gemm")
                return native.kernels().bf16_gemm(
                    x, self.native_packed, self.out_features, self.bias
                )
            if native.f32_gemm_supported(x, self.in_features):
                record_backend("dense", "cpu-native-f32-gemm")
                return native.kernels().f32_gemm(
                    x, self.native_packed, self.out_features, self.bias
                )
        record_backend("dense", "cpu-onednn-packed")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def fuse_dense(linears: list[nn.Module]) -> nn.Module | None:
    """One PackedLinear computing several plain Linears over the same input (outputs concatenated);
    None when they are not all plain packable Linears (e.g. compressed modules)."""
    if not all(type(m) is nn.Linear for m in linears):
        return None
    weights = [m.weight for m in linears]
    if not all(can_pack(w) and w.dtype == weights[0].dtype for w in weights):
        return None
    biases = [m.bias for m in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    return PackedLinear(torch.cat([w.detach() for w in weights]), bias)
