"""W4A16 / W3A16: group-wise asymmetric low-bit weights, 16-bit activations.

W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g]; scales and zeros are stored in the
compute dtype (zeros in code units). Codes are bit-packed, see slimserve.kernels.packing.

Dispatch (`select_lowbit_backend`): Triton on CUDA (GEMV kernel for M <= LOWBIT_GEMV_MAX_M, GEMM
above); on CPU our 4-bit GEMV (`slim_w4a16_gemv`) where its shapes fit, except that at the avx512
level `torch._weight_int4pack_mm_for_cpu` takes 2 to `cpu_paths.LOWBIT_INT4PACK_MAX_M` rows
(faster there per call); int4pack also serves 3-bit codes (they fit the 4-bit kernel unchanged)
over a copy converted once when the weights are set; the reference (de-quantize, dense matmul)
otherwise.
"""

from __future__ import annotations

from typing import Any, Self

import torch

from . import cpu_isa, cpu_paths, native
from .artifact import dtype_from_name, require_keys
from .base import CompressedLinear
from .decode_step import NativeProjection, ProjectKind
from .dispatch import record_backend
from .packing import pack_int3, pack_int4
from .reference import lowbit_matmul_reference, lowbit_unpack
from .triton_support import LOWBIT_GEMV_MAX_M, TRITON_DTYPES, triton_runs_on

SUPPORTED_BITS = (3, 4)


def select_lowbit_backend(
    x: torch.Tensor,
    cpu_pack: tuple[torch.Tensor, torch.Tensor] | None,
    native_4bit: bool = False,
) -> str:
    """`native_4bit`: our 4-bit GEMV takes this call (`native.w4a16_gemv_supported`); where
    torch's int4pack copy takes it too, the rows decide (`NATIVE_W4_ROWS_BESIDE_INT4PACK`)."""
    if triton_runs_on(x) and x.dtype in TRITON_DTYPES:
        return "triton-gemv" if x.shape[0] <= LOWBIT_GEMV_MAX_M else "triton-gemm"
    int4pack_fits = (
        cpu_pack is not None
        and x.device.type == "cpu"
        and cpu_pack[0].device.type == "cpu"
        and x.dtype == cpu_pack[1].dtype
        and x.shape[0] <= cpu_paths.LOWBIT_INT4PACK_MAX_M
    )
    native_rows = cpu_paths.NATIVE_W4_ROWS_BESIDE_INT4PACK.get(cpu_isa.active(), 0)
    if native_4bit and not (int4pack_fits and x.shape[0] > native_rows):
        return "cpu-native-gemv"
    return "cpu-int4pack" if int4pack_fits else "reference"


def lowbit_weight_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    qweight_hi: torch.Tensor | None = None,
    cpu_pack: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequant(codes).T -> [M, N] in x.dtype. `cpu_pack` is the (packed weight,
    scales_and_zeros) pair from `cpu_paths.int4pack_prepare` for the same weights, if any."""
    native_4bit = bits == 4 and native.w4a16_gemv_supported(x, qweight, scales, zeros, group_size)
    backend = select_lowbit_backend(x, cpu_pack, native_4bit)
    record_backend(f"w{bits}a16", backend)
    if backend.startswith("triton"):
        from . import triton_lowbit

        launch = (
            triton_lowbit.lowbit_gemv if backend == "triton-gemv" else triton_lowbit.lowbit_gemm
        )
        return launch(x.contiguous(), qweight, qweight_hi, scales, zeros, bits, group_size)
    if backend == "cpu-native-gemv":
        return native.kernels().w4a16_gemv(x, qweight, scales, zeros, group_size)
    if backend == "cpu-int4pack":
        assert cpu_pack is not None
        return cpu_paths.int4pack_matmul(x, cpu_pack[0], group_size, cpu_pack[1])
    return lowbit_matmul_reference(x, qweight, qweight_hi, scales, zeros, bits, group_size)


class LowBitLinear(CompressedLinear):
    """nn.Linear replacement holding 4- or 3-bit group-quantized weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        has_bias: bool,
        compute_dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocates empty buffers; use `from_codes` (or `from_meta` + `load_state_dict`)."""
        super().__init__(in_features, out_features, has_bias, compute_dtype, device)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        if group_size <= 0 or in_features % group_size:
            raise ValueError(
                f"group_size {group_size} must be positive and divide in_features (K) "
                f"{in_features}; for K={in_features} valid sizes include "
                f"{[g for g in (32, 64, 128, 256) if in_features % g == 0] or 'none of 32..256'}"
            )
        per_byte = 8 if bits == 3 else 2
        if in_features % per_byte:
            raise ValueError(
                f"{bits}-bit packing needs K divisible by {per_byte}, got {in_features}"
            )
        self.bits = bits
        self.group_size = group_size
        n, k, g = out_features, in_features, in_features // group_size
        u8 = {"dtype": torch.uint8, "device": device}
        if bits == 4:
            self.register_buffer("qweight", torch.empty(n, k // 2, **u8))
            self.register_buffer("qweight_hi", None)
        else:
            self.register_buffer("qweight", torch.empty(n, k // 4, **u8))
            self.register_buffer("qweight_hi", torch.empty(n, k // 8, **u8))
        self.register_buffer("scales", torch.empty(n, g, dtype=compute_dtype, device=device))
        self.register_buffer("zeros", torch.empty(n, g, dtype=compute_dtype, device=device))
        # The int4pack copy for the CPU kernel: derived state, rebuilt from the buffers above
        # whenever they change (never saved). Non-persistent buffers, so memory reports count it.
        self.register_buffer("cpu_qweight", None, persistent=False)
        self.register_buffer("cpu_scales_zeros", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_cpu_pack())

    @property
    def cpu_pack_supported(self) -> bool:
        return cpu_paths.int4pack_supported(self.out_features, self.in_features, self.group_size)

    def refresh_cpu_pack(self) -> None:
        """Re-derive the CPU kernel's copy of the weights (once per weight change, not per call)."""
        if self.qweight.device.type == "cpu" and self.cpu_pack_supported:
            codes = lowbit_unpack(self.qweight, self.qweight_hi, self.bits)
            packed, scales_zeros = cpu_paths.int4pack_prepare(
                codes, self.scales, self.zeros, self.compute_dtype
            )
            self.cpu_qweight, self.cpu_scales_zeros = packed, scales_zeros
        else:
            self.cpu_qweight = self.cpu_scales_zeros = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A device move must not carry the CPU-only layout along (nor leave a GPU copy stale).
        self.cpu_qweight = self.cpu_scales_zeros = None
        module = super()._apply(fn, recurse)
        self.refresh_cpu_pack()
        return module

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bits: int,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> Self:
        if codes.dim() != 2:
            raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
        n, k = codes.shape
        if group_size <= 0 or k % group_size:
            raise ValueError(f"group_size {group_size} does not divide K={k}")
        groups = (n, k // group_size)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != groups:
                raise ValueError(
                    f"{name} must have shape {groups} = [N, K // group_size], got {tuple(t.shape)}"
                )
        module = cls(k, n, bits, group_size, bias is not None, compute_dtype, codes.device)
        with torch.no_grad():
            if bits == 4:
                module.qweight.copy_(pack_int4(codes))
            else:
                lo, hi = pack_int3(codes)
                module.qweight.copy_(lo)
                module.qweight_hi.copy_(hi)
            module.scales.copy_(scales.detach())
            module.zeros.copy_(zeros.detach())
            module._set_bias(bias)
        module.refresh_cpu_pack()
        return module

    def meta(self) -> dict[str, Any]:
        return {**self._base_meta(), "bits": self.bits, "group_size": self.group_size}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        keys = ("in_features", "out_features", "bits", "group_size", "has_bias", "dtype")
        require_keys(cls.__name__, meta, keys)
        return cls(
            int(meta["in_features"]),
            int(meta["out_features"]),
            int(meta["bits"]),
            int(meta["group_size"]),
            bool(meta["has_bias"]),
            dtype_from_name(meta["dtype"]),
        )

    def native_projection(self) -> NativeProjection | None:
        """Our 4-bit GEMV, for the one-call decode step at every ISA level."""
        kernels = native.kernels()
        if self.bits != 4 or self.bias is not None or kernels is None:
            return None
        if kernels.w4a16_max_rows < 1 or not native.w4a16_weight_supported(
            self.in_features, self.qweight, self.scales, self.zeros, self.group_size
        ):
            return None
        return NativeProjection(
            ProjectKind.W4A16_GEMV,
            self.compute_dtype,
            self.qweight,
            self.scales,
            self.out_features,
            self.in_features,
            kernels,
            zeros=self.zeros,
            group=self.group_size,
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_weight_matmul(
            x,
            self.qweight,
            self.scales,
            self.zeros,
            bits=self.bits,
            group_size=self.group_size,
            qweight_hi=self.qweight_hi,
            cpu_pack=None
            if self.cpu_qweight is None
            else (self.cpu_qweight, self.cpu_scales_zeros),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )
