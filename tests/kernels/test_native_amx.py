"""The GEMMs on AMX tiles, where the CPU has AMX. The bf16 GEMM (kernels/cpu_bf16_amx.h): against
fp64 and against the same GEMM's AVX-512 tiles (which test_native_bf16_gemm.py and
test_native_bf16_coded.py test on AVX-512 BF16 CPUs without AMX, and anywhere under
SLIMSERVE_CPU_AMX=0) at row counts around the 16-row
tiles and the 32-row pass, ragged N (lone last blocks), K off the tiles' 32 inputs (odd, short,
one), both layouts, several kernel threads, and values built to overflow fp32 or carry NaN. The
W8A16 GEMM's AMX-INT8 path (kernels/cpu_w8a16_gemm.cpp): bit for bit its VNNI tiles (exact int32
sums either way) from its 16 rows on, in three dtypes, with zero and NaN rows."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from slimserve.kernels import cpu_isa, native

from .helpers import AVX512_VNNI, cpu_has, rel_error

BF16_CPU = cpu_has(*AVX512_VNNI, "avx512_bf16") and cpu_isa.active() == cpu_isa.Isa.AVX512


def _amx_usable() -> bool:
    kernels = native.kernels() if BF16_CPU else None
    if kernels is None or not kernels.bf16_gemm_available:
        return False
    before = kernels.amx
    usable = kernels.set_amx(True)
    kernels.set_amx(before)
    return usable


needs_amx = pytest.mark.skipif(not _amx_usable(), reason="no AMX tiles usable here")

# (rows, N, K): below, at and past one 16-row tile and one 32-row pass; lone last blocks; K off
# 32 (odd, under one tile, one input); the default model's projections.
SHAPES = [
    (3, 48, 33),
    (5, 576, 576),
    (16, 960, 576),
    (17, 130, 99),
    (31, 576, 1536),
    (32, 3072, 576),
    (33, 200, 1),
    (70, 100, 640),
    (130, 48, 31),
]


@pytest.fixture
def kernels() -> Iterator[native.NativeKernels]:
    """The library; its AMX switch and threads restored after."""
    kernels = native.kernels()
    assert kernels is not None
    before, threads = kernels.amx, kernels.threads
    yield kernels
    kernels.set_amx(before)
    kernels.set_threads(threads)


def _products(kernels: native.NativeKernels, x, packed, n, bias, amx: bool) -> torch.Tensor:
    kernels.set_amx(amx)
    return kernels.bf16_gemm(x, packed, n, bias)


def _case(rows: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    bias = (torch.randn(n, generator=gen) * 3).bfloat16()
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-1, 1, rows).unsqueeze(1)).bfloat16()
    return weight, bias, x


def _within_rounding(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, k: int):
    """|out - ref| within one bf16 rounding of the result (2^-8 relative, above the half step)
    plus fp32 sums' rounding in any order ((k + 2) 2^-24 of the summed magnitudes)."""
    bound = 2.0**-8 * ref.abs() + (k + 2) * 2.0**-24 * magnitude
    return bool(((out.double() - ref).abs() <= bound).all())


@needs_amx
@pytest.mark.parametrize("coded", [False, True], ids=["plain", "coded"])
@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_matches_fp64_and_the_avx512_tiles(kernels, rows: int, n: int, k: int, coded: bool) -> None:
    weight, bias, x = _case(rows, n, k, seed=rows * n + k)
    packed = kernels.bf16_coded_pack(weight) if coded else kernels.bf16_pack(weight, coded=False)
    amx = _products(kernels, x, packed, n, bias, amx=True)
    avx512 = _products(kernels, x, packed, n, bias, amx=False)
    ref = x.double() @ weight.double().t() + bias.double()
    magnitude = x.double().abs() @ weight.double().abs().t() + bias.double().abs()
    # The same fp32 products as the AVX-512 tiles', summed in the hardware's order.
    assert _within_rounding(amx, ref, magnitude, k)
    assert _within_rounding(avx512, ref, magnitude, k)
    for row in range(rows):  # each row at its own scale
        assert rel_error(amx[row], ref[row]) < 4e-3, row


@needs_amx
def test_both_layouts_and_any_threads_give_the_same_bits(kernels) -> None:
    weight, bias, x = _case(37, 200, 130, seed=5)
    plain = kernels.bf16_pack(weight, coded=False)
    coded = kernels.bf16_coded_pack(weight)
    kernels.set_threads(1)
    first = _products(kernels, x, plain, 200, bias, amx=True)
    for threads in (1, 2, 3):
        kernels.set_threads(threads)
        for packed in (plain, coded):
            again = _products(kernels, x, packed, 200, bias, amx=True)
            assert torch.equal(again.view(torch.int16), first.view(torch.int16)), threads


@needs_amx
def test_overflow_and_nan_come_out_as_on_the_avx512_tiles(kernels) -> None:
    n, k, rows = 64, 96, 20
    weight = torch.full((n, k), 2.0**100).bfloat16()
    weight[1::2] = -(2.0**100)  # odd channels negative: -inf
    weight[2] = 1.0  # a finite channel: 96 products of 1 x 2^100 stay finite
    x = torch.full((rows, k), 2.0**100).bfloat16()
    x[3, 5] = float("nan")  # row 3: NaN in every channel
    x[4] = 0.0  # row 4: zero (0 x 2^100 is 0, not NaN)
    packed = kernels.bf16_pack(weight, coded=False)
    amx = _products(kernels, x, packed, n, None, amx=True)
    avx512 = _products(kernels, x, packed, n, None, amx=False)
    assert torch.isinf(amx[0, 0]) and amx[0, 0] > 0 and torch.isinf(amx[0, 1]) and amx[0, 1] < 0
    assert torch.isfinite(amx[0, 2])
    assert torch.isnan(amx[3]).all()
    assert (amx[4] == 0).all()
    assert torch.equal(torch.isnan(amx), torch.isnan(avx512))
    finite = ~torch.isnan(amx)
    assert torch.equal(amx[finite], avx512[finite])


def test_slimserve_cpu_amx_0_keeps_our_kernels_off_the_tiles() -> None:
    """Run in a fresh process: the library turns AMX on (or not) when it loads."""
    code = (
        "from slimserve.kernels import cpu_isa, native\n"
        "k = native.kernels()\n"
        "print(cpu_isa.has_amx(), k is not None and k.amx)\n"
    )
    env = {**os.environ, cpu_isa.AMX_ENV: "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]
    if _amx_usable():  # and on by default where the tiles are usable
        env.pop(cpu_isa.AMX_ENV)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == ["True", "True"]


# (M, N, K) from the W8A16 GEMM's 16 rows on: whole and partial 16-row tiles, a lone last block,
# K off 4, under one tile's 64 inputs, and past the int8 tiles' 64 in a ragged last group.
W8A16_SHAPES = [(16, 64, 64), (17, 40, 130), (32, 3072, 576), (33, 576, 1536), (100, 50, 7)]
W8A16_SHAPES += [(300, 24, 77)]


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "n", "k"), W8A16_SHAPES)
def test_w8a16_on_amx_is_its_vnni_tiles_bit_for_bit(kernels, rows, n, k, dtype) -> None:
    gen = torch.Generator().manual_seed(rows * n + k)
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.02 + 1e-3
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-1, 1, rows).unsqueeze(1)).to(dtype)
    x[2] = 0.0  # a zero row: scale 0, outputs 0
    x[5, k // 2] = float("nan")  # a row with NaN: NaN outputs
    packed = kernels.w8a8_pack(qweight)
    kernels.set_threads(2)
    kernels.set_amx(False)
    vnni = kernels.w8a16_gemm(x, packed, scale)
    kernels.set_amx(True)
    amx = kernels.w8a16_gemm(x, packed, scale)
    assert torch.isnan(amx[5]).all() and (amx[2] == 0).all()
    assert torch.equal(torch.isnan(amx), torch.isnan(vnni))
    assert torch.equal(amx.nan_to_num(0.0), vnni.nan_to_num(0.0))
