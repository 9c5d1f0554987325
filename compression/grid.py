"""Group-wise asymmetric integer grids: the shared quantizer of RTN, GPTQ, AWQ and GOBO.

A weight [N, K] is cut into groups of `group_size` consecutive input features per output row.
Each group has a scale and an integer zero point (in code units), so that
W ≈ (codes - zeros) * scales with codes in [0, 2**bits). Integer zero points keep the result
exportable to the usual GPTQ / AWQ checkpoint layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupQuant:
    """Codes [N, K] (uint8), scales and zeros [N, K // group_size] (fp32)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size)


def qmax(bits: int) -> int:
    return 2**bits - 1


def group_params(
    w: torch.Tensor,
    bits: int,
    clip: torch.Tensor | float | None = None,
    integer_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for the last dim of `w` [..., g] from its (optionally shrunk) min and max.

    `clip` (broadcastable to [..., 1]) shrinks the range toward zero: AWQ's clipping search.
    `integer_zero=False` keeps the zero point fractional, so the grid starts exactly at the
    minimum (as GGUF's Q4_1 does); the kernels accept it, the usual export formats do not.
    """
    w = w.float()
    wmax = w.amax(dim=-1, keepdim=True)
    wmin = w.amin(dim=-1, keepdim=True)
    if clip is not None:
        wmax = wmax * clip
        wmin = wmin * clip
    top = qmax(bits)
    scale = ((wmax - wmin) / top).clamp(min=1e-8)
    zero = -wmin / scale
    return scale, (torch.round(zero).clamp(0, top) if integer_zero else zero)


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes of `w` on a given grid (scale / zero broadcast against w)."""
    return torch.clamp(torch.round(w.float() / scale + zero), 0, qmax(bits))


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Quantize then de-quantize, in fp32."""
    return (quantize_with(w, scale, zero, bits) - zero) * scale


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide in-features {k}")
    return w.reshape(n, k // group_size, group_size)


def quantize_groups(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    clip: torch.Tensor | None = None,
    integer_zero: bool = True,
) -> GroupQuant:
    """Round-to-nearest on a min-max grid per group. `clip`: [N, K // group_size] range ratios."""
    grouped = _grouped(w.float(), group_size)
    clip = None if clip is None else clip.unsqueeze(-1)
    scale, zero = group_params(grouped, bits, clip, integer_zero)
    codes = quantize_with(grouped, scale, zero, bits)
    n, k = w.shape
    return GroupQuant(
        codes=codes.reshape(n, k).to(torch.uint8),
        scales=scale.squeeze(-1),
        zeros=zero.squeeze(-1),
        group_size=group_size,
        bits=bits,
    )


def fake_quantize_groups(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    clip: torch.Tensor | None = None,
    integer_zero: bool = True,
) -> torch.Tensor:
    """De-quantized RTN weight [N, K] in fp32 (search loops use this; no codes kept)."""
    grouped = _grouped(w.float(), group_size)
    clip = None if clip is None else clip.unsqueeze(-1)
    scale, zero = group_params(grouped, bits, clip, integer_zero)
    return fake_quantize(grouped, scale, zero, bits).reshape(w.shape)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    n, k = codes.shape
    grouped = codes.float().reshape(n, k // group_size, group_size)
    return ((grouped - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(n, k)


def search_clip(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    grid: int,
    max_shrink: float,
    integer_zero: bool = True,
) -> torch.Tensor:
    """Per (row, group) range ratio in (1 - max_shrink, 1] minimising that group's share of the
    output error, d_gᵀ H_gg d_g (the diagonal block of H; cross-group terms are left out)."""
    w = weight.float()
    n, k = w.shape
    groups = k // group_size
    blocks = torch.stack(
        [hessian[i : i + group_size, i : i + group_size] for i in range(0, k, group_size)]
    )  # [G, g, g]
    best_err = torch.full((n, groups), float("inf"))
    best = torch.ones(n, groups)
    for step in range(max(1, int(max_shrink * grid))):
        ratio = 1.0 - step / grid
        clip = torch.full((n, groups), ratio)
        approx = fake_quantize_groups(w, bits, group_size, clip, integer_zero)
        diff = (approx - w).reshape(n, groups, group_size)
        per_group = diff.transpose(0, 1)  # [G, N, g]
        err = (torch.bmm(per_group, blocks) * per_group).sum(-1).t()  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    return best
