"""Triton 2:4 sparse matmul that reads only the compressed form (values [N, K/2] + 4-bit-per-group
metadata) and expands each weight tile in registers before a dense tl.dot. It halves the weight
bytes read; it does not use the sparse tensor cores (torch's semi-structured path does, on GPUs
that have them).

Imported lazily: only the dispatch (on CUDA) and the tests import this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import dot_in_fp32


@triton.jit
def _sparse24_kernel(
    x_ptr, v_ptr, meta_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_vn, stride_meta, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        mask_k = k < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        wmask = mask_k[:, None] & mask_n[None, :]
        group = (k // 4)[:, None]
        pos = (k % 4)[:, None]
        byte = tl.load(meta_ptr + rn[None, :] * stride_meta + group // 2, mask=wmask, other=0)
        nibble = (byte.to(tl.int32) >> ((group % 2) * 4)) & 0xF
        v0 = tl.load(v_ptr + rn[None, :] * stride_vn + 2 * group, mask=wmask, other=0.0)
        v1 = tl.load(v_ptr + rn[None, :] * stride_vn + 2 * group + 1, mask=wmask, other=0.0)
        zero = tl.zeros_like(v0)
        w = tl.where(pos == (nibble & 3), v0, tl.where(pos == (nibble >> 2), v1, zero))
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def sparse24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] @ decompress(values [N, K/2], meta [N, ceil(K/8)]).T -> [M, N] in x.dtype."""
    if x.stride(1) != 1 or values.stride(1) != 1 or meta.stride(1) != 1:
        raise ValueError("x, values and meta must be contiguous along K")
    m, k = x.shape
    n = values.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _sparse24_kernel[grid](
        x, values, meta, out,
        m, n, k,
        x.stride(0), values.stride(0), meta.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_in_fp32(x.dtype),
    )  # fmt: skip
    return out
