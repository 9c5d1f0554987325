"""torch's own CPU kernels for compressed weights, with the input limits each one really has.

Each `*_supported` check encodes a limit found by probing torch 2.13 on x86-64 (AVX-512 with
bf16 and VNNI, no AMX); the dispatch calls these checks instead of catching errors, because one
of the limits is a crash, not an exception.
"""

from __future__ import annotations

import functools
import logging

import torch

from .cpu_isa import Isa
from .reference import chunked_rows_matmul, per_token_codes

log = logging.getLogger(__name__)

CPU_FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# torch._weight_int4pack_mm_for_cpu accepts only these group sizes, and N % 16 == 0.
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
INT4PACK_N_MULTIPLE = 16
# torch._weight_int8pack_mm with bf16 activations reads past the end of its inputs (segfault at a
# page boundary) unless K % 16 == 0; fp16/fp32 were clean, but one rule for all is simpler.
INT8PACK_K_MULTIPLE = 16


def int8pack_supported(x: torch.Tensor, k: int) -> bool:
    return x.device.type == "cpu" and x.dtype in CPU_FAST_DTYPES and k % INT8PACK_K_MULTIPLE == 0


def int8pack_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.contiguous(), qweight, scale.to(x.dtype))


def int8_dequant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Cache-sized row chunks: one int8 -> 16-bit conversion, then the dense bf16 matmul; the
    per-channel scale is applied to the [M, N] output instead of the [N, K] weight."""
    out = chunked_rows_matmul(x, qweight.shape[0], lambda a, b: qweight[a:b].to(x.dtype))
    return out.mul_(scale.to(x.dtype))


def int4pack_supported(n: int, k: int, group_size: int) -> bool:
    return (
        group_size in INT4PACK_GROUP_SIZES and k % group_size == 0 and n % INT4PACK_N_MULTIPLE == 0
    )


def int4pack_prepare(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert once, at construction: codes [N, K] (3- or 4-bit values) -> (packed weight,
    scales_and_zeros [K/g, N, 2]). int4pack computes (q - 8) * s + zf, ours (q - z) * s, so
    zf = (8 - z) * s (computed in fp32, then rounded to the activation dtype like the scales)."""
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    s = scales.float()
    zf = (8.0 - zeros.float()) * s
    scales_and_zeros = torch.stack((s.t(), zf.t()), dim=-1).to(dtype).contiguous()
    return packed, scales_and_zeros


def int4pack_matmul(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group_size, scales_and_zeros)


def int_mm_supported(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and int8_gemms_exact()


def _saturating_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes [3, 256] and weights [16, 256] whose pair sums overflow int16 wherever a GEMM
    multiplies u8 by s8 through VPMADDUBSW (CPUs without VNNI): activations at the extremes,
    weights of one sign; with their exact int64 products."""
    codes = torch.full((3, 256), 127, dtype=torch.int8)
    codes[1] = -127
    codes[2, ::2] = -127
    weights = torch.full((16, 256), 127, dtype=torch.int8)
    weights[8:] = -128
    return codes, weights, codes.long() @ weights.long().t()


@functools.cache
def int8_gemms_exact() -> bool:
    """Whether torch's int8 GEMMs (oneDNN's, behind `torch._int_mm` and `qlinear_pointwise`)
    give exact int32 sums here. Without VNNI oneDNN multiplies u8 by s8 with VPMADDUBSW, whose
    16-bit pair sums saturate: W8A8 outputs came out ~7% off on random inputs (AMD Zen 2, and
    any CPU with ONEDNN_MAX_CPU_ISA below a VNNI level). Probed once on a worst case rather than
    inferred from CPU flags, so it holds whatever oneDNN picks."""
    codes, weights, exact = _saturating_case()
    int_mm_ok = torch.equal(torch._int_mm(codes, weights.t()).long(), exact)
    qlinear_ok = True
    if onednn_int8_supported():
        packed, zero_points = onednn_int8_prepack(weights)
        shifted = (codes.int() + _UINT8_ZERO_POINT).to(torch.uint8)
        acc = onednn_int8_gemm(shifted, packed, torch.ones(16), zero_points)
        qlinear_ok = torch.equal(acc.double().round().long(), exact)
    if not (int_mm_ok and qlinear_ok):
        log.warning(
            "oneDNN's int8 GEMMs saturate on this CPU (no VNNI, or ONEDNN_MAX_CPU_ISA below it): "
            "W8A8 runs on slimserve's own int8 GEMM, or on the exact fp32-chunk reference"
        )
    return int_mm_ok and qlinear_ok


def int_mm(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [N, K]^T -> int32 [M, N]. The transposed view matters: a contiguous
    [K, N] copy made oneDNN several times slower at M=1 in our measurements."""
    return torch._int_mm(xq, qweight.t())


def onednn_int8_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


# x86 int8 GEMMs take unsigned activations (VNNI multiplies u8 by s8): symmetric int8 codes are
# shifted by this zero point, which oneDNN folds back out with a per-channel weight sum.
_UINT8_ZERO_POINT = 128
# oneDNN picks the blocked layout for this batch size: 8 was within 2% of the best layout at 8
# and 32 rows and 1.3x faster at 1 row than packing without a hint.
_PACK_BATCH_HINT = 8


def onednn_int8_prepack(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> (oneDNN's blocked copy, its per-channel zero points, all 0)."""
    hint = [_PACK_BATCH_HINT, qweight.shape[1]]
    packed = torch.ops.onednn.qlinear_prepack(qweight.contiguous(), hint)
    return packed, torch.zeros(qweight.shape[0], dtype=torch.long)


def quantize_per_token_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of `reference.quantize_per_token_int8`, shifted to uint8; scale fp32 [M, 1]."""
    codes, scale = per_token_codes(x)
    return codes.add_(_UINT8_ZERO_POINT).to(torch.uint8), scale


def onednn_int8_gemm(
    codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero_points: torch.Tensor
) -> torch.Tensor:
    """uint8 activation codes [M, K] (zero point 128) x prepacked int8 weights -> fp32 [M, N]
    with the per-channel weight scale applied.

    oneDNN's scales are per tensor for activations, so the GEMM runs with scale 1 and applies
    only the per-channel weight scale (exact int32 sums, then one fp32 multiply); the caller
    applies the per-token scale to the fp32 output."""
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, _UINT8_ZERO_POINT, packed, weight_scale, zero_points,
        None, 1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def onednn_int8_matmul(
    x: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zero_points: torch.Tensor
) -> torch.Tensor:
    """W8A8 with per-token activation scales on prepacked int8 weights; -> [M, N] in x.dtype,
    every step in torch ops."""
    codes, x_scale = quantize_per_token_uint8(x)
    return onednn_int8_gemm(codes, packed, weight_scale, zero_points).mul_(x_scale).to(x.dtype)


# Largest batch (rows of x) for which each weight-only CPU kernel beats the other path for the
# same format (de-quantize cache-sized row chunks, then the dense matmul). These kernels cost time
# linear in M, while the de-quantize + matmul path is nearly flat up to M=64. Measured with
# `python -m slimserve.kernels.bench --thresholds --threads 1` on 1536x576, 576x1536 and
# 4096x4096 (kernels/README.md):
# int8pack is 1.2-1.5x faster at M=16, even (0.99-1.10x) at M=24, 0.7-0.9x at M=32.
W8A16_INT8PACK_MAX_M = 24
# int4pack is still 1.4x faster than the fp32 de-quantize reference at M=64 on all three shapes.
LOWBIT_INT4PACK_MAX_M = 64
# Rows per call up to which our 4-bit GEMV serves where int4pack could too, by ISA level. At avx2
# int4pack is 5-50x slower at every row count; at avx512 (its AVX-512 kernel) it is level with
# ours at one row and 1.2-1.7x faster from two (`isa_bench --op w4a16 --dtype bfloat16`, one
# thread; kernels/README.md). The one-call decode step runs ours at every row count: the
# per-call work it saves is worth more than that (decode_profile, same page).
NATIVE_W4_ROWS_BESIDE_INT4PACK = {Isa.AVX2: LOWBIT_INT4PACK_MAX_M, Isa.AVX512: 1}
