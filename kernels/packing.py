"""Bit packing for the low-bit and 2:4 formats. Every layout here is row-major along K.

4-bit codes: uint8 [N, K/2]; code k sits in byte k // 2 at bit 4 * (k % 2) (low nibble first).
3-bit codes: two bit planes, exactly 3 bits per weight, cheap to unpack in a kernel (no code
straddles a byte): `lo` uint8 [N, K/4] holds bits 0-1 of code k in byte k // 4 at bit 2 * (k % 4);
`hi` uint8 [N, K/8] holds bit 2 of code k in byte k // 8 at bit k % 8.
2:4 metadata: per group of 4 along K, the two kept positions i0 < i1 form a nibble i0 | i1 << 2
(the per-group encoding of NVIDIA's sparse tensor cores, without their tile reordering); group j
sits in byte j // 2 at bit 4 * (j % 2), so meta is uint8 [N, ceil(K/8)].
"""

from __future__ import annotations

import torch


def _check_codes(codes: torch.Tensor, bits: int) -> None:
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(
            f"{bits}-bit codes must lie in [0, {1 << bits}), "
            f"got range [{int(codes.min())}, {int(codes.max())}]"
        )


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] integer codes in [0, 16) -> uint8 [N, K/2]."""
    _check_codes(codes, 4)
    if codes.shape[1] % 2:
        raise ValueError(f"4-bit packing needs an even K, got K={codes.shape[1]}")
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> uint8 codes [N, K]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def pack_int3(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] integer codes in [0, 8) -> (lo uint8 [N, K/4], hi uint8 [N, K/8])."""
    _check_codes(codes, 3)
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"3-bit packing needs K divisible by 8, got K={k}")
    c = codes.to(torch.uint8)
    lo2 = (c & 3).reshape(n, k // 4, 4)
    lo = lo2[..., 0] | (lo2[..., 1] << 2) | (lo2[..., 2] << 4) | (lo2[..., 3] << 6)
    hi1 = (c >> 2).reshape(n, k // 8, 8)
    hi = torch.zeros(n, k // 8, dtype=torch.uint8, device=codes.device)
    for bit in range(8):
        hi |= hi1[..., bit] << bit
    return lo.contiguous(), hi.contiguous()


def unpack_int3(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(lo uint8 [N, K/4], hi uint8 [N, K/8]) -> uint8 codes [N, K]."""
    n = lo.shape[0]
    shifts2 = torch.arange(0, 8, 2, dtype=torch.uint8, device=lo.device)
    low = ((lo.unsqueeze(-1) >> shifts2) & 3).reshape(n, -1)
    shifts1 = torch.arange(8, dtype=torch.uint8, device=hi.device)
    high = ((hi.unsqueeze(-1) >> shifts1) & 1).reshape(n, -1)
    return low | (high << 2)


def compress_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] with at most 2 nonzeros per group of 4 along K -> (values [N, K/2], meta)."""
    if weight.dim() != 2:
        raise ValueError(f"2:4 weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs K divisible by 4, got K={k}")
    groups = weight.reshape(n, k // 4, 4)
    nonzero = groups != 0
    counts = nonzero.sum(-1)
    if bool((counts > 2).any()):
        bad = int((counts > 2).sum())
        raise ValueError(
            f"weight is not 2:4 sparse: {bad} of {counts.numel()} groups of 4 along K "
            "have more than 2 nonzeros"
        )
    # Prefer nonzero positions, then the lowest zero positions; keep them in ascending order.
    position = torch.arange(4, device=weight.device)
    score = nonzero.to(torch.int64) * 8 + (3 - position)
    keep = score.topk(2, dim=-1).indices.sort(dim=-1).values
    values = groups.gather(-1, keep).reshape(n, k // 2)
    nibble = (keep[..., 0] | (keep[..., 1] << 2)).to(torch.uint8)
    if nibble.shape[1] % 2:
        nibble = torch.cat((nibble, nibble.new_zeros(n, 1)), dim=1)
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def decompress_24_indices(meta: torch.Tensor, k: int) -> torch.Tensor:
    """meta uint8 [N, ceil(K/8)] -> int64 column index [N, K/2] of every kept value."""
    n = meta.shape[0]
    nibble = torch.stack((meta & 0x0F, meta >> 4), dim=-1).reshape(n, -1)[:, : k // 4]
    pos = torch.stack((nibble & 3, (nibble >> 2) & 3), dim=-1).to(torch.int64)
    base = torch.arange(0, k, 4, device=meta.device).reshape(1, -1, 1)
    return (base + pos).reshape(n, k // 2)


def decompress_24(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """(values [N, K/2], meta) -> dense [N, K] in values.dtype."""
    n = values.shape[0]
    nibble = torch.stack((meta & 0x0F, meta >> 4), dim=-1).reshape(n, -1)[:, : k // 4]
    # Scatter within each group of 4 (a 4-wide index per group): ~8x faster on CPU than selects
    # over the dense shape, and the int64 index covers only the kept half.
    pos = torch.stack((nibble & 3, nibble >> 2), dim=-1).to(torch.int64)
    dense = values.new_zeros(n, k // 4, 4)
    dense.scatter_(2, pos, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


def pack_24_blocks(
    values: torch.Tensor, meta: torch.Tensor, k: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, K/2], meta) -> the CPU 2:4 kernel's layout (cpu_sparse24.cpp): values
    [N/block][K/4][block][2] (a block's kept pairs side by side per group of 4 inputs) and codes
    uint8 [N/block][K/4][block/2], read as one block*4-bit word per group with channel c's nibble
    at bits 4c. Channels past N are zeros; `block` is 8 or 16."""
    if block not in (8, 16):
        raise ValueError(f"2:4 CPU blocks are 8 or 16 channels, not {block}")
    n = values.shape[0]
    groups = k // 4
    blocks = -(-n // block)
    padded = blocks * block
    nibble = torch.stack((meta & 0x0F, meta >> 4), dim=-1).reshape(n, -1)[:, :groups]
    vals = values.new_zeros(padded, groups, 2)
    vals[:n] = values.reshape(n, groups, 2)
    codes = nibble.new_zeros(padded, groups)
    codes[:n] = nibble
    vals = vals.reshape(blocks, block, groups, 2).transpose(1, 2).contiguous()
    codes = codes.reshape(blocks, block, groups).transpose(1, 2)
    words = (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()
    return vals, words
