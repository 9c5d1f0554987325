"""Bit layouts: exact round trips and the documented byte positions."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels.packing import (
    compress_24,
    decompress_24,
    decompress_24_indices,
    pack_int3,
    pack_int4,
    unpack_int3,
    unpack_int4,
)

from .helpers import random_24


@pytest.mark.parametrize(("n", "k"), [(1, 2), (5, 64), (37, 136), (64, 576)])
def test_int4_round_trip_is_exact(n: int, k: int) -> None:
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n * k))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert torch.equal(unpack_int4(packed), codes.to(torch.uint8))


@pytest.mark.parametrize(("n", "k"), [(1, 8), (5, 64), (37, 136), (64, 576)])
def test_int3_round_trip_is_exact(n: int, k: int) -> None:
    codes = torch.randint(0, 8, (n, k), generator=torch.Generator().manual_seed(n + k))
    lo, hi = pack_int3(codes)
    assert lo.shape == (n, k // 4) and hi.shape == (n, k // 8)
    assert torch.equal(unpack_int3(lo, hi), codes.to(torch.uint8))


def test_documented_byte_positions() -> None:
    assert pack_int4(torch.tensor([[0x3, 0xA]])).tolist() == [[0xA3]]
    codes = torch.tensor([[1, 2, 3, 0, 7, 6, 5, 4]])
    lo, hi = pack_int3(codes)
    # low 2 bits: 1,2,3,0 | 3,2,1,0 at 2-bit steps; bit 2: codes 4..7 have it (k = 4, 5, 6, 7)
    assert lo.tolist() == [[1 | 2 << 2 | 3 << 4, 3 | 2 << 2 | 1 << 4]]
    assert hi.tolist() == [[0b11110000]]
    w = torch.tensor([[0.0, 5.0, 0.0, 6.0, 7.0, 0.0, 0.0, 0.0]])
    values, meta = compress_24(w)
    assert values.tolist() == [[5.0, 6.0, 7.0, 0.0]]
    # group 0 keeps (1, 3) -> 1 | 3 << 2 = 0xD; group 1 keeps (0, 1) -> 0 | 1 << 2 = 0x4
    assert meta.tolist() == [[0xD | 0x4 << 4]]


@pytest.mark.parametrize(("n", "k"), [(3, 4), (17, 100), (64, 576)])
def test_24_round_trip_is_exact(n: int, k: int) -> None:
    w = random_24(n, k, seed=k)
    values, meta = compress_24(w)
    assert values.shape == (n, k // 2) and meta.shape == (n, (k + 7) // 8)
    assert torch.equal(decompress_24(values, meta, k), w)
    idx = decompress_24_indices(meta, k)
    assert torch.equal(w.gather(1, idx), values)
    # kept positions are distinct and ascending within each group
    pos = (idx % 4).reshape(n, k // 4, 2)
    assert bool((pos[..., 0] < pos[..., 1]).all())


def test_packers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="even K"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_int4(torch.full((2, 4), 16))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_int3(torch.zeros(2, 12, dtype=torch.int32))
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        compress_24(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
