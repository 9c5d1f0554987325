"""slimserve's W8A16 GEMM on a packed weight (kernels/cpu_w8a16_gemm.cpp): the exact integer sums
of its activation codes, bit for bit, at ragged shapes and row counts from 1 to prompt sizes in
three dtypes; fp64 agreement within the codes' rounding; the largest sums its K limit allows;
zero, non-finite and strided rows; and a packed Int8Linear serving every row count (where the
avx2 build declines, the module stays on the GEMV)."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import Int8Linear, native
from slimserve.kernels.cpu_isa import Isa
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.int8 import Int8Embedding

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (M, N, K): a decode row on the default model's q|k|v, its gate|up at 32 rows, a lone last
# 16-channel block, K not a multiple of 4 or 16, single channels and prompt-sized row counts.
SHAPES = [(1, 960, 576), (3, 17, 5), (8, 40, 130), (9, 33, 3), (13, 50, 1024)]
SHAPES += [(32, 3072, 576), (100, 50, 64), (2, 1, 7), (300, 24, 77)]


def _kernels() -> native.NativeKernels:
    kernels = native.kernels_for(Isa.AVX512)
    if kernels is None:
        pytest.skip("the W8A16 GEMM serves only from the avx512 build (AVX-512 VNNI)")
    assert kernels.w8a16_gemm_available
    return kernels


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    return qweight, torch.rand(n, generator=gen) * 0.02 + 1e-3


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows at different magnitudes, so each row's own scale matters.
    return (torch.randn(m, k, generator=gen) * torch.logspace(-2, 2, m)[:, None]).to(dtype)


def _codes(x: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation codes (int64) and scales, from their definition: per row, a step
    of absmax / limit in fp32, round half to even."""
    values = x.float()
    scale = values.abs().amax(1, keepdim=True) / limit
    codes = torch.round(values / scale).nan_to_num(0.0)  # a zero row: every code 0
    return codes.long(), scale


def _exact(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, limit: int) -> torch.Tensor:
    """The GEMM's output from exact int64 sums of its codes: each sum rounded to fp32 once,
    times the row's scale, times the channel's scale, one fp32 rounding each."""
    codes, x_scale = _codes(x, limit)
    sums = codes @ qweight.long().t()
    return (sums.float() * x_scale * scale.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_outputs_are_the_exact_sums_of_its_codes(m: int, n: int, k: int, dtype) -> None:
    kernels = _kernels()
    qweight, scale = _weights(n, k, seed=m * n + k)
    x = _x(m, k, dtype, seed=n)
    out = kernels.w8a16_gemm(x, kernels.w8a8_pack(qweight), scale)
    assert out.shape == (m, n) and out.dtype == dtype
    # Up to K = 1024 each of the two int32 parts of a sum is below 2^24: exact in fp32.
    assert torch.equal(out, _exact(x, qweight, scale, kernels.w8a16_gemm_code_limit))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), [*SHAPES, (4, 576, 1536), (2, 20, 4100)])
def test_fp64_error_is_only_the_codes_rounding(m: int, n: int, k: int, dtype) -> None:
    kernels = _kernels()
    qweight, scale = _weights(n, k, seed=m + n * k)
    x = _x(m, k, dtype, seed=k)
    out = kernels.w8a16_gemm(x, kernels.w8a8_pack(qweight), scale).double()
    weight = qweight.double() * scale.double()[:, None]
    real = x.double() @ weight.t()
    # Half a code step per input, plus the output's own rounding and fp32 sums.
    step = x.double().abs().amax(1, keepdim=True) / kernels.w8a16_code_limit
    bound = 0.5 * step * weight.abs().sum(1) + real.abs() * {torch.float32: 1e-6}.get(dtype, 8e-3)
    assert ((out - real).abs() <= bound * 1.01 + 1e-30).all()


@pytest.mark.parametrize("sign", [1, -1])
def test_the_largest_sums_its_k_limit_allows_stay_exact(sign: int) -> None:
    """Every code at the limit (hi = +-127) against weights of one sign at +-127, at the longest
    K the kernel takes: each byte sum reaches 255 * 127 * K, the int32 edge."""
    kernels = _kernels()
    k = kernels.w8a16_gemm_max_k
    qweight = torch.full((17, k), 127, dtype=torch.int8)  # 17: a lone channel in the last block
    qweight[1::2] = -127
    scale = torch.full((17,), 0.25)
    x = torch.full((3, k), 2.0 * sign)
    x[1, ::2] = -2.0 * sign  # alternating signs
    x[2, : k // 2] = 1.0  # half the codes at about half the limit
    out = kernels.w8a16_gemm(x, kernels.w8a8_pack(qweight), scale)
    codes, x_scale = _codes(x, kernels.w8a16_gemm_code_limit)
    expected = (codes.double() @ qweight.double().t()) * x_scale.double() * 0.25
    torch.testing.assert_close(out.double(), expected, rtol=3e-7, atol=0)
    with pytest.raises(ValueError, match="refused"):
        kernels.w8a16_gemm(torch.ones(1, k + 1), torch.zeros(1, dtype=torch.uint8), scale)


def test_zero_and_non_finite_rows_stay_in_their_row() -> None:
    kernels = _kernels()
    qweight, scale = _weights(40, 96, seed=1)
    packed = kernels.w8a8_pack(qweight)
    x = _x(4, 96, torch.bfloat16, seed=2)
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 7] = float("-inf")
    out = kernels.w8a16_gemm(x, packed, scale)
    limit = kernels.w8a16_gemm_code_limit
    assert torch.equal(out[0], _exact(x[:1], qweight, scale, limit)[0])
    assert torch.equal(out[1], torch.zeros(40, dtype=torch.bfloat16))
    assert out[2:].isnan().all()


def test_strided_rows_are_read_as_their_values() -> None:
    kernels = _kernels()
    qweight, scale = _weights(24, 64, seed=5)
    wide = _x(3, 100, torch.float16, seed=6)
    x = wide[:, :64]  # rows 100 apart
    out = kernels.w8a16_gemm(x, kernels.w8a8_pack(qweight), scale)
    limit = kernels.w8a16_gemm_code_limit
    assert torch.equal(out, _exact(x.contiguous(), qweight, scale, limit))


@pytest.mark.parametrize("m", [1, 2, 7, 33, 200])
def test_a_packed_int8_linear_serves_every_row_count(m: int, each_isa: Isa) -> None:
    qweight, scale = _weights(200, 576, seed=m)
    bias = torch.randn(200).to(torch.bfloat16)
    module = Int8Linear(qweight, scale, bias, torch.bfloat16)
    x = _x(m, 576, torch.bfloat16, seed=m + 1).reshape(1, m, 576)
    before = module(x)
    packed_bytes = module.pack_for_cpu()
    out = module(x)
    if each_isa == Isa.AVX2:  # declined: the GEMV and torch's paths keep serving
        assert packed_bytes == 0 and module.cpu_native_pack is None
        assert torch.equal(out, before)
        return
    assert packed_bytes == 208 * 576 and module.qweight.numel() == 0  # one copy, 16-channel blocks
    assert "cpu-native-gemm" in chosen_backends()["w8a16"]
    limit = native.kernels().w8a16_gemm_code_limit
    expected = _exact(x[0], qweight, module.scale, limit) + bias
    assert torch.equal(out[0], expected)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the packed weight has no other reader: ours serve regardless
    try:
        assert torch.equal(module(x), out)
    finally:
        torch.set_num_threads(threads)


def test_a_tied_embedding_keeps_its_plain_table(each_isa: Isa) -> None:
    qweight, scale = _weights(64, 32, seed=9)
    head = Int8Linear(qweight, scale, None, torch.float32)
    embedding = Int8Embedding(head.qweight, head.scale)
    ids = torch.tensor([[0, 5, 63]])
    rows = embedding(ids)
    head.pack_for_cpu()
    assert torch.equal(embedding(ids), rows)
    assert torch.equal(embedding.qweight, qweight)
