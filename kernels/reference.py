"""Reference ops in plain torch: any device, any float dtype. They define the semantics the
fast paths are tested against, and they run wherever no fast path applies."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .packing import decompress_24, unpack_int3, unpack_int4

# fp32 sums of int8 x int8 products stay exact while |sum| < 2**24: 1024 * 127 * 127 < 2**24.
_EXACT_FP32_K_CHUNK = 1024


def lowbit_unpack(
    qweight: torch.Tensor, qweight_hi: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Packed codes -> uint8 codes [N, K]."""
    if bits == 4:
        return unpack_int4(qweight)
    if bits == 3:
        if qweight_hi is None:
            raise ValueError("3-bit weights need the high bit plane (qweight_hi)")
        return unpack_int3(qweight, qweight_hi)
    raise ValueError(f"bits must be 3 or 4, got {bits}")


def lowbit_dequantize(
    qweight: torch.Tensor,
    qweight_hi: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """W[n, k] = (code[n, k] - zeros[n, k // g]) * scales[n, k // g], computed in fp32."""
    codes = lowbit_unpack(qweight, qweight_hi, bits).to(torch.float32)
    n, k = codes.shape
    grouped = codes.reshape(n, k // group_size, group_size)
    w = (grouped - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


# Weight rows expanded per step of the chunked references: about 1 MiB of 16-bit weight, so the
# expanded tile stays in L2 and a large weight never becomes one big temporary (which, on CPU,
# cost more in page faults than the matmul itself: 35 ms vs 1 ms at 4096x4096).
CHUNK_BYTES = 1 << 20


def chunked_rows_matmul(
    x: torch.Tensor, n: int, expand: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """x [M, K] @ W.T where expand(start, stop) returns rows start:stop of W in x.dtype."""
    rows = max(64, CHUNK_BYTES // (2 * x.shape[1]))
    if n <= rows:
        return x @ expand(0, n).t()
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        out[:, start:stop] = x @ expand(start, stop).t()
    return out


def lowbit_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qweight_hi: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    def expand(a: int, b: int) -> torch.Tensor:
        hi = None if qweight_hi is None else qweight_hi[a:b]
        return lowbit_dequantize(
            qweight[a:b], hi, scales[a:b], zeros[a:b], bits, group_size, x.dtype
        )

    return chunked_rows_matmul(x, scales.shape[0], expand)


def per_token_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 codes per row of x [M, K], still as fp32 values in [-127, 127],
    and the fp32 scale [M, 1]; the int8 and uint8 quantizers store them each their own way."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).div_(127.0).clamp_(min=1e-12)
    return xf.div(scale).round_().clamp_(-127, 127), scale  # div, not div_: x.float() may be x


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row of x [M, K]: (int8 [M, K], fp32 scale [M])."""
    codes, scale = per_token_codes(x)
    return codes.to(torch.int8), scale[:, 0]


def int8_int8_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [M, K] x int8 [N, K]^T -> int32 [M, N] on any device (fp32 chunks of K)."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int64, device=a.device)
    for start in range(0, a.shape[1], _EXACT_FP32_K_CHUNK):
        stop = start + _EXACT_FP32_K_CHUNK
        part = a[:, start:stop].float() @ b[:, start:stop].float().t()
        out += part.to(torch.int64)
    return out.to(torch.int32)


def sparse24_matmul_reference(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor
) -> torch.Tensor:
    k = x.shape[1]

    def expand(a: int, b: int) -> torch.Tensor:
        return decompress_24(values[a:b].to(x.dtype), meta[a:b], k)

    return chunked_rows_matmul(x, values.shape[0], expand)
