"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row (Sun et al. 2023).

The input norm makes a small weight on a large-activation feature (the outlier features of LLMs)
count as much as it contributes to the output, which plain magnitude misses.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import InputGroup
from .calib_data import calibration_ids
from .hooks import InputStats, input_stats
from .layerwise import run_layerwise
from .methods.wanda import WandaSpec
from .nm_sparsity import nm_mask, pack_2_4, row_mask
from .pruning_report import ReportTimer, zero_fraction
from .report import MethodReport


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * input_norms.unsqueeze(0)


def wanda_mask(scores: torch.Tensor, spec: WandaSpec) -> torch.Tensor:
    nm = spec.nm
    return nm_mask(scores, *nm) if nm else row_mask(scores, float(spec.sparsity))


@torch.no_grad()
def apply_wanda(model: nn.Module, spec: WandaSpec) -> MethodReport:
    timer = ReportTimer(model, spec)
    pruned: dict[str, nn.Linear] = {}

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        for group in groups:
            for name, linear in group.linears:
                mask = wanda_mask(wanda_scores(linear.weight, stats[group.name].norms), spec)
                linear.weight.data[mask] = 0
                pruned[name] = linear

    run_layerwise(
        model,
        calibration_ids(model, spec.calibration),
        input_stats(),
        process,
        skip=spec.skip,
        propagate="processed",  # sequential, as in Wanda: inputs from the pruned blocks
        desc="wanda",
    )
    achieved = zero_fraction(linear.weight for linear in pruned.values())
    packed = pack_2_4(model, list(pruned)) if spec.nm == (2, 4) and spec.pack else 0
    return timer.report(
        len(pruned), achieved_sparsity=achieved, pruned_linears=len(pruned), packed_2_4=packed
    )
