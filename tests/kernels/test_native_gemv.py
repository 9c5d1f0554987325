"""slimserve's own CPU GEMV (kernels/cpu_gemv.cpp): exact integer sums, fp64 agreement at ragged
shapes and every row count it takes, edge rows, the dispatch, and how a missing or broken build
is reported."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import Int8Linear, native, quantize_int8_absmax
from slimserve.kernels.cpu_isa import Isa
from slimserve.kernels.int8 import select_w8a16_backend

from .helpers import rel_error

pytestmark = pytest.mark.usefixtures("each_isa")

# 16-bit activations: the int16 codes are finer than the inputs; the bound is the output rounding.
BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OUTPUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SHAPES = [(1, 3), (5, 33), (77, 100), (960, 576), (64, 1536), (7, 4100)]


def _kernels() -> native.NativeKernels:
    loaded = native.kernels()
    assert loaded is not None, "AVX-512 VNNI is present: the library must build and load"
    return loaded


def _weights(n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) * 0.02 + 1e-3).to(dtype)
    return qweight, scale


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows at different magnitudes, so each row's own scale matters.
    return (torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_matches_fp64_at_every_row_count(dtype: torch.dtype, n: int, k: int) -> None:
    kernels = _kernels()
    qweight, scale = _weights(n, k, dtype, seed=n + k)
    limit = kernels.w8a16_code_limit
    for m in range(1, kernels.w8a16_max_rows + 1):
        x = _x(m, k, dtype, seed=m)
        out = kernels.w8a16_gemv(x, qweight, scale)
        assert out.dtype == dtype and out.shape == (m, n)
        ref = (x.double() @ qweight.double().t()) * scale.double()
        # At most half a code step per input, times the weights it meets, plus the rounding of
        # the output to its dtype: per element, so a small row or a cancelling sum is held to
        # its own bound, not hidden under a large one's.
        step = x.double().abs().amax(dim=1, keepdim=True) / limit
        worst = step / 2 * (qweight.double().abs().sum(dim=1) * scale.double())
        rounding = OUTPUT_EPS[dtype] * ref.abs()
        assert ((out.double() - ref).abs() <= worst + rounding + 1e-30).all(), m


@pytest.mark.parametrize(("n", "k"), [(5, 33), (960, 576), (64, 1536)])
def test_integer_sums_are_exact(n: int, k: int) -> None:
    """fp32 output = the exact int32 sum of int16 codes x int8 weights, times the two scales."""
    kernels = _kernels()
    qweight, scale = _weights(n, k, torch.float32, seed=k)
    x = _x(2, k, torch.float32, seed=k)
    limit = kernels.w8a16_code_limit
    assert limit == 32767 and 255 * 127 * kernels.w8a16_max_k <= 2**31 - 1
    absmax = x.abs().amax(dim=1, keepdim=True)
    # As the kernel: an fp32 division (python's `limit / t` would multiply by t's reciprocal),
    # then round half to even like lrintf.
    codes = torch.round(x * (torch.full_like(absmax, limit) / absmax))
    sums = codes.double() @ qweight.double().t()  # exact: far below 2 ** 53
    expected = sums * (absmax.double() / limit) * scale.double()
    out = kernels.w8a16_gemv(x, qweight, scale)
    torch.testing.assert_close(out, expected.float(), rtol=1.2e-7, atol=0)  # one fp32 rounding


@pytest.mark.parametrize("k", [4096, 4100, 8200])
def test_worst_case_sums_never_overflow(k: int) -> None:
    """Every code at +-32767 against weights of one sign at +-127: the largest sums the kernel
    can meet (1e10 at K = 8200, far past int32), exact on both builds."""
    kernels = _kernels()
    qweight = torch.full((6, k), 127, dtype=torch.int8)
    qweight[1::2] = -127
    qweight[4, :7] = 0  # a ragged row as well
    scale = torch.full((6,), 0.5)
    x = torch.full((2, k), 2.0)  # rows: all +, then alternating (weights carry the all - case)
    x[1, ::2] = -2.0
    out = kernels.w8a16_gemv(x, qweight, scale)
    codes = torch.round(x / 2.0 * kernels.w8a16_code_limit).double()
    expected = (codes @ qweight.double().t()) * (2.0 / kernels.w8a16_code_limit) * 0.5
    torch.testing.assert_close(out, expected.float(), rtol=1.2e-7, atol=0)


def test_zero_and_non_finite_rows_stay_in_their_row() -> None:
    kernels = _kernels()
    qweight, scale = _weights(40, 96, torch.bfloat16, seed=1)
    for bad in (1, 0):
        x = _x(2, 96, torch.bfloat16, seed=2 + bad)
        good = 1 - bad
        ref = (x[good].double() @ qweight.double().t()) * scale.double()
        x[bad] = 0
        out = kernels.w8a16_gemv(x, qweight, scale)
        assert torch.equal(out[bad], torch.zeros(40, dtype=torch.bfloat16))
        assert rel_error(out[good], ref) < BOUND[torch.bfloat16]
        x[bad, 5] = float("inf")
        out = kernels.w8a16_gemv(x, qweight, scale)
        assert out[bad].isnan().all()
        assert rel_error(out[good], ref) < BOUND[torch.bfloat16]


def test_limits_are_checked_before_the_call() -> None:
    kernels = _kernels()
    qweight, scale = _weights(16, 64, torch.bfloat16, seed=3)
    too_many = _x(kernels.w8a16_max_rows + 1, 64, torch.bfloat16, seed=4)
    assert not native.w8a16_gemv_supported(too_many, qweight, scale)
    assert not native.w8a16_gemv_supported(too_many[:2].double(), qweight, scale)
    assert not native.w8a16_gemv_supported(too_many[:2], qweight.t(), scale)
    assert not native.w8a16_gemv_supported(too_many[:2], qweight.to(torch.int16), scale)
    with pytest.raises(ValueError, match="refused"):
        kernels.w8a16_gemv(too_many, qweight, scale)


@pytest.mark.parametrize("m", [1, 2, 5, 12])
def test_int8_linear_runs_it_through_the_dispatch(m: int, each_isa: Isa) -> None:
    qweight, scale = quantize_int8_absmax(torch.randn(200, 576))
    bias = torch.randn(200)
    module = Int8Linear(qweight, scale, bias, torch.bfloat16)
    x = _x(m, 576, torch.bfloat16, seed=m).reshape(1, m, 576)
    # avx512: up to eight rows (VPDPBUSD at 1-2, VPMADDWD at 3-8); avx2: up to 32.
    ours = "cpu-native-gemv" if m <= (8 if each_isa == Isa.AVX512 else 32) else "cpu-int8pack"
    assert select_w8a16_backend(x[0], module.qweight, module.scale) == ours
    ref = x[0].double() @ (qweight.double() * module.scale.double()[:, None]).t()
    ref += module.bias.double()
    out = module(x)
    assert out.shape == (1, m, 200)
    assert rel_error(out[0], ref) < BOUND[torch.bfloat16]


def test_strided_rows_are_read_as_their_values() -> None:
    kernels = _kernels()
    qweight, scale = _weights(24, 64, torch.bfloat16, seed=5)
    wide = _x(2, 128, torch.bfloat16, seed=6)
    x = wide[:, ::2]  # not contiguous
    ref = (x.double() @ qweight.double().t()) * scale.double()
    assert native.w8a16_gemv_supported(x, qweight, scale)
    assert rel_error(kernels.w8a16_gemv(x, qweight, scale), ref) < BOUND[torch.bfloat16]
