"""slimserve's own 2:4 sparse GEMMs (kernels/cpu_sparse24.cpp), fp32 at every ISA level and bf16
with AVX-512 BF16: against fp64 on fresh random 2:4 weights at decode and prompt row counts,
ragged N (lone last blocks) and K down to one group of 4, within the error torch's dense matmul
of the same weight has (or an fp32 sum's rounding, where that is larger); sums that overflow to
inf as the dense matmul's do; inputs at pruned positions never read; the packed SparseLinear
serving every row count from it and dropping its plain buffers."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import cpu_isa, native
from slimserve.kernels.decode_step import ProjectKind
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.packing import compress_24, pack_24_blocks
from slimserve.kernels.sparse24 import SparseLinear

from .helpers import AVX512_VNNI, cpu_has, fp32_sum_rounding, random_24, rel_error

BF16_CPU = cpu_has(*AVX512_VNNI, "avx512_bf16") and cpu_isa.active() == cpu_isa.Isa.AVX512
needs_bf16 = pytest.mark.skipif(not BF16_CPU, reason="no AVX-512 BF16 at this ISA level")

# (rows, N, K): the default model's MLP shapes at decode rows, a prompt chunk, lone last blocks
# (N % 8, N % 16), one group of 4, an odd number of groups.
SHAPES = [
    (1, 1536, 576),
    (8, 576, 1536),
    (32, 576, 576),
    (300, 40, 64),
    (5, 33, 12),
    (3, 7, 4),
    (17, 9, 20),
]


def _case(rows: int, n: int, k: int, dtype: torch.dtype, seed: int):
    weight = random_24(n, k, seed=seed).to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=gen) * torch.logspace(-1, 1, rows).unsqueeze(1)
    return weight, x.to(dtype)


def _packed(weight: torch.Tensor) -> SparseLinear:
    module = SparseLinear.from_dense(weight, None, weight.dtype)
    assert module.pack_for_cpu() > 0
    return module


@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_fp32_matches_fp64_as_closely_as_the_dense_matmul(
    each_isa: cpu_isa.Isa, rows: int, n: int, k: int
) -> None:
    weight, x = _case(rows, n, k, torch.float32, seed=rows * n + k)
    ours = _packed(weight)(x)
    assert "cpu-native-sparse24" in chosen_backends()["sparse24"]
    assert ours.shape == (rows, n) and ours.dtype == torch.float32
    theirs = x @ weight.t()
    ref = x.double() @ weight.double().t()
    for row in range(rows):  # each row at its own scale
        ours_error = rel_error(ours[row], ref[row])
        assert ours_error < 1e-5, row
        bar = max(4 * rel_error(theirs[row], ref[row]), fp32_sum_rounding(k))
        assert ours_error <= bar, row


@needs_bf16
@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_bf16_matches_fp64_within_its_output_rounding(rows: int, n: int, k: int) -> None:
    weight, x = _case(rows, n, k, torch.bfloat16, seed=rows * n + k)
    module = _packed(weight)
    if module.cpu_values.dtype == torch.bfloat16:  # the blocks as they are
        assert module.cpu_values.shape == (-(-n // 16), k // 4, 16, 2)
    else:  # or their coded layout, where it saves bytes (the coded test below)
        assert module.cpu_values.dtype == torch.uint8 and module.cpu_codes is None
    ours = module(x)
    assert ours.dtype == torch.bfloat16
    ref = x.double() @ weight.double().t()
    theirs = x @ weight.t()
    for row in range(rows):
        # fp32 sums of exact bf16 products, one bf16 rounding (2^-9 relative), as the dense path.
        ours_error = rel_error(ours[row], ref[row])
        assert ours_error < 4e-3, row
        assert ours_error <= 2 * rel_error(theirs[row], ref[row]) + 1e-6, row


def _checkpoint_magnitudes(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """The kept weights at a checkpoint's magnitudes (2^-9 to 2^-3, any mantissa, their signs):
    few high bytes, so every chunk of the coded layout is coded."""
    gen = torch.Generator().manual_seed(seed)
    exponent = torch.randint(-9, -3, weight.shape, generator=gen).float()
    return weight.sign() * (1 + torch.rand(weight.shape, generator=gen)) * torch.exp2(exponent)


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)  # NaN and -0.0 compared exactly


@needs_bf16
@pytest.mark.parametrize("spread", [False, True], ids=["checkpoint-like", "any-bits"])
@pytest.mark.parametrize(("rows", "n", "k"), [*SHAPES, (9, 50, 400)])
def test_bf16_coded_layout_gives_the_blocks_bits(rows: int, n: int, k: int, spread: bool):
    """The coded layout (cpu_bf16_coded.h) is lossless: the blocks' kernel's bits at every
    shape, on a checkpoint's magnitudes (every chunk coded) and on values whose high bytes take
    any of the 256 (raw chunks: bf16's extremes, inf, NaN and zeros among them)."""
    weight, x = _case(rows, n, k, torch.float32, seed=n + k + rows)
    if spread:
        gen = torch.Generator().manual_seed(n)
        weight *= torch.exp2(torch.randint(-60, 60, weight.shape, generator=gen).float())
        extremes = torch.tensor([3.3895e38, -3.3895e38, float("inf"), float("nan"), -0.0])
        kept = weight.reshape(-1).ne(0).nonzero()[: extremes.numel(), 0]
        weight.view(-1)[kept] = extremes[: kept.numel()]
    else:
        weight = _checkpoint_magnitudes(weight, seed=n)
    values, meta = compress_24(weight.bfloat16())
    blocks, codes = pack_24_blocks(values, meta, k, native.SPARSE24_BLOCKS[torch.bfloat16])
    kernels = native.kernels()
    coded = kernels.sparse24_coded_pack(blocks, codes, n, k, always=True)
    plain = blocks.numel() * 2 + codes.numel()
    if n >= 32 and k >= 128:  # past a tile's padding and a chunk's header
        # Raw chunks take more than the blocks; coded ones 0.78 of them.
        assert coded.numel() > plain if spread else coded.numel() < 0.8 * plain
    x = x.bfloat16()
    ours = kernels.sparse24_gemm(x, coded, None, n)
    assert torch.equal(_bits16(ours), _bits16(kernels.sparse24_gemm(x, blocks, codes, n)))


@needs_bf16
def test_a_pruned_checkpoint_serves_the_coded_layout():
    weight, x = _case(6, 96, 256, torch.float32, seed=11)
    module = _packed(_checkpoint_magnitudes(weight, seed=12).bfloat16())
    assert module.cpu_values.dtype == torch.uint8 and module.cpu_codes is None
    blocks = 6 * 64 * 16 * 2 * 2 + 6 * 64 * 8  # 16-channel blocks: values + 64-bit codes
    assert module.pack_for_cpu() == module.cpu_values.numel() < 0.8 * blocks
    assert module.native_projection().kind == ProjectKind.SPARSE24_CODED
    out = module(x.bfloat16())
    assert "cpu-native-sparse24-coded" in chosen_backends()["sparse24"]
    assert "packed for cpu-native-sparse24-coded" in repr(module)
    assert out.shape == (6, 96) and out.dtype == torch.bfloat16


def _dtypes_here() -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if BF16_CPU else [torch.float32]


@pytest.mark.parametrize("dtype", _dtypes_here())
def test_sums_that_overflow_give_inf_as_the_dense_matmul_does(dtype: torch.dtype) -> None:
    """Largest finite weights times inputs of 2: each product is finite in fp32, their sum is
    not; the signs make one channel +inf and another -inf, a third keeps a finite sum."""
    n, k = 3, 16
    big = torch.finfo(dtype).max
    weight = torch.zeros(n, k)
    weight[0, 0::4] = big
    weight[0, 1::4] = big
    weight[1, 2::4] = -big
    weight[2, 3::4] = 1.0
    weight = weight.to(dtype)
    x = torch.full((2, k), 2.0, dtype=dtype)
    ours = _packed(weight)(x).float()
    assert ours[:, 0].eq(float("inf")).all() and ours[:, 1].eq(float("-inf")).all()
    assert ours[:, 2].eq(8.0).all()


@pytest.mark.parametrize("dtype", _dtypes_here())
def test_inputs_at_pruned_positions_are_never_read(dtype: torch.dtype) -> None:
    """A 2:4 weight has no entry where it was pruned: NaN and inf there do not reach the output
    (a dense matmul with zeros would give NaN), while NaN at a kept position does."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 32, generator=gen)
    weight[:, 3::4] = 0  # input 4g + 3: pruned in every channel
    weight[:12, 2::4] = 0
    weight[12:, 1::4] = 0
    weight = weight.to(dtype)
    x = torch.randn(4, 32, generator=gen).to(dtype)
    module = _packed(weight)
    clean = module(x)
    kept = weight.ne(0).any(0)
    poisoned = x.clone()
    poisoned[:, ~kept] = float("nan")
    poisoned[0, ~kept] = float("inf")
    torch.testing.assert_close(module(poisoned), clean, rtol=0, atol=0)
    poisoned[1, kept.nonzero()[0]] = float("nan")
    out = module(poisoned)
    assert out[1].isnan().any() and not out[[0, 2, 3]].isnan().any()


def test_the_packed_module_drops_its_plain_buffers_and_takes_any_leading_shape(
    each_isa: cpu_isa.Isa,
) -> None:
    weight, x = _case(12, 40, 64, torch.float32, seed=5)
    module = SparseLinear.from_dense(weight, torch.arange(40.0), torch.float32)
    unpacked = module(x)
    held = module.pack_for_cpu()
    assert held == 5 * 16 * 8 * 2 * 4 + 5 * 16 * 4  # 5 blocks of 8: values + 32-bit codes
    assert module.pack_for_cpu() == held  # once
    assert module.values.numel() == 0 and module.meta_bits.numel() == 0
    assert "packed for cpu-native-sparse24" in repr(module)
    flat = module(x)
    torch.testing.assert_close(flat, unpacked, rtol=1e-6, atol=1e-5)  # the bias added once
    torch.testing.assert_close(module(x.reshape(3, 4, 64)), flat.reshape(3, 4, 40), rtol=0, atol=0)
    wide = torch.cat([x, x], dim=1)[:, :64]  # rows 128 elements apart
    torch.testing.assert_close(module(wide), flat, rtol=0, atol=0)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # NaN and -0.0 compared exactly


@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_values_kept_as_bf16_numbers_are_bit_identical_to_fp32_values(
    each_isa: cpu_isa.Isa, rows: int, n: int, k: int
) -> None:
    """Kept values that are bf16 numbers (a bf16 checkpoint pruned and served in fp32) are read
    from bf16 and give the fp32-stored kernel's results bit for bit: random ones, and bf16's
    extremes among them (the largest and smallest normal magnitudes, inf, signed zeros), whose
    products overflow to inf and NaN or fall below fp32's range."""
    weight, x = _case(rows, n, k, torch.float32, seed=rows + n * k)
    weight = weight.bfloat16().float()
    extremes = torch.tensor([3.3895e38, -3.3895e38, 1.1755e-38, -0.0, float("inf")])
    kept = weight.reshape(-1).ne(0).nonzero()[: extremes.numel(), 0]
    weight.view(-1)[kept] = extremes.bfloat16().float()[: kept.numel()]
    values, meta = compress_24(weight)
    wide, codes = pack_24_blocks(values, meta, k, native.SPARSE24_BLOCKS[torch.float32])
    assert native.is_bf16_exact(wide)
    narrow = native.bf16_high_halves(wide)
    assert torch.equal(_bits(narrow.float()), _bits(wide))  # the same numbers, half the bytes
    kernels = native.kernels()
    ours = kernels.sparse24_gemm(x, narrow, codes, n)
    assert torch.equal(_bits(ours), _bits(kernels.sparse24_gemm(x, wide, codes, n)))
    module = _packed(weight)
    assert module.cpu_values.dtype == torch.bfloat16
    assert torch.equal(_bits(module(x)), _bits(ours))
    assert "cpu-native-sparse24-bf16-values" in chosen_backends()["sparse24"]
    assert "packed for cpu-native-sparse24-bf16-values" in repr(module)


def test_what_does_not_pack_stays_on_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 never packs; bf16 needs AVX-512 BF16, so the avx2 build leaves it unpacked."""
    weight, x = _case(2, 16, 16, torch.float16, seed=7)
    half = SparseLinear.from_dense(weight, None, torch.float16)
    assert half.pack_for_cpu() == 0 and half.cpu_values is None
    if not cpu_has("avx2", "fma", "f16c"):
        return
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx2")
    cpu_isa.active.cache_clear()
    try:
        assert not native.kernels().bf16_gemm_available
        bf16 = SparseLinear.from_dense(weight.bfloat16(), None, torch.bfloat16)
        assert bf16.pack_for_cpu() == 0 and bf16.cpu_values is None
        assert bf16(x.bfloat16()).shape == (2, 16)
    finally:
        monkeypatch.undo()
        cpu_isa.active.cache_clear()


def test_block_layout_places_each_channel_code_at_its_nibble() -> None:
    weight = random_24(20, 12, seed=9)
    values, meta = compress_24(weight)
    packed, codes = pack_24_blocks(values, meta, 12, 16)
    assert packed.shape == (2, 3, 16, 2) and codes.shape == (2, 3, 8)
    words = codes.view(torch.int64).reshape(2, 3)  # little-endian: channel c at bits 4c
    for channel in range(20):
        block, lane = divmod(channel, 16)
        for group in range(3):
            nibble = int(words[block, group]) >> (4 * lane) & 0xF
            lo, hi = nibble & 3, nibble >> 2
            kept = weight[channel, 4 * group : 4 * group + 4]
            assert packed[block, group, lane].tolist() == [kept[lo].item(), kept[hi].item()]
    assert packed[1, :, 4:].eq(0).all() and codes[1, :, 2:].eq(0).all()  # channels past N
    with pytest.raises(ValueError, match="8 or 16"):
        pack_24_blocks(values, meta, 12, 4)
