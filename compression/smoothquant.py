"""SmoothQuant (Xiao et al., 2022): W8A8 with activation outliers migrated into the weights.

Per input group, s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) from calibration maxima (max over
all Linears reading the input); X / s is folded into the previous op, W s quantized to int8 per
output channel; activations are quantized per token at run time by W8A8Linear.

With alpha="auto", each group takes the alpha from ALPHA_GRID whose smoothed W8A8 product,
with the kernels' own quantizers, best matches the float product on sampled calibration tokens
(per-layer alpha tuning, as later SmoothQuant implementations do).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from slimserve.kernels import W8A8Linear, quantize_int8_absmax, quantize_per_token_int8

from .arch import InputGroup, set_submodule
from .calib_data import calibration_ids
from .hooks import InputStats, input_stats
from .int8 import quantize_embeddings
from .layerwise import run_layerwise
from .methods.smoothquant_w8a8 import SmoothQuantSpec
from .report import MethodReport, resident_weight_bytes
from .smoothing import apply_input_scale, tie_repeats

ALPHA_GRID = tuple(step / 10 for step in range(11))
SAMPLE_EVERY = 16  # tokens kept for the alpha search: 512 of the default 8192


def smoothing_scale(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float, group: InputGroup
) -> torch.Tensor:
    w_absmax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    x = tie_repeats(act_absmax.float(), group).clamp(min=1e-5)
    w = tie_repeats(w_absmax, group).clamp(min=1e-5)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)


def w8a8_error(
    x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, reference: torch.Tensor
) -> float:
    """||Q(x / s) Q(W s)ᵀ - x Wᵀ||² with per-token activations and per-channel int8 weights,
    through the kernels' own quantizers; `reference` is x Wᵀ."""
    qx, x_scale = quantize_per_token_int8(x / s)
    qw, w_scale = quantize_int8_absmax(weight * s, per_channel=True)
    approx = (qx.float() * x_scale[:, None]) @ (qw.float() * w_scale[:, None]).t()
    return float((approx - reference).pow(2).sum())


def search_alpha(
    samples: torch.Tensor, act_absmax: torch.Tensor, weights: list[torch.Tensor], group: InputGroup
) -> tuple[float, torch.Tensor]:
    """The grid alpha (and its scale) with the lowest W8A8 error on the sampled tokens."""
    x = samples.float()
    stacked = torch.cat([w.detach().float() for w in weights])
    reference = x @ stacked.t()
    best = (float("inf"), 0.5, torch.ones(x.shape[1]))
    for alpha in ALPHA_GRID:
        s = smoothing_scale(act_absmax, weights, alpha, group)
        err = w8a8_error(x, stacked, s, reference)
        if err < best[0]:
            best = (err, alpha, s)
    return best[1], best[2]


def w8a8_linear(linear: nn.Linear) -> W8A8Linear:
    qweight, scale = quantize_int8_absmax(linear.weight, per_channel=True)
    return W8A8Linear.from_quantized(qweight, scale, linear.bias, linear.weight.dtype)


def apply_smoothquant(
    model: nn.Module, spec: SmoothQuantSpec, calibration: torch.Tensor | None = None
) -> MethodReport:
    """`calibration`: token ids [n, seq_len] to use instead of spec.calibration's text."""
    started = time.perf_counter()
    before = resident_weight_bytes(model)
    # The first windows (not spread): the calibration the README's quality table measured.
    ids = (
        calibration
        if calibration is not None
        else calibration_ids(model, spec.calibration, pick="first")
    )
    counts = {"replaced": 0, "smoothed_groups": 0}
    act_max: dict[str, float] = {}
    alphas: dict[str, list[float]] = {}
    auto = spec.alpha == "auto"

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        # Smooth every group first: o and down fold into the rows of v_proj and up_proj,
        # which must still be float Linears then.
        for group in groups:
            absmax = stats[group.name].absmax
            act_max[group.name] = max(act_max.get(group.name, 0.0), float(absmax.max()))
            if group.name in spec.smooth and group.prev is not None:
                weights = [linear.weight for _, linear in group.linears]
                if auto:
                    samples = torch.cat(stats[group.name].samples)
                    alpha, s = search_alpha(samples, absmax, weights, group)
                    alphas.setdefault(group.name, []).append(alpha)
                else:
                    s = smoothing_scale(absmax, weights, float(spec.alpha), group)
                apply_input_scale(group, s, fold=True)
                counts["smoothed_groups"] += 1
        for group in groups:
            for name, linear in group.linears:
                set_submodule(model, name, w8a8_linear(linear))
                counts["replaced"] += 1

    run_layerwise(
        model,
        ids,
        input_stats(sample_every=SAMPLE_EVERY if auto else 0),
        process,
        skip=spec.skip,
        propagate="float",  # maxima of the float model's activations
        desc=f"smoothquant a={spec.alpha}",
    )
    if spec.include_embeddings:
        counts["replaced"] += quantize_embeddings(model, per_channel=True)
    return MethodReport(
        method=spec.method,
        spec=spec.model_dump(),
        modules_replaced=counts["replaced"],
        seconds=time.perf_counter() - started,
        bytes_before=before,
        bytes_after=resident_weight_bytes(model),
        detail={
            "calibration_tokens": int(ids.numel()),
            "smoothed_groups": counts["smoothed_groups"],
            "max_input_magnitude": act_max,
            **({"mean_alpha": {g: sum(v) / len(v) for g, v in alphas.items()}} if auto else {}),
        },
    )
