"""Magnitude pruning: zero the smallest |W|, per layer, globally, or N:M."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import block_linears
from .methods.magnitude import MagnitudeSpec
from .nm_sparsity import matrix_mask, nm_mask, pack_2_4
from .pruning_report import ReportTimer, zero_fraction
from .report import MethodReport


def _global_threshold_masks(linears: dict[str, nn.Linear], sparsity: float) -> None:
    """One |W| threshold over every target; exact count via kthvalue plus tie handling."""
    magnitudes = torch.cat(
        [lin.weight.detach().abs().float().reshape(-1) for lin in linears.values()]
    )
    k = round(sparsity * magnitudes.numel())
    if k == 0:
        return
    threshold = magnitudes.kthvalue(k).values
    # Weights strictly below the threshold go; ties at it go in order until k are removed.
    below = int((magnitudes < threshold).sum())
    ties_left = k - below
    del magnitudes
    for linear in linears.values():
        weight = linear.weight.data
        magnitude = weight.abs().float()
        mask = magnitude < threshold
        if ties_left > 0:
            tie_index = (magnitude == threshold).reshape(-1).nonzero().squeeze(1)[:ties_left]
            mask.view(-1)[tie_index] = True
            ties_left -= tie_index.numel()
        weight[mask] = 0


@torch.no_grad()
def apply_magnitude(model: nn.Module, spec: MagnitudeSpec) -> MethodReport:
    timer = ReportTimer(model, spec)
    linears = block_linears(model, spec.skip)
    nm = spec.nm
    if spec.scope == "global":
        _global_threshold_masks(linears, float(spec.sparsity))
    else:
        for linear in tqdm(linears.values(), desc="magnitude", unit="linear", disable=None):
            magnitude = linear.weight.detach().abs().float()
            mask = nm_mask(magnitude, *nm) if nm else matrix_mask(magnitude, float(spec.sparsity))
            linear.weight.data[mask] = 0
    achieved = zero_fraction(lin.weight for lin in linears.values())
    packed = pack_2_4(model, list(linears)) if nm == (2, 4) and spec.pack else 0
    return timer.report(
        len(linears), achieved_sparsity=achieved, pruned_linears=len(linears), packed_2_4=packed
    )
