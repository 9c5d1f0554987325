"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the columns not yet quantized through the inverse Hessian of the layer's
calibration inputs, with lazy block updates.

Groups stay contiguous in the original column order (what the low-bit kernel reads). Without
act-order, a group's grid comes from the error-updated weights when its first column is
reached; with act-order (columns by decreasing Hessian diagonal), grids are fixed up front from
the original weights ("static groups"), since a group's columns are then visited out of order.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from .arch import InputGroup, set_submodule
from .calib_data import calibration_ids
from .grid import GroupQuant, group_params, quantize_with, search_clip
from .hooks import InputStats, input_stats
from .layerwise import run_layerwise
from .lowbit import lowbit_linear, relative_output_error, split_rows
from .methods.gptq import GPTQSpec
from .report import MethodReport, resident_weight_bytes

log = logging.getLogger(__name__)


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; more damping if H is still singular."""
    k = hessian.shape[0]
    eye = torch.eye(k, dtype=hessian.dtype)
    mean_diag = hessian.diagonal().mean()
    for attempt in range(6):
        damped = hessian + (damp * 10**attempt) * mean_diag * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise ValueError("the calibration Hessian is not positive definite even with damping")


def _group_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    clip_grid: int | None,
    max_shrink: float,
    integer_zero: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros [N, K // group_size] of whole groups of `weight` [N, K]."""
    n = weight.shape[0]
    clip = None
    if clip_grid:
        clip = search_clip(weight, hessian, bits, group_size, clip_grid, max_shrink, integer_zero)
        clip = clip.unsqueeze(-1)
    s, z = group_params(weight.reshape(n, -1, group_size), bits, clip, integer_zero)
    return s.squeeze(-1), z.squeeze(-1)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_grid: int | None = None,
    max_shrink: float = 0.5,
    integer_zero: bool = True,
) -> GroupQuant:
    """weight [N, K], hessian [K, K] = E[x x^T] of the inputs -> codes on a group grid.

    `clip_grid`: search each group's range (as AWQ does) on `clip_grid` steps down to
    1 - max_shrink, for the output error on the inputs, instead of taking the plain min-max.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    n, k = w.shape
    dead = h.diagonal() == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    def grid(block: torch.Tensor, h_block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _group_grid(block, h_block, bits, group_size, clip_grid, max_shrink, integer_zero)

    scales = torch.zeros(n, k // group_size)
    zeros = torch.zeros(n, k // group_size)
    perm = None
    if act_order:
        scales, zeros = grid(w, h)  # static groups, from the original weights
        perm = torch.argsort(h.diagonal(), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    else:
        # Whole groups per block, so a group's grid sees all of its block's updates.
        block_size = group_size * math.ceil(block_size / group_size)
    hinv = _inverse_hessian_factor(h, damp)
    order = perm.tolist() if perm is not None else list(range(k))

    codes = torch.zeros(n, k)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w_block = w[:, start:end].clone()
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = order[start + i]
            group = column // group_size
            if perm is None and column % group_size == 0:
                cols = slice(column, column + group_size)
                s, z = grid(w_block[:, i : i + group_size], h[cols, cols])
                scales[:, group], zeros[:, group] = s[:, 0], z[:, 0]
            scale, zero = scales[:, group], zeros[:, group]
            q = quantize_with(w_block[:, i], scale, zero, bits)
            codes[:, start + i] = q
            err = (w_block[:, i] - (q - zero) * scale) / hinv_block[i, i]
            w_block[:, i:].addr_(err, hinv_block[i, i:], alpha=-1.0)
            err_block[:, i] = err
        w[:, end:].addmm_(err_block, hinv[start:end, end:], alpha=-1.0)

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return GroupQuant(codes.to(torch.uint8), scales, zeros, group_size, bits)


def apply_gptq(
    model: nn.Module, spec: GPTQSpec, calibration: torch.Tensor | None = None
) -> MethodReport:
    """`calibration`: token ids [n, seq_len] to use instead of spec.calibration's text."""
    spec.check_model(model.config)  # a clear error before any work, not a kernel's
    started = time.perf_counter()
    before = resident_weight_bytes(model)
    # The first windows (not spread): the calibration the README's quality table measured.
    ids = (
        calibration
        if calibration is not None
        else calibration_ids(model, spec.calibration, pick="first")
    )
    errors: dict[str, list[float]] = {}
    replaced = 0

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        nonlocal replaced
        for group in groups:
            hessian = stats[group.name].hessian
            stacked = torch.cat([linear.weight for _, linear in group.linears])
            quant = gptq_quantize(
                stacked,
                hessian,
                spec.bits,
                spec.group_size,
                spec.damp,
                spec.block_size,
                spec.act_order,
                spec.clip_grid if spec.clip else None,
                spec.max_shrink,
                spec.zero_point == "integer",
            )
            errors.setdefault(group.name, []).append(
                relative_output_error(stacked, quant.dequantize(), hessian)
            )
            sizes = [linear.out_features for _, linear in group.linears]
            for (name, linear), part in zip(group.linears, split_rows(quant, sizes), strict=True):
                set_submodule(model, name, lowbit_linear(part, linear.bias, linear.weight.dtype))
                replaced += 1

    run_layerwise(
        model,
        ids,
        input_stats(gram="input"),
        process,
        skip=spec.skip,
        propagate="processed",  # each layer calibrates on the quantized layers before it
        desc=f"gptq w{spec.bits}g{spec.group_size}",
    )
    return MethodReport(
        method=spec.method,
        spec=spec.model_dump(),
        modules_replaced=replaced,
        seconds=time.perf_counter() - started,
        bytes_before=before,
        bytes_after=resident_weight_bytes(model),
        detail={
            "calibration_tokens": int(ids.numel()),
            "relative_output_error": {g: sum(v) / len(v) for g, v in errors.items()},
        },
    )
