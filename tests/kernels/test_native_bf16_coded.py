"""The bf16 GEMM on its coded layout (kernels/cpu_bf16_coded.cpp): lossless, so every output must
be bit for bit the plain layout's (cpu_bf16_gemm.cpp, itself checked against fp64 in
test_native_bf16_gemm.py), at decode and prompt row counts, ragged N (lone last blocks, tails),
odd K and K past whole chunks, with coded chunks, raw ones (more than 16 high bytes), and every
one of the 256 high bytes, infinities, NaN, zeros and subnormals included."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import cpu_isa, native
from slimserve.kernels.decode_step import ProjectKind
from slimserve.kernels.dense_cpu import PackedLinear

from .helpers import AVX512_VNNI, cpu_has

BF16_CPU = cpu_has(*AVX512_VNNI, "avx512_bf16") and cpu_isa.active() == cpu_isa.Isa.AVX512
pytestmark = pytest.mark.skipif(not BF16_CPU, reason="no AVX-512 BF16 at this ISA level")

# (rows, N, K): a decode row and a prompt's, lone last blocks and channel tails, odd K, K = 1,
# K past whole 64-input chunks (a short last chunk), more rows than a pass takes.
SHAPES = [
    (1, 1000, 576),
    (8, 96, 64),
    (9, 33, 3),
    (3, 7, 101),
    (17, 16, 64),
    (20, 50, 130),
    (5, 64, 200),
    (2, 48, 1),
    (130, 40, 96),
]


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    loaded = native.kernels()
    assert loaded is not None and loaded.bf16_gemm_available
    return loaded


def _trained_like(n: int, k: int, seed: int) -> torch.Tensor:
    """Weights of a checkpoint's magnitudes (2^-9 to 2^-3, either sign, any mantissa): six high
    bytes, so every chunk is coded (a trained model's 64-input chunks held at most 16 in all
    but 6 of 65664, kernels/README.md)."""
    gen = torch.Generator().manual_seed(seed)
    exponent = torch.randint(-9, -3, (n, k), generator=gen).float()
    mantissa = 1 + torch.randint(0, 128, (n, k), generator=gen) / 128
    sign = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
    return (sign * mantissa * torch.exp2(exponent)).bfloat16()


def _rows(rows: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, rows).unsqueeze(1)  # each row at its own scale
    return (torch.randn(rows, k, generator=gen) * scales).bfloat16()


def _same_bits(kernels: native.NativeKernels, weight: torch.Tensor, x: torch.Tensor,
               bias: torch.Tensor | None) -> None:  # fmt: skip
    n = weight.shape[0]
    plain = kernels.bf16_gemm(x, kernels.bf16_pack(weight, coded=False), n, bias)
    coded = kernels.bf16_gemm(x, kernels.bf16_coded_pack(weight), n, bias)
    assert torch.equal(coded.view(torch.int16), plain.view(torch.int16))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_coded_chunks_give_the_plain_layouts_bits(kernels, rows: int, n: int, k: int, bias: bool):
    weight = _trained_like(n, k, seed=n * k + rows)
    assert kernels.bf16_coded_layout(weight)[1] == 0  # no raw chunk: every one coded
    b = (torch.randn(n) * 3).bfloat16() if bias else None
    _same_bits(kernels, weight, _rows(rows, k, seed=rows), b)


@pytest.mark.parametrize("rows", [1, 5, 8, 13])
def test_raw_chunks_beside_coded_ones_give_the_plain_layouts_bits(kernels, rows: int):
    """Every high byte once in one place (256 of them: more than 16 in those chunks, kept raw):
    infinities, NaN, both zeros and subnormals among them; the other chunks coded."""
    n, k = 70, 300
    weight = _trained_like(n, k, seed=3).view(torch.int16)
    gen = torch.Generator().manual_seed(4)
    highs = torch.arange(256, dtype=torch.int32) << 8
    lows = torch.randint(0, 256, (256,), generator=gen, dtype=torch.int32)
    # Channels 0-31 and inputs 0-63: the first chunk of the first tile.
    weight[:16, :16] = ((highs | lows) - 65536 * (highs >= 32768)).to(torch.int16).reshape(16, 16)
    weight[40, 200:204] = torch.tensor([0x7F80, -128, 0x7FC1, 0x0001], dtype=torch.int32).to(
        torch.int16
    )  # +inf, -inf (0xFF80), a NaN and a subnormal in a chunk of the second tile
    weight = weight.view(torch.bfloat16)
    _, raw = kernels.bf16_coded_layout(weight)
    assert 1 <= raw < 10  # of 3 tiles x 5 chunks
    _same_bits(kernels, weight, _rows(rows, k, seed=rows), None)


def test_every_high_byte_as_a_code(kernels):
    """16 high bytes a chunk, the 256 of them across 16 chunks: all coded, every table entry
    used, and the same bits out."""
    n, k = 32, 16 * 64
    gen = torch.Generator().manual_seed(5)
    chunk = torch.arange(k) // 64  # the chunk of each input
    highs = (16 * chunk.unsqueeze(0) + torch.randint(0, 16, (n, k), generator=gen)) << 8
    bits = highs | torch.randint(0, 256, (n, k), generator=gen)
    weight = (bits - 65536 * (bits >= 32768)).to(torch.int16).view(torch.bfloat16)
    assert kernels.bf16_coded_layout(weight)[1] == 0
    _same_bits(kernels, weight, _rows(3, k, seed=6), None)


def test_the_coded_layout_is_taken_where_it_saves_bytes(kernels):
    trained = _trained_like(512, 576, seed=7)
    coded = kernels.bf16_pack(trained)
    plain = kernels.bf16_pack(trained, coded=False)
    assert coded.dtype == torch.uint8 and plain.dtype == torch.bfloat16
    assert coded.numel() < 0.76 * plain.numel() * 2  # 12 bits a weight and the chunk headers
    # Each high byte of its own in every chunk: raw everywhere, more bytes than plain.
    spread = (torch.randint(-32768, 32768, (64, 128), dtype=torch.int32)).to(torch.int16)
    spread = spread.view(torch.bfloat16)
    assert kernels.bf16_coded_layout(spread)[1] == 2 * 2
    assert kernels.bf16_pack(spread).dtype == torch.bfloat16


def test_the_module_serves_the_coded_layout_and_the_decode_step_reads_it(kernels):
    weight = _trained_like(200, 128, seed=8)
    bias = torch.randn(200).bfloat16()
    module = PackedLinear(weight, bias)
    assert module.backend == "cpu-native-bf16-gemm-coded"
    assert module.packed_bytes == module.native_packed.numel()  # uint8: bytes
    assert module.native_projection().kind == ProjectKind.BF16_CODED_GEMM
    x = _rows(6, 128, seed=9)
    plain = kernels.bf16_gemm(x, kernels.bf16_pack(weight, coded=False), 200, bias)
    assert torch.equal(module(x).view(torch.int16), plain.view(torch.int16))
