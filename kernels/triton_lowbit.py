"""Triton W4A16 / W3A16: fused unpack + dequant + matmul over the packed layout of
slimserve.kernels.packing. Two kernels: a GEMV for decode (M <= LOWBIT_GEMV_MAX_M, one program per
(row, N block, K split), reduction with tl.sum) and a tiled GEMM (tl.dot) for prefill.

Imported lazily: only the dispatch (on CUDA) and the tests import this module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_support import (
    LOWBIT_GEMV_MAX_M,
    dot_in_fp32,
    multiprocessor_count,
)


@triton.jit
def _load_codes(qw_ptr, qhi_ptr, rn, k, stride_qw, stride_qhi, mask, BITS: tl.constexpr):
    """Codes for rows rn[:, None] and columns k[None, :] (or any broadcastable pair) as int32."""
    if BITS == 4:
        byte = tl.load(qw_ptr + rn * stride_qw + k // 2, mask=mask, other=0).to(tl.int32)
        codes = (byte >> ((k % 2) * 4)) & 0xF
    else:
        lo = tl.load(qw_ptr + rn * stride_qw + k // 4, mask=mask, other=0).to(tl.int32)
        hi = tl.load(qhi_ptr + rn * stride_qhi + k // 8, mask=mask, other=0).to(tl.int32)
        codes = ((lo >> ((k % 4) * 2)) & 3) | (((hi >> (k % 8)) & 1) << 2)
    return codes


@triton.jit
def _lowbit_gemm_kernel(
    x_ptr, qw_ptr, qhi_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_om, stride_qw, stride_qhi, stride_s,
    GROUP: tl.constexpr, BITS: tl.constexpr,
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
        codes = _load_codes(
            qw_ptr, qhi_ptr, rn[None, :], k[:, None], stride_qw, stride_qhi, wmask, BITS
        )
        if GROUP % BLOCK_K == 0:
            # The whole K tile lies in one group: one scale and zero per output column.
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * stride_s + g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + rn * stride_s + g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            g2 = rn[None, :] * stride_s + k[:, None] // GROUP
            s = tl.load(s_ptr + g2, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g2, mask=wmask, other=0.0).to(tl.float32)
        # Dequantize in fp32, round once to the activation dtype: the reference's rounding.
        w = ((codes.to(tl.float32) - z) * s).to(x.dtype)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x, w)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        out,
        mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def _lowbit_gemv_kernel(
    x_ptr, qw_ptr, qhi_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_os, stride_om, stride_qw, stride_qhi, stride_s,
    GROUP: tl.constexpr, BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    k_start = split * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k = k0 + rk
        mask_k = k < k_stop
        x = tl.load(x_ptr + m * stride_xm + k, mask=mask_k, other=0.0)
        wmask = mask_n[:, None] & mask_k[None, :]
        codes = _load_codes(
            qw_ptr, qhi_ptr, rn[:, None], k[None, :], stride_qw, stride_qhi, wmask, BITS
        )
        g2 = rn[:, None] * stride_s + k[None, :] // GROUP
        s = tl.load(s_ptr + g2, mask=wmask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g2, mask=wmask, other=0.0).to(tl.float32)
        w = ((codes.to(tl.float32) - z) * s).to(x.dtype).to(tl.float32)
        acc += tl.sum(w * x.to(tl.float32)[None, :], axis=1)
    tl.store(
        out_ptr + split * stride_os + m * stride_om + rn,
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_n,
    )


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be a 2-D tensor with unit stride along K")
    if bits not in (3, 4):
        raise ValueError(f"bits must be 3 or 4, got {bits}")
    if qweight.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("packed weight and scales must be contiguous along K")


def _block_k(group_size: int) -> int:
    return 64 if group_size % 64 == 0 else 32 if group_size % 32 == 0 else 16


def lowbit_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qweight_hi: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequant(codes).T with the tiled tensor-core kernel (prefill)."""
    _check(x, qweight, scales, bits)
    m, k = x.shape
    n = scales.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    hi = qweight if qweight_hi is None else qweight_hi
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n, block_k = 64, _block_k(group_size)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _lowbit_gemm_kernel[grid](
        x, qweight, hi, scales, zeros, out,
        m, n, k,
        x.stride(0), out.stride(0), qweight.stride(0), hi.stride(0), scales.stride(0),
        GROUP=group_size, BITS=bits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=dot_in_fp32(x.dtype),
    )  # fmt: skip
    return out


def lowbit_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qweight_hi: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor | None = None,
    split_k: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M <= 16, K] @ dequant(codes).T with the decode kernel; split-K partial sums are reduced
    in fp32 (`workspace` [split_k, M, N] fp32 may be passed in, e.g. poisoned by tests)."""
    _check(x, qweight, scales, bits)
    m, k = x.shape
    n = scales.shape[0]
    block_n, block_k = 32, 64
    n_blocks = triton.cdiv(n, block_n)
    if split_k is None:
        # Enough programs to fill every multiprocessor about twice, each with >= 4 K tiles.
        want = triton.cdiv(2 * multiprocessor_count(x.device), n_blocks * m)
        split_k = max(1, min(want, k // (4 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if split_k == 1:
        target, stride_split = out, 0
    else:
        if workspace is None:
            workspace = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
        target, stride_split = workspace, workspace.stride(0)
    hi = qweight if qweight_hi is None else qweight_hi
    grid = (n_blocks, split_k, m)
    _lowbit_gemv_kernel[grid](
        x, qweight, hi, scales, zeros, target,
        m, n, k, k_per_split,
        x.stride(0), stride_split, target.stride(-2), qweight.stride(0), hi.stride(0),
        scales.stride(0),
        GROUP=group_size, BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    if split_k > 1:
        out.copy_(workspace[:split_k].sum(dim=0))
    return out


def lowbit_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qweight_hi: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    if x.shape[0] <= LOWBIT_GEMV_MAX_M:
        return lowbit_gemv(x, qweight, qweight_hi, scales, zeros, bits, group_size)
    return lowbit_gemm(x, qweight, qweight_hi, scales, zeros, bits, group_size)
