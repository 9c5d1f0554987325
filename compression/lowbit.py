"""Building kernel modules from group-quantized weights."""

from __future__ import annotations

import torch
from torch import nn

from .grid import GroupQuant


def split_rows(quant: GroupQuant, sizes: list[int]) -> list[GroupQuant]:
    """Cut a quantized stack of Linears (rows concatenated) back into one per Linear."""
    parts = zip(
        quant.codes.split(sizes), quant.scales.split(sizes), quant.zeros.split(sizes), strict=True
    )
    return [GroupQuant(c, s, z, quant.group_size, quant.bits) for c, s, z in parts]


def lowbit_linear(
    quant: GroupQuant, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> nn.Module:
    from slimserve.kernels import LowBitLinear

    return LowBitLinear.from_codes(
        quant.codes,
        quant.scales,
        quant.zeros,
        group_size=quant.group_size,
        bits=quant.bits,
        bias=bias,
        compute_dtype=compute_dtype,
    )


def relative_output_error(
    weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor
) -> float:
    """||(W - Ŵ) X^T||² / ||W X^T||² over the calibration inputs, from H = E[x x^T]."""
    w = weight.detach().float()
    diff = approx.detach().float() - w
    return float(output_error(diff, hessian) / output_error(w, hessian).clamp(min=1e-20))


def output_error(diff: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """tr(D H Dᵀ): the summed squared output error of a weight error D over the inputs.

    The product runs in bfloat16 (several times faster than fp32 on CPU); it ranks candidate
    weights and reports errors, where a relative error of ~1e-3 does not matter.
    """
    product = diff.to(torch.bfloat16) @ hessian.to(torch.bfloat16)
    return (product.float() * diff).sum()
