"""Group-wise asymmetric integer grids: the shared quantizer of RTN, GPTQ, AWQ and GOBO.

A weight [N, K] is cut into groups of `group_size` consecutive input features per output row.
Each group has a scale and an integer zero point (in code units), so that
W ≈ (codes - zeros) * scales with codes in [0, 2**bits). Integer zero points keep the result
exportable to the usual GPTQ / AWQ checkpoint layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_LOWBIT = (3, 4)


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
    w: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for the last dim of `w` [..., g] from its (optionally shrunk) min and max.

    `clip` (broadcastable to [..., 1]) shrinks the range toward zero: AWQ's clipping search.
    """
    w = w.float()
    wmax = w.amax(dim=-1, keepdim=True)
    wmin = w.amin(dim=-1, keepdim=True)
    if clip is not None:
        wmax = wmax * clip
        wmin = wmin * clip
    top = qmax(bits)
    scale = ((wmax - wmin) / top).clamp(min=1e-8)
    zero = torch.round(-wmin / scale).clamp(0, top)
    return scale, zero


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes of `w` on a given grid (scale / zero broadcast against w)."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, qmax(bits))


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
) -> GroupQuant:
    """Round-to-nearest on a min-max grid per group. `clip`: [N, K // group_size] range ratios."""
    grouped = _grouped(w.float(), group_size)
    scale, zero = group_params(grouped, bits, None if clip is None else clip.unsqueeze(-1))
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
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | None = None
) -> torch.Tensor:
    """De-quantized RTN weight [N, K] in fp32 (search loops use this; no codes kept)."""
    grouped = _grouped(w.float(), group_size)
    scale, zero = group_params(grouped, bits, None if clip is None else clip.unsqueeze(-1))
    return fake_quantize(grouped, scale, zero, bits).reshape(w.shape)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    n, k = codes.shape
    grouped = codes.float().reshape(n, k // group_size, group_size)
    return ((grouped - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(n, k)


def packed_bytes(n: int, k: int, bits: int, group_size: int, param_bytes: int = 2) -> int:
    """Ideal storage of a low-bit weight (codes packed, one scale and zero per group)."""
    return n * k * bits // 8 + 2 * n * (k // group_size) * param_bytes
