"""Wanda: prune by |W_ij| * ||X_j||_2, compared within each output row (Sun et al. 2023).

The input norm makes a small weight on a large-activation feature (the outlier features of LLMs)
count as much as it contributes to the output, which plain magnitude misses.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import BlockRunner, ColumnNorms, calibration_ids
from .nm_sparsity import nm_mask, pack_2_4, row_mask
from .prune_specs import WandaSpec
from .pruning_common import ReportTimer, layer_linears, zero_fraction
from .report import MethodReport


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float() * input_norms.unsqueeze(0)


def wanda_mask(scores: torch.Tensor, spec: WandaSpec) -> torch.Tensor:
    nm = spec.nm
    return nm_mask(scores, *nm) if nm else row_mask(scores, float(spec.sparsity))


@torch.no_grad()
def apply_wanda(model: nn.Module, spec: WandaSpec) -> MethodReport:
    timer = ReportTimer(model, spec)
    runner = BlockRunner(model, calibration_ids(model, spec.calibration))
    pruned: dict[str, nn.Linear] = {}
    for step in runner.steps("wanda"):
        linears = layer_linears(model, step.index, spec.skip)
        stats = {name: ColumnNorms(linear.in_features) for name, linear in linears.items()}
        step.forward({linears[name]: stat for name, stat in stats.items()})
        for name, linear in linears.items():
            mask = wanda_mask(wanda_scores(linear.weight, stats[name].norms), spec)
            linear.weight.data[mask] = 0
        pruned.update(linears)
    achieved = zero_fraction(linear.weight for linear in pruned.values())
    packed = pack_2_4(model, list(pruned)) if spec.nm == (2, 4) and spec.pack else 0
    return timer.report(
        len(pruned), achieved_sparsity=achieved, pruned_linears=len(pruned), packed_2_4=packed
    )
