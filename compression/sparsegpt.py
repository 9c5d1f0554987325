"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight updates (Frantar & Alistarh 2023).

For a Linear with inputs X, the layer-wise error ||(W - W')X||^2 has Hessian H = X^T X, shared by
every output row. Columns are visited left to right; when weight w_iq is removed, the rest of its
row is corrected by -w_iq / [H^-1]_qq * [H^-1]_q,q: (the OBS update restricted to the columns not
visited yet). The upper Cholesky factor of H^-1 gives those rows directly. Updates inside a block
of columns are applied eagerly, and to the later columns once per block (lazy batching). The mask
inside each block is chosen by the OBS saliency w^2 / [H^-1]_qq^2.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import InputGroup
from .calib_data import calibration_ids
from .hooks import InputStats, input_stats
from .layerwise import run_layerwise
from .methods.sparsegpt import SparseGPTSpec
from .nm_sparsity import lowest_mask, pack_2_4
from .pruning_report import ReportTimer, zero_fraction
from .report import MethodReport


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, and the dead-column mask."""
    h = hessian.clone().float()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0  # features never active: their weights go regardless, keep H invertible
    h.diagonal().add_(damp * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True), dead


def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    segments: list[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Pruned and corrected copy of weight [N, K] (float32).

    segments: row ranges that are separate matrices sharing this Hessian (q/k/v stacked); the
    unstructured mask reaches the target within each one.
    """
    w = weight.detach().float().clone()
    rows, cols = w.shape
    factor, dead = inverse_hessian_factor(hessian, damp)
    w[:, dead] = 0
    segments = segments or [(0, rows)]
    removed = [0] * len(segments)
    if nm is not None:
        block_size = max(nm[1], block_size // nm[1] * nm[1])  # groups never straddle blocks
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        block_factor = factor[start:end, start:end]
        diag = block_factor.diagonal()
        errors = torch.zeros_like(block)
        mask = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            saliency = block.pow(2) / diag.pow(2)
            for index, (r0, r1) in enumerate(segments):
                # Cumulative target so rounding per block never drifts from the total.
                want = round(sparsity * (r1 - r0) * end) - removed[index]
                flat = lowest_mask(saliency[r0:r1].reshape(-1), want, dim=0)
                mask[r0:r1] = flat.view(r1 - r0, -1)
                removed[index] += want
        for i in range(end - start):
            if nm is not None and i % nm[1] == 0:
                group = block[:, i : i + nm[1]].pow(2) / diag[i : i + nm[1]].pow(2)
                mask[:, i : i + nm[1]] = lowest_mask(group, nm[1] - nm[0], dim=1)
            column = block[:, i]
            kept = column.masked_fill(mask[:, i], 0.0)
            error = (column - kept) / diag[i]
            block[:, i:].sub_(error.unsqueeze(1) * block_factor[i, i:].unsqueeze(0))
            block[:, i] = kept
            errors[:, i] = error
        w[:, start:end] = block
        w[:, end:].sub_(errors @ factor[start:end, end:])
    return w


@torch.no_grad()
def apply_sparsegpt(model: nn.Module, spec: SparseGPTSpec) -> MethodReport:
    timer = ReportTimer(model, spec)
    sparsity, nm = spec.target_sparsity, spec.nm
    pruned: dict[str, nn.Linear] = {}

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        # The Linears of a group (q/k/v, gate/up) share their Hessian: solved as one stack.
        for group in groups:
            stacked = torch.cat([linear.weight.data for _, linear in group.linears])
            bounds, offset = [], 0
            for _, linear in group.linears:
                bounds.append((offset, offset + linear.out_features))
                offset += linear.out_features
            hessian = stats[group.name].hessian
            solved = sparsegpt_solve(
                stacked, hessian, sparsity, nm, spec.block_size, spec.damp, bounds
            )
            for (name, linear), (r0, r1) in zip(group.linears, bounds, strict=True):
                linear.weight.data.copy_(solved[r0:r1].to(linear.weight.dtype))
                pruned[name] = linear

    run_layerwise(
        model,
        calibration_ids(model, spec.calibration),
        input_stats(gram="fp32"),
        process,
        skip=spec.skip,
        propagate="processed",  # sequential, as in SparseGPT: inputs from the pruned blocks
        desc="sparsegpt",
    )
    achieved = zero_fraction(linear.weight for linear in pruned.values())
    packed = pack_2_4(model, list(pruned)) if nm == (2, 4) and spec.pack else 0
    return timer.report(
        len(pruned), achieved_sparsity=achieved, pruned_linears=len(pruned), packed_2_4=packed
    )
