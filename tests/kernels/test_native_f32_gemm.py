"""slimserve's own fp32 GEMM for decode rows (kernels/cpu_f32_gemm.cpp): fp64 agreement at ragged
shapes (N not a multiple of the 8-channel block, odd K), with and without bias, strided rows,
every row count it takes, at each ISA level; the lm_head's PackedLinear serving it."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import native
from slimserve.kernels.dense_cpu import PackedLinear, can_pack
from slimserve.kernels.dispatch import chosen_backends

pytestmark = pytest.mark.usefixtures("each_isa")

SHAPES = [(1, 1), (7, 3), (8, 64), (33, 577), (49152 // 64, 576), (576, 1536)]


def _case(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(4, k, generator=gen) * torch.logspace(-3, 3, 4)[:, None]
    return weight, bias, x


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_fp64(n: int, k: int, with_bias: bool) -> None:
    kernels = native.kernels()
    weight, bias, x = _case(n, k, seed=n * 7 + k)
    packed = kernels.f32_pack(weight)
    for m in range(1, kernels.f32_gemm_max_rows + 1):
        out = kernels.f32_gemm(x[:m], packed, n, bias if with_bias else None)
        ref = x[:m].double() @ weight.double().t() + (bias.double() if with_bias else 0)
        # fp32 sums of k products: each within k * eps of the sum of magnitudes
        magnitude = x[:m].double().abs() @ weight.double().abs().t()
        magnitude += bias.double().abs() if with_bias else 0
        assert ((out.double() - ref).abs() <= (k + 1) * 2.0**-23 * magnitude + 1e-30).all(), m


def test_strided_rows_and_limits() -> None:
    kernels = native.kernels()
    weight, bias, _ = _case(20, 64, seed=3)
    wide = torch.randn(3, 128)
    x = wide[:, :64]  # rows 128 elements apart, unit column stride
    packed = kernels.f32_pack(weight)
    out = kernels.f32_gemm(x, packed, 20, bias)
    torch.testing.assert_close(out, x @ weight.t() + bias, rtol=1e-5, atol=1e-5)
    rows = kernels.f32_gemm_max_rows
    assert native.f32_gemm_supported(x, 64)
    assert not native.f32_gemm_supported(torch.randn(rows + 1, 64), 64)
    assert not native.f32_gemm_supported(x.bfloat16(), 64)
    assert not native.f32_gemm_supported(wide[:, ::2], 64)  # column stride 2
    with pytest.raises(ValueError, match="refused"):
        kernels.f32_gemm(torch.randn(rows + 1, 64), packed, 20, None)


def test_packed_linear_serves_decode_rows_from_it() -> None:
    weight, bias, x = _case(100, 64, seed=5)
    if not can_pack(weight):
        pytest.skip("oneDNN cannot prepack here")
    module = PackedLinear(weight, bias)
    packed_bytes = module.with_native_gemm(weight)
    assert packed_bytes == 120 * 64 * 4  # N padded to the 24-channel panel
    out = module(x[:2])
    assert "cpu-native-f32-gemm" in chosen_backends()["dense"]
    torch.testing.assert_close(out, x[:2] @ weight.t() + bias, rtol=1e-5, atol=1e-4)
    many = torch.randn(9, 64)  # a prompt chunk: oneDNN's copy
    torch.testing.assert_close(module(many), many @ weight.t() + bias, rtol=1e-5, atol=1e-4)
