"""Fresh random compressed weights and fp64 references shared by the kernel tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from slimserve.kernels.packing import compress_24


def random_lowbit(
    n: int, k: int, bits: int, group_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K] int32, scales [N, G], zeros [N, G]) with nonzero, non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    g = k // group_size
    scales = torch.rand(n, g, generator=gen) * 0.05 + 0.01
    # Integer zeros spread over the code range, plus some fractional ones (AWQ-style).
    zeros = torch.randint(0, 1 << bits, (n, g), generator=gen).float()
    zeros += (torch.rand(n, g, generator=gen) < 0.3) * 0.5
    return codes, scales, zeros


def lowbit_weight_fp64(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    s = scales.double().repeat_interleave(group_size, dim=1)
    z = zeros.double().repeat_interleave(group_size, dim=1)
    return (codes.double() - z) * s


def random_24(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Dense fp32 [N, K] with exactly 2 nonzeros in every group of 4 (a few with only 1)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    groups = w.reshape(n, k // 4, 4)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    single = torch.rand(n, k // 4, generator=gen) < 0.1
    first = torch.zeros_like(mask).scatter_(-1, keep[..., :1], True)
    mask = torch.where(single.unsqueeze(-1), first, mask)
    out = (groups * mask).reshape(n, k)
    assert compress_24(out)[0].shape == (n, k // 2)
    return out


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: a scale-free bound that ragged/small outputs cannot dodge."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def fp32_sum_rounding(k: int) -> float:
    """What an fp32 sum of k products may be off by relative to its scale, in any order:
    rounding errors adding up as a random walk, sqrt(k) units of 2^-24. How far below that a
    BLAS comes depends on its blocking, which differs by library and CPU (torch's dense fp32
    matmul came 5x closer than our 2:4 kernel on an Intel CPU with AMX, within 4x on an AMD
    Zen 4), so no test asks a kernel to match a library's error below this floor."""
    return math.sqrt(k) * 2.0**-24


def cpu_has(*flags: str) -> bool:
    """Whether /proc/cpuinfo lists every flag (read independently of the code under test)."""
    info = Path("/proc/cpuinfo")
    words = set(info.read_text().split()) if info.exists() else set()
    return all(flag in words for flag in flags)


AVX512_VNNI = ("avx512bw", "avx512vl", "avx512_vnni")
