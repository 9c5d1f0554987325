"""slimserve's own W8A8 pieces (kernels/cpu_w8a8.cpp): the activation quantizer and rescale give
the codes, scales and roundings of torch's per-token ops bit for bit (ragged widths, three dtypes,
strided rows, zero and large rows); the few-row GEMM gives oneDNN's path's outputs bit for bit
(1-32 rows, ragged N and K) and against fp64 is off only by the activation codes' rounding; a
packed module dispatches by rows."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import cpu_paths, native
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.w8a8 import W8A8Linear

pytestmark = pytest.mark.usefixtures("each_isa")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rows(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    x *= torch.logspace(-2, 2, rows).unsqueeze(1)  # each row its own scale
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "k"), [(1, 576), (3, 17), (5, 1000), (2, 3)])
def test_codes_and_scales_are_torchs(dtype: torch.dtype, rows: int, k: int) -> None:
    x = _rows(rows, k, dtype, seed=k)
    codes, scales = native.kernels().quantize_rows_u8(x)
    expected_codes, expected_scales = cpu_paths.quantize_per_token_uint8(x)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes, expected_codes)
    assert codes.min() >= 1 and codes.max() <= 255  # symmetric: +-127 around 128


def test_strided_rows_zero_rows_and_ties() -> None:
    wide = _rows(4, 300, torch.bfloat16, seed=1)
    x = wide[:, :250]  # rows 300 apart
    x[1] = 0  # a zero row: the smallest scale, every code at the zero point
    x[2, :4] = torch.tensor([127.0, 0.5, -0.5, 1.5])  # halfway codes round to even
    assert native.quantize_rows_supported(x)
    codes, scales = native.kernels().quantize_rows_u8(x)
    expected_codes, expected_scales = cpu_paths.quantize_per_token_uint8(x)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)
    assert (codes[1] == 128).all()
    assert not native.quantize_rows_supported(wide.t())  # column stride
    assert not native.quantize_rows_supported(wide.double())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rescale_rounds_as_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    acc = torch.randn(3, 37, generator=gen) * 1e4
    scales = torch.rand(3, 1, generator=gen) * 1e-3
    out = native.kernels().rescale_rows(acc, scales, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, acc.clone().mul_(scales).to(dtype))


def _module(n: int, k: int, seed: int) -> tuple[W8A8Linear, torch.Tensor, torch.Tensor]:
    """A packed module over fresh int8 weights (every value in [-127, 127] occurs), and them."""
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    module = W8A8Linear.from_quantized(qweight, scale, None, torch.bfloat16)
    if module.pack_for_cpu() == 0:
        pytest.skip("this torch has no oneDNN int8 kernels")
    return module, qweight, scale


def _exact(x: torch.Tensor, qweight: torch.Tensor, wscale: torch.Tensor) -> torch.Tensor:
    """The GEMM's output from exact int64 sums of the same codes, scaled in fp32 in the order
    every CPU path scales them (sum * weight scale * activation scale, one rounding each)."""
    codes, x_scale = cpu_paths.quantize_per_token_uint8(x)
    sums = (codes.long() - 128) @ qweight.long().t()
    return (sums.float() * wscale.float()).mul_(x_scale).to(x.dtype)


def _onednn_or_none(module: W8A8Linear, x: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's output where its int8 GEMM is exact here (VNNI), else None: without VNNI it
    saturates, and the module never packs for it."""
    if module.cpu_pack is None:
        assert not cpu_paths.int8_gemms_exact()
        return None
    packed, zero_points = module.cpu_pack
    return cpu_paths.onednn_int8_matmul(x, packed, module.weight_scale, zero_points)


# (rows, N, K): one decode row on the default model's q|k|v, 32 rows (the limit), blocks of 16
# output channels with a lone last block, K not a multiple of 4, and tiny ones.
GEMM_SHAPES = [(1, 960, 576), (32, 3072, 576), (13, 576, 1536), (9, 33, 3), (5, 4, 65)]
GEMM_SHAPES += [(2, 1, 7), (8, 50, 130)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "k"), GEMM_SHAPES)
def test_the_gemm_matches_onednn_bit_for_bit_and_fp64(rows, n, k, dtype) -> None:
    module, qweight, scale = _module(n, k, seed=rows * n + k)
    x = _rows(rows, k, dtype, seed=n)
    kernels = native.kernels()
    assert native.w8a8_gemm_supported(x, k)
    ours = kernels.w8a8_gemm(x, module.cpu_native_pack, module.weight_scale)
    assert ours.shape == (rows, n) and ours.dtype == dtype
    assert torch.equal(ours, _exact(x, qweight, scale))
    theirs = _onednn_or_none(module, x)
    assert theirs is None or torch.equal(ours, theirs)
    # Against fp64 the only error is the activation codes' rounding (half a step per input).
    codes, x_scale = cpu_paths.quantize_per_token_uint8(x)
    exact = ((codes.double() - 128) * x_scale.double()) @ (
        qweight.double() * scale.double()[:, None]
    ).t()
    torch.testing.assert_close(
        ours.double(), exact, rtol={torch.float32: 1e-6}.get(dtype, 8e-3), atol=1e-6
    )
    real = x.double() @ (qweight.double() * scale.double()[:, None]).t()
    step = x_scale.double() * 0.5 * (qweight.double().abs() * scale.double()[:, None]).sum(1)
    assert ((ours.double() - real).abs() <= step * 1.01 + real.abs() * 8e-3).all()


def test_the_gemm_limits_are_checked_before_the_call() -> None:
    kernels = native.kernels()
    assert kernels.w8a8_gemm_max_rows == 32
    x = _rows(32, 64, torch.bfloat16, seed=0)
    assert native.w8a8_gemm_supported(x, 64)
    many = _rows(33, 64, torch.bfloat16, seed=0)
    assert not native.w8a8_gemm_supported(many, 64)  # where oneDNN is exact, it takes these
    assert native.w8a8_gemm_supported(many, 64, any_rows=True)
    assert not native.w8a8_gemm_supported(x, 65)  # not the module's in-features
    assert native.w8a8_gemm_supported(_rows(32, 4096, torch.bfloat16, seed=0), 4096)
    assert not native.w8a8_gemm_supported(x.t(), 32)  # column stride
    module, _, _ = _module(16, 64, seed=1)
    too_long = kernels.w8a8_gemm_max_k + 1  # int32 sums could overflow past it
    assert not native.w8a8_gemm_supported(_rows(1, too_long, torch.float32, seed=0), too_long)
    with pytest.raises(ValueError, match="refused"):
        kernels.w8a8_gemm(
            _rows(1, too_long, torch.float32, seed=0), module.cpu_native_pack, module.weight_scale
        )


@pytest.mark.parametrize("rows", [33, 64, 100])
def test_the_gemm_takes_any_row_count_in_passes(rows: int) -> None:
    """Where oneDNN's int8 GEMM saturates, ours serves prompts too: passes of 32 rows."""
    module, qweight, scale = _module(40, 96, seed=rows)
    x = _rows(rows, 96, torch.float32, seed=rows + 1)
    ours = native.kernels().w8a8_gemm(x, module.cpu_native_pack, module.weight_scale)
    assert torch.equal(ours, _exact(x, qweight, scale))


@pytest.mark.parametrize(("rows", "backend"), [(1, "cpu-native-gemm"), (32, "cpu-native-gemm")])
def test_a_packed_module_takes_our_gemm_for_few_rows(rows: int, backend: str) -> None:
    module, qweight, scale = _module(96, 64, seed=rows)
    x = _rows(rows, 64, torch.bfloat16, seed=rows + 1)
    ours = module(x)
    assert backend in chosen_backends()["w8a8"]
    assert torch.equal(ours, _exact(x, qweight, scale))
    theirs = _onednn_or_none(module, x)
    assert theirs is None or torch.equal(ours, theirs)


def test_a_packed_module_takes_onednn_with_our_quantizer_for_many_rows() -> None:
    """A prompt chunk: oneDNN's blocked GEMM with our quantizer where its sums are exact, our
    GEMM in passes where they are not."""
    module, qweight, scale = _module(96, 64, seed=3)
    x = _rows(40, 64, torch.bfloat16, seed=4)
    ours = module(x)
    assert torch.equal(ours, _exact(x, qweight, scale))
    theirs = _onednn_or_none(module, x)
    if theirs is None:
        assert "cpu-native-gemm" in chosen_backends()["w8a8"]
    else:
        assert "cpu-onednn-packed-native-quantize" in chosen_backends()["w8a8"]
        assert torch.equal(ours, theirs)


def test_with_more_threads_the_threaded_kernels_serve() -> None:
    """Ours run on the calling thread: an engine computing on several threads keeps oneDNN's."""
    module, _, _ = _module(96, 64, seed=5)
    x = _rows(4, 64, torch.bfloat16, seed=6)
    ours = module(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert native.serving_kernels() is None
        assert not native.w8a8_gemm_supported(x, 64)
        assert not native.quantize_rows_supported(x)
        theirs = module(x)  # oneDNN with torch's quantizer
    finally:
        torch.set_num_threads(threads)
    # oneDNN where it is exact; else the fp32-chunk reference over the kept plain weight.
    if module.cpu_pack is not None:
        assert "cpu-onednn-packed" in chosen_backends()["w8a8"]
        assert torch.equal(ours, theirs)
    else:  # the same sums, scaled in another order: one bf16 rounding apart at most
        assert "reference" in chosen_backends()["w8a8"]
        torch.testing.assert_close(ours, theirs, rtol=8e-3, atol=0)
