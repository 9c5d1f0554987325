"""Dense 16/32-bit Linear on CPU with the weight packed once at load time.

Our own GEMM's layout only, serving every row count, decode and prompt alike, on the kernels'
own threads (`cpu_threads.h`), where it is the faster path (kernels/README.md):
- bf16 where this CPU has AVX-512 BF16 (`cpu_bf16_gemm.cpp`): 1.1-3.5x oneDNN's prepacked bf16
  matmul per call at decode rows on one thread, level at 512 rows; a trained weight in the
  lossless coded layout (`cpu_bf16_coded.cpp`: 3/4 of the bytes, the same bits out);
- fp32 at the avx2 level (`cpu_f32_gemm.cpp`), where oneDNN's fp32 kernels are AVX2 code too:
  1.0-1.7x oneDNN's from 1 to 128 rows.

Elsewhere (fp32 at the avx512 level, bf16 without AVX-512 BF16): `F.linear` on CPU hands oneDNN
a plain row-major weight, which it re-lays out on every call; at decode sizes that costs more
than the matmul. Packing once for oneDNN was measured 1.3-3.6x faster at this model's shapes,
with bit-identical results. The fp32 lm_head may also keep our fp32 GEMM's copy for decode rows
(`with_native_gemm`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import native
from .decode_step import NativeProjection, ProjectKind
from .dispatch import record_backend

# The blocked layout oneDNN picks depends on this batch-size hint; 8 was as fast as the best
# hint from M=1 to M=32 in bf16 and fp32.
PACK_BATCH_HINT = 8


def _own_gemm(weight: torch.Tensor) -> native.NativeKernels | None:
    """Our kernels where their GEMM is this weight's only copy (see above), else None."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float32):
        return None
    kernels = native.kernels()
    if kernels is None:
        return None
    if weight.dtype == torch.bfloat16:
        return kernels if kernels.bf16_gemm_available else None
    return kernels if kernels.f32_gemm_only_copy else None


def _bf16_backend(packed: torch.Tensor) -> str:
    """Our bf16 GEMM's backend name, saying when it reads the coded layout."""
    if packed.dtype == torch.uint8:
        return "cpu-native-bf16-gemm-coded"
    return "cpu-native-bf16-gemm"


def _f32_backend(packed: torch.Tensor) -> str:
    """Our fp32 GEMM's backend name, saying when it reads the weight in bf16."""
    if packed.dtype == torch.bfloat16:
        return "cpu-native-f32-gemm-bf16-weights"
    return "cpu-native-f32-gemm"


def can_pack(weight: torch.Tensor) -> bool:
    if _own_gemm(weight) is not None:
        return True
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


class PackedLinear(nn.Module):
    """Inference-only: the packed weight is an opaque layout, not a saveable buffer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if not can_pack(weight):
            raise ValueError(f"cannot prepack a {weight.dtype} weight on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().clone()
        self.dtype = weight.dtype
        self._own = _own_gemm(weight)
        # Our own GEMM's copy: the only one where `_own_gemm` says so (any rows); else beside
        # oneDNN's, the fp32 lm_head's for decode rows (`with_native_gemm`). An fp32 copy is
        # kept in bf16 where its values are all bf16 numbers (`NativeKernels.f32_pack`).
        self.native_packed: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        if self._own is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        elif self.dtype == torch.bfloat16:
            self.native_packed = self._own.bf16_pack(weight.detach())
        else:
            self.native_packed = self._own.f32_pack(weight)
        # What a call reads of the weight: the only copy's bytes, else oneDNN's (same dtype).
        if self._own is not None:
            self.packed_bytes = self.native_packed.numel() * self.native_packed.element_size()
        else:
            self.packed_bytes = weight.numel() * weight.element_size()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    @property
    def backend(self) -> str:
        if self._own is None:
            return "cpu-onednn-packed"
        if self.dtype == torch.bfloat16:
            return _bf16_backend(self.native_packed)
        return _f32_backend(self.native_packed)

    def with_native_gemm(self, weight: torch.Tensor) -> int:
        """Also serve fp32 decode rows (1-4) from our own fp32 GEMM's copy of `weight` (the one
        this module was packed from), where the native kernels load; returns the copy's bytes
        (0 where it does not apply: other dtypes, or a module with only our copy already).
        The engine does it for the lm_head: read whole by every decode step, it streamed at
        ~11 GB/s through oneDNN's copy (kernels/README.md)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight {tuple(weight.shape)} is not this module's")
        kernels = native.kernels()
        if kernels is None or self._own is not None or weight.dtype != torch.float32:
            return 0
        self.native_packed = kernels.f32_pack(weight)
        return self.native_packed.numel() * self.native_packed.element_size()

    def native_projection(self) -> NativeProjection | None:
        """This projection as the one-call decode step reads it (kernels/decode_step.py), or
        None where our GEMM's copy is not its only one (oneDNN serves some rows)."""
        if self._own is None:
            return None
        if self.native_packed.dtype == torch.uint8:
            kind = ProjectKind.BF16_CODED_GEMM
        elif self.dtype == torch.bfloat16:
            kind = ProjectKind.BF16_GEMM
        elif self.native_packed.dtype == torch.bfloat16:
            kind = ProjectKind.F32_GEMM_BF16_WEIGHTS
        else:
            kind = ProjectKind.F32_GEMM
        return NativeProjection(
            kind,
            self.dtype,
            self.native_packed,
            self.bias,
            self.out_features,
            self.in_features,
            self._own,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._own is not None:
            # The kernels read raw bf16 / fp32: another dtype would be misread, not converted.
            if x.dtype != self.dtype:
                short = "bf16" if self.dtype == torch.bfloat16 else "fp32"
                raise TypeError(f"a {short} PackedLinear takes {short} inputs, not {x.dtype}")
            record_backend("dense", self.backend)
            rows = x.reshape(-1, self.in_features)
            if rows.stride(1) != 1:
                rows = rows.contiguous()
            gemm = self._own.bf16_gemm if self.dtype == torch.bfloat16 else self._own.f32_gemm
            out = gemm(rows, self.native_packed, self.out_features, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if self.native_packed is not None and native.f32_gemm_supported(x, self.in_features):
            record_backend("dense", _f32_backend(self.native_packed))
            return native.kernels().f32_gemm(x, self.native_packed, self.out_features, self.bias)
        record_backend("dense", "cpu-onednn-packed")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"packed for {self.backend}"
        )


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
