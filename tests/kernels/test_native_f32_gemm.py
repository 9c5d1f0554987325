"""slimserve's own fp32 GEMM (kernels/cpu_f32_gemm.cpp): fp64 agreement at ragged shapes (N not a
multiple of the 24-channel panel, odd K), with and without bias, strided rows, decode and prompt
row counts (lone last groups of 4 rows), at each ISA level; the PackedLinear serving it: every
row count as the only copy at the avx2 level, the lm_head's decode rows beside oneDNN's copy at
the avx512 level; the same panels in bf16 for weights that are bf16 numbers (bit-identical to
the fp32 panels, half the bytes) and in int8 (W8A16, each weight widened in registers), and the
Int8Linear serving every row count from them at the avx2 level."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import Int8Linear, cpu_isa, native
from slimserve.kernels.dense_cpu import PackedLinear, can_pack
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.int8 import quantize_int8_absmax

pytestmark = pytest.mark.usefixtures("each_isa")

SHAPES = [(1, 1), (7, 3), (8, 64), (33, 577), (49152 // 64, 576), (576, 1536)]


def _case(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(ROWS[-1], k, generator=gen) * torch.logspace(-3, 3, ROWS[-1])[:, None]
    return weight, bias, x


ROWS = [1, 2, 3, 4, 5, 8, 11, 32, 130]


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_fp64(n: int, k: int, with_bias: bool) -> None:
    kernels = native.kernels()
    weight, bias, x = _case(n, k, seed=n * 7 + k)
    packed = kernels.f32_pack(weight)
    for m in ROWS:
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
    rows = kernels.f32_gemm_max_rows  # beside oneDNN's copy
    assert native.f32_gemm_supported(x, 64)
    assert not native.f32_gemm_supported(torch.randn(rows + 1, 64), 64)
    assert not native.f32_gemm_supported(x.bfloat16(), 64)
    assert not native.f32_gemm_supported(wide[:, ::2], 64)  # column stride 2
    with pytest.raises(ValueError, match="refused"):
        kernels.f32_gemm(torch.randn(0, 64), packed, 20, None)


def test_at_the_avx2_level_it_is_the_only_copy_at_every_row_count(each_isa: cpu_isa.Isa) -> None:
    weight, bias, x = _case(100, 64, seed=4)
    module = PackedLinear(weight, bias)
    if each_isa != cpu_isa.Isa.AVX2:
        assert module.backend == "cpu-onednn-packed" and module.native_packed is None
        return
    assert module.backend == "cpu-native-f32-gemm" and module.packed is None
    assert module.native_packed.numel() == 120 * 64  # N padded to the 24-channel panel
    assert module.with_native_gemm(weight) == 0  # already its only copy
    for m in ROWS:
        torch.testing.assert_close(module(x[:m]), x[:m] @ weight.t() + bias, rtol=1e-5, atol=1e-3)
    assert "cpu-native-f32-gemm" in chosen_backends()["dense"]
    with pytest.raises(TypeError, match="takes fp32 inputs"):
        module(x.bfloat16())  # never misread as fp32


def test_packed_linear_serves_decode_rows_from_it(each_isa: cpu_isa.Isa) -> None:
    weight, bias, x = _case(100, 64, seed=5)
    if each_isa == cpu_isa.Isa.AVX2:
        pytest.skip("at the avx2 level the fp32 GEMM is the only copy (the test above)")
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


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # NaN and -0.0 compared exactly


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_bf16_panels_are_bit_identical_to_fp32_panels(n: int, k: int) -> None:
    """Weights that are bf16 numbers (a bf16 checkpoint served in fp32) pack in bf16 and give
    the fp32 panels' results bit for bit: random ones, and worst cases at bf16's extremes (the
    largest and smallest normal magnitudes, infinities, zeros of both signs) whose products
    overflow to inf and NaN or fall below fp32's range."""
    kernels = native.kernels()
    weight, bias, x = _case(n, k, seed=n * 3 + k)
    weight = weight.bfloat16().float()
    extremes = torch.tensor([3.3895e38, -3.3895e38, 1.1755e-38, -0.0, 0.0, float("inf")])
    weight.view(-1)[: min(weight.numel(), extremes.numel())] = extremes.bfloat16().float()[
        : weight.numel()
    ]
    packed = kernels.f32_pack(weight)
    assert (
        packed.dtype == torch.bfloat16
        and packed.numel() == kernels.f32_pack(weight, bf16_storage=False).numel()
    )
    wide = kernels.f32_pack(weight, bf16_storage=False)
    assert wide.dtype == torch.float32
    for m in ROWS:
        for b in (None, bias):
            assert torch.equal(
                _bits(kernels.f32_gemm(x[:m], packed, n, b)),
                _bits(kernels.f32_gemm(x[:m], wide, n, b)),
            ), m


def test_weights_that_are_not_all_bf16_numbers_pack_in_fp32() -> None:
    kernels = native.kernels()
    weight = torch.randn(30, 40).bfloat16().float()
    assert native.is_bf16_exact(weight) and kernels.f32_pack(weight).dtype == torch.bfloat16
    weight[7, 11] += 2.0**-20  # one value bf16 cannot hold
    assert not native.is_bf16_exact(weight)
    assert kernels.f32_pack(weight).dtype == torch.float32
    assert not native.is_bf16_exact(weight.bfloat16())  # only fp32 tensors are packed so


def test_a_bf16_checkpoint_served_in_fp32_is_read_in_bf16(each_isa: cpu_isa.Isa) -> None:
    weight, bias, x = _case(100, 64, seed=8)
    weight = weight.bfloat16().float()
    module = PackedLinear(weight, bias)
    if each_isa != cpu_isa.Isa.AVX2:
        if can_pack(weight):  # the lm_head's decode-row copy beside oneDNN's: bf16 too
            assert module.with_native_gemm(weight) == 120 * 64 * 2
            module(x[:2])
            assert "cpu-native-f32-gemm-bf16-weights" in chosen_backends()["dense"]
        return
    assert module.backend == "cpu-native-f32-gemm-bf16-weights"
    assert module.packed_bytes == 120 * 64 * 2  # half the fp32 panels
    assert "bf16-weights" in repr(module)
    for m in ROWS:
        torch.testing.assert_close(module(x[:m]), x[:m] @ weight.t() + bias, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int8_panels_match_fp64(n: int, k: int) -> None:
    kernels = native.kernels()
    weight, _, x = _case(n, k, seed=n * 5 + k)
    qweight, scale = quantize_int8_absmax(weight)
    qweight[0, : min(k, 3)] = torch.tensor([127, -127, -128][: min(k, 3)], dtype=torch.int8)
    packed = kernels.w8a16_panels_pack(qweight)
    dequant = qweight.double() * scale.double()[:, None]
    for m in ROWS:
        out = kernels.w8a16_panels_gemm(x[:m], packed, scale)
        ref = x[:m].double() @ dequant.t()
        # fp32 sums of exact products (|q| <= 128 widens exactly), then one multiply by the scale
        magnitude = x[:m].double().abs() @ dequant.abs().t()
        assert ((out.double() - ref).abs() <= (k + 2) * 2.0**-23 * magnitude + 1e-30).all(), m


def test_at_the_avx2_level_an_fp32_int8_linear_serves_every_row_count_from_panels(
    each_isa: cpu_isa.Isa,
) -> None:
    weight, bias, x = _case(100, 64, seed=6)
    qweight, scale = quantize_int8_absmax(weight)
    module = Int8Linear(qweight, scale, bias, torch.float32)
    held = module.pack_for_cpu()
    if each_isa != cpu_isa.Isa.AVX2:
        assert module.cpu_native_backend != "cpu-native-panels"
        return
    assert held == 120 * 64 and module.qweight.numel() == 0  # one int8 copy, 24-channel panels
    assert "packed for cpu-native-panels" in repr(module)
    dequant = qweight.float() * scale[:, None]
    for m in ROWS:
        torch.testing.assert_close(module(x[:m]), x[:m] @ dequant.t() + bias, rtol=1e-5, atol=1e-3)
    assert "cpu-native-panels" in chosen_backends()["w8a16"]
    half = Int8Linear(qweight, scale, None, torch.bfloat16)
    assert half.pack_for_cpu() == 0  # 16-bit activations: the GEMV and torch's paths serve
