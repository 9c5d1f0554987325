"""slimserve's own 4-bit GEMV (kernels/cpu_gemv.cpp, `slim_w4a16_gemv`): agreement with an fp64
de-quantized reference at ragged shapes, every group size and row count it takes, fractional
zero points; the largest integer sums it can meet; its dispatch per ISA level."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import LowBitLinear, cpu_paths, native
from slimserve.kernels.cpu_isa import Isa
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.lowbit import select_lowbit_backend
from slimserve.kernels.packing import pack_int4

pytestmark = pytest.mark.usefixtures("each_isa")

OUTPUT_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
CASES = [(1, 32, 32), (7, 64, 32), (33, 576, 64), (50, 576, 32), (3, 1536, 128), (9, 512, 256)]


def _kernels() -> native.NativeKernels:
    loaded = native.kernels()
    assert loaded is not None
    return loaded


def _weights(n: int, k: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3).to(dtype)
    zeros = (torch.rand(n, k // group, generator=gen) * 15).to(dtype)  # fractional zero points
    return codes, scales, zeros


def _dequant(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
    z = zeros.double().repeat_interleave(group, dim=1)
    return (codes.double() - z) * scales.double().repeat_interleave(group, dim=1)


def _check(out, x, weight, limit, dtype) -> None:
    ref = x.double() @ weight.t()
    # Half a code step per input times the weights it meets, fp32 sums over the groups, and the
    # output's own rounding.
    step = x.double().abs().amax(dim=1, keepdim=True) / limit
    magnitude = x.double().abs() @ weight.abs().t()
    bound = step / 2 * weight.abs().sum(dim=1) + 1e-6 * magnitude + OUTPUT_EPS[dtype] * ref.abs()
    assert ((out.double() - ref).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k", "group"), CASES)
def test_matches_fp64_at_every_row_count(each_isa: Isa, dtype, n, k, group) -> None:
    kernels = _kernels()
    codes, scales, zeros = _weights(n, k, group, dtype, seed=n + k)
    qweight = pack_int4(codes)
    x_all = (torch.randn(77, k) * torch.logspace(-2, 2, 77)[:, None]).to(dtype)
    assert native.w4a16_gemv_supported(x_all[:1], qweight, scales, zeros, group)
    weight = _dequant(codes, scales, zeros, group)
    for m in (1, 2, 3, 4, 5, 8, 13, 32, 33, 77):  # past 32: passes of 32 rows, the last ragged
        out = kernels.w4a16_gemv(x_all[:m], qweight, scales, zeros, group)
        assert out.dtype == dtype and out.shape == (m, n)
        _check(out, x_all[:m], weight, kernels.w8a16_code_limit, dtype)


@pytest.mark.parametrize("group", [32, 256])
def test_largest_sums_are_exact(each_isa: Isa, group: int) -> None:
    """Codes at 15, zero points 0, activations all at +-absmax (codes +-32767): per group
    256 x 15 x 32767, the most an int32 lane-sum meets."""
    kernels = _kernels()
    k, n = 1024, 4
    codes = torch.full((n, k), 15)
    scales = torch.ones(n, k // group)
    zeros = torch.zeros(n, k // group)
    zeros[1] = 15.0  # every weight 0: the zero term cancels the code term exactly
    x = torch.full((2, k), 3.0)
    x[1, 1::2] = -3.0
    out = kernels.w4a16_gemv(x, pack_int4(codes), scales, zeros, group)
    expected = x.double() @ _dequant(codes, scales, zeros, group).t()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-3)
    assert (out[:, 1] == 0).all()


def test_limits_are_checked(each_isa: Isa) -> None:
    codes, scales, zeros = _weights(8, 96, 32, torch.float32, seed=1)
    qweight = pack_int4(codes)
    x = torch.randn(1, 96)
    max_rows = _kernels().w4a16_max_rows
    assert native.w4a16_gemv_supported(x, qweight, scales, zeros, 32) == (max_rows > 0)
    assert not native.w4a16_gemv_supported(torch.randn(1, 80), pack_int4(codes[:, :80]),
                                           scales[:, :2], zeros[:, :2], 40)  # fmt: skip
    # A prompt's rows too, in passes of max_rows, where the kernel serves at all.
    many = torch.randn(max_rows + 1, 96)
    assert native.w4a16_gemv_supported(many, qweight, scales, zeros, 32) == (max_rows > 0)
    assert not native.w4a16_gemv_supported(x.double(), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="refused"):
        _kernels().w4a16_gemv(torch.randn(0, 96), qweight, scales, zeros, 32)


def test_lowbit_linear_runs_it_through_the_dispatch(each_isa: Isa) -> None:
    codes, scales, zeros = _weights(40, 576, 64, torch.float32, seed=3)
    module = LowBitLinear.from_codes(codes, scales, zeros, 64, 4, None, torch.float32)
    x = torch.randn(1, 3, 576)
    assert native.w4a16_gemv_supported(x[0], module.qweight, module.scales, module.zeros, 64)
    out = module(x)
    assert "cpu-native-gemv" in chosen_backends()["w4a16"]  # N % 16 != 0: no int4pack copy
    _check(out[0], x[0], _dequant(codes, module.scales, module.zeros, 64), 32767, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_decide_between_it_and_int4pack(each_isa: Isa, dtype: torch.dtype) -> None:
    """Beside torch's int4pack copy: ours at every row count at the avx2 level (int4pack is
    5-50x slower there), at one row and past int4pack's rows at the avx512 level."""
    codes, scales, zeros = _weights(48, 576, 64, dtype, seed=5)
    module = LowBitLinear.from_codes(codes, scales, zeros, 64, 4, None, dtype)
    pack = (module.cpu_qweight, module.cpu_scales_zeros)
    assert pack[0] is not None
    most = cpu_paths.LOWBIT_INT4PACK_MAX_M
    for rows in (1, 2, 8, most, most + 1):
        x = torch.randn(rows, 576).to(dtype)
        ours = each_isa == Isa.AVX2 or rows == 1 or rows > most
        expected = "cpu-native-gemv" if ours else "cpu-int4pack"
        assert select_lowbit_backend(x, pack, native_4bit=True) == expected, rows
