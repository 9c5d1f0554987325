"""AWQ (Lin et al., 2023): activation-aware weight quantization.

Per input group (Linears reading one tensor), a per-channel scale s = mean|x|^a protects the
weights that meet large activations: W s is quantized and x / s fed to it. The exponent a is
searched on a grid (a = 0 is plain round-to-nearest, so the search never does worse than RTN on
its objective). Then, per Linear, a clipping ratio per (row, group) is searched. Both searches
minimise the output error on the calibration inputs exactly, through their second moment
H = E[x x^T]: ||(Ŵ - W) x||² summed over tokens is tr(D H Dᵀ). The reference implementation
measures the error of the whole block instead; the Linear outputs are cheaper and close.
Scales are folded into the previous op (norm weight, v_proj or up_proj rows) or kept as an
input scale where nothing can take them.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .arch import InputGroup, set_submodule
from .calib_data import calibration_ids
from .grid import fake_quantize_groups, quantize_groups, search_clip
from .hooks import InputStats, input_stats
from .layerwise import run_layerwise
from .lowbit import lowbit_linear, output_error, relative_output_error
from .methods.awq import AWQSpec
from .report import MethodReport, resident_weight_bytes
from .smoothing import apply_input_scale, tie_repeats, wrap_unfolded

log = logging.getLogger(__name__)

# q and k meet in a dot product; the reference implementation leaves their range unclipped.
_NO_CLIP = ("q_proj", "k_proj")


def search_scale(
    weight: torch.Tensor,
    absmean: torch.Tensor,
    hessian: torch.Tensor,
    group: InputGroup,
    bits: int,
    group_size: int,
    grid: int,
    integer_zero: bool = True,
) -> tuple[torch.Tensor, float]:
    """Best s = mean|x|^a over a in {0, 1/grid, ...}; returns (s, chosen a)."""
    w = weight.detach().float()
    stat = tie_repeats(absmean.float().clamp(min=1e-4), group, reduce="mean")
    best = (float("inf"), torch.ones_like(stat), 0.0)
    for step in range(grid):
        alpha = step / grid
        s = stat.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        approx = fake_quantize_groups(w * s, bits, group_size, integer_zero=integer_zero) / s
        err = float(output_error(approx - w, hessian))
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def apply_awq(
    model: nn.Module, spec: AWQSpec, calibration: torch.Tensor | None = None
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
    alphas: dict[str, list[float]] = {}
    errors: dict[str, list[float]] = {}
    counts = {"replaced": 0, "folded": 0, "kept_as_input_scale": 0}
    integer_zero = spec.zero_point == "integer"

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        # Scales first, for every group: a later group folds into the rows of an earlier
        # group's Linear (o -> v_proj, down -> up_proj), which must still be a float Linear.
        hessians: dict[str, torch.Tensor] = {}
        unfolded: dict[str, torch.Tensor] = {}
        for group in groups:
            record = stats[group.name]
            hessian = record.hessian
            stacked = torch.cat([linear.weight for _, linear in group.linears]).float()
            s, alpha = search_scale(
                stacked,
                record.absmean,
                hessian,
                group,
                spec.bits,
                spec.group_size,
                spec.grid,
                integer_zero,
            )
            alphas.setdefault(group.name, []).append(alpha)
            if apply_input_scale(group, s, fold=spec.fold):
                counts["folded"] += 1
            else:
                unfolded[group.name] = s
            hessians[group.name] = hessian / torch.outer(s, s)  # moments of x / s
        for group in groups:
            hessian = hessians[group.name]
            for name, linear in group.linears:
                w = linear.weight.float()
                clip = None
                if spec.clip and not name.endswith(_NO_CLIP):
                    clip = search_clip(
                        w,
                        hessian,
                        spec.bits,
                        spec.group_size,
                        spec.clip_grid,
                        spec.max_shrink,
                        integer_zero,
                    )
                quant = quantize_groups(w, spec.bits, spec.group_size, clip, integer_zero)
                errors.setdefault(group.name, []).append(
                    relative_output_error(w, quant.dequantize(), hessian)
                )
                set_submodule(model, name, lowbit_linear(quant, linear.bias, linear.weight.dtype))
                counts["replaced"] += 1
            if group.name in unfolded:
                wrap_unfolded(model, group, unfolded[group.name], group.linears[0][1].weight.dtype)
                counts["kept_as_input_scale"] += 1

    run_layerwise(
        model,
        ids,
        input_stats(gram="input"),
        process,
        skip=spec.skip,
        propagate="float",  # scales from the float model's activations
        desc=f"awq w{spec.bits}g{spec.group_size}",
    )
    return MethodReport(
        method=spec.method,
        spec=spec.model_dump(),
        modules_replaced=counts["replaced"],
        seconds=time.perf_counter() - started,
        bytes_before=before,
        bytes_after=resident_weight_bytes(model),
        detail={
            "calibration_tokens": int(ids.numel()),
            "groups_folded": counts["folded"],
            "groups_kept_as_input_scale": counts["kept_as_input_scale"],
            "mean_alpha": {g: sum(v) / len(v) for g, v in alphas.items()},
            "relative_output_error": {g: sum(v) / len(v) for g, v in errors.items()},
        },
    )
