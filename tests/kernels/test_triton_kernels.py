"""Every Triton kernel under TRITON_INTERPRET=1 on CPU tensors, against fp64 references.

Outputs (and split-K workspaces) are filled with NaN first, so an element a kernel fails to
write makes the relative error NaN and the bound fails. Bounds: fp16 output rounding is
2**-11 relative, bf16 2**-8; weights are rounded once to the activation dtype as in the reference.
"""

from __future__ import annotations

import os

import pytest
import torch

from slimserve.kernels import quantize_int8_absmax, quantize_per_token_int8
from slimserve.kernels.packing import compress_24, pack_int3, pack_int4

from .helpers import lowbit_weight_fp64, random_24, random_lowbit, rel_error

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it before triton loads
    pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1", allow_module_level=True)

from slimserve.kernels import triton_int8, triton_lowbit, triton_sparse24

BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float16, torch.bfloat16]
MS = [1, 7, 16, 128]


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype)


# (N, K, group): N ragged against BLOCK_N (64 / 32), K ragged against BLOCK_K (64).
LOWBIT_SHAPES = [(40, 128, 32), (72, 96, 32), (192, 256, 64), (100, 160, 32), (48, 128, 128)]


def _lowbit_case(n: int, k: int, g: int, bits: int, dtype: torch.dtype):
    codes, scales, zeros = random_lowbit(n, k, bits, g, seed=n + k + bits)
    scales, zeros = scales.to(dtype), zeros.to(dtype)
    if bits == 4:
        qweight, hi = pack_int4(codes), None
    else:
        qweight, hi = pack_int3(codes)
    ref_w = lowbit_weight_fp64(codes, scales, zeros, g)
    return qweight, hi, scales, zeros, ref_w


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k", "g"), LOWBIT_SHAPES)
def test_lowbit_gemm(bits: int, dtype: torch.dtype, n: int, k: int, g: int) -> None:
    qweight, hi, scales, zeros, ref_w = _lowbit_case(n, k, g, bits, dtype)
    for m in MS:
        x = _x(m, k, dtype, seed=m)
        out = _poisoned(m, n, dtype)
        triton_lowbit.lowbit_gemm(x, qweight, hi, scales, zeros, bits, g, out=out)
        err = rel_error(out, x.double() @ ref_w.t())
        assert err < BOUND[dtype], (m, err)


# The interpreter runs one program per (row, N block, K split): (M, split_k) pairs are chosen so
# every M and every split count is covered without the full cross product.
GEMV_RUNS = [(1, 1), (7, 3), (16, 2)]


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k", "g"), LOWBIT_SHAPES)
def test_lowbit_gemv(bits: int, dtype: torch.dtype, n: int, k: int, g: int) -> None:
    qweight, hi, scales, zeros, ref_w = _lowbit_case(n, k, g, bits, dtype)
    runs = GEMV_RUNS if n * k <= 100 * 160 else GEMV_RUNS[:1]
    for m, split_k in runs:
        x = _x(m, k, dtype, seed=m)
        out = _poisoned(m, n, dtype)
        workspace = torch.full((split_k, m, n), float("nan"))
        triton_lowbit.lowbit_gemv(
            x, qweight, hi, scales, zeros, bits, g, out=out, split_k=split_k, workspace=workspace
        )
        err = rel_error(out, x.double() @ ref_w.t())
        assert err < BOUND[dtype], (m, split_k, err)


def test_lowbit_auto_choice_covers_both_kernels() -> None:
    qweight, hi, scales, zeros, ref_w = _lowbit_case(64, 128, 32, 4, torch.float16)
    for m in (triton_lowbit.LOWBIT_GEMV_MAX_M, triton_lowbit.LOWBIT_GEMV_MAX_M + 1):
        x = _x(m, 128, torch.float16, seed=m)
        out = triton_lowbit.lowbit_matmul(x, qweight, hi, scales, zeros, 4, 32)
        assert rel_error(out, x.double() @ ref_w.t()) < BOUND[torch.float16]


# (N, K): ragged N and K (K not a multiple of BLOCK_K=64; 100 is also not a multiple of 8).
INT8_SHAPES = [(40, 128), (72, 100), (192, 256), (100, 132)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k"), INT8_SHAPES)
def test_w8a16(dtype: torch.dtype, n: int, k: int) -> None:
    qweight, scale = quantize_int8_absmax(
        torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    )
    scale = scale.to(dtype)
    ref_w = qweight.double() * scale.double()[:, None]
    for m in MS:
        x = _x(m, k, dtype, seed=m)
        out = _poisoned(m, n, dtype)
        triton_int8.w8a16_matmul(x, qweight, scale, out=out)
        err = rel_error(out, x.double() @ ref_w.t())
        assert err < BOUND[dtype], (m, err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k"), INT8_SHAPES)
def test_w8a8(dtype: torch.dtype, n: int, k: int) -> None:
    qweight, wscale = quantize_int8_absmax(
        torch.randn(n, k, generator=torch.Generator().manual_seed(n))
    )
    for m in MS:
        xq, xs = quantize_per_token_int8(_x(m, k, dtype, seed=m))
        out = _poisoned(m, n, dtype)
        triton_int8.w8a8_matmul(xq, xs, qweight, wscale, dtype, out=out)
        ref = (xq.double() @ qweight.double().t()) * xs.double()[:, None] * wscale.double()
        err = rel_error(out, ref)
        assert err < BOUND[dtype], (m, err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k"), INT8_SHAPES)
def test_sparse24(dtype: torch.dtype, n: int, k: int) -> None:
    w = random_24(n, k, seed=n * k).to(dtype)
    values, meta = compress_24(w)
    for m in MS:
        x = _x(m, k, dtype, seed=m)
        out = _poisoned(m, n, dtype)
        triton_sparse24.sparse24_matmul(x, values, meta, out=out)
        err = rel_error(out, x.double() @ w.double().t())
        assert err < BOUND[dtype], (m, err)
