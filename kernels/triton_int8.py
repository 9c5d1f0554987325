"""Triton int8-weight kernels: W8A16 (dequant fused into the matmul, per-channel scale in the
epilogue) and W8A8 (int8 x int8 -> int32 on the tensor cores, per-token x per-channel scales).

Imported lazily: only the dispatch (on CUDA) and the tests import this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import dot_in_fp32


@triton.jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
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
        q = tl.load(
            w_ptr + rn[None, :] * stride_wn + k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0,
        )
        # |q| <= 127 is exact in fp16/bf16; the scale is applied once, after the K loop. Via fp32
        # because the interpreter casts int8 -> bf16 as raw bits (same result on a GPU).
        w = q.to(tl.float32).to(x.dtype)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w)
    scale = tl.load(scale_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    out = (acc * scale[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        out,
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        mask_k = k < K
        a = tl.load(
            xq_ptr + rm[:, None] * stride_xm + k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0,
        )
        b = tl.load(
            w_ptr + rn[None, :] * stride_wn + k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0,
        )
        acc += tl.dot(a, b, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + rm, mask=mask_m, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


def _blocks(m: int) -> tuple[int, int, int]:
    # Decode rows pad to one 16-row tile; prefill takes larger M tiles for weight reuse.
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    return block_m, 64, 64


def w8a16_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] fp16/bf16 @ (qweight int8 [N, K] * scale [N]).T -> [M, N] in x.dtype."""
    if x.stride(1) != 1 or qweight.stride(1) != 1:
        raise ValueError("x and qweight must be contiguous along K")
    m, k = x.shape
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a16_kernel[grid](
        x, qweight, scale, out,
        m, n, k,
        x.stride(0), qweight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_in_fp32(x.dtype),
    )  # fmt: skip
    return out


def w8a8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """int8 xq [M, K] (scale fp32 [M]) @ int8 qweight [N, K].T (scale fp32 [N]) -> [M, N]."""
    if xq.stride(1) != 1 or qweight.stride(1) != 1:
        raise ValueError("xq and qweight must be contiguous along K")
    m, k = xq.shape
    n = qweight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    block_m, block_n, block_k = _blocks(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w8a8_kernel[grid](
        xq, x_scale.float(), qweight, weight_scale.float(), out,
        m, n, k,
        xq.stride(0), qweight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
