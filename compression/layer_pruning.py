"""Remove whole decoder blocks, one shot, by calibration importance (Shortened LLaMA style).

angular: a block whose output points almost where its input did (small arccos of their cosine,
averaged over tokens) changes little and goes first (Gromov et al. 2024 measure, per block).
perplexity: each block is left out alone and the calibration loss measured; the blocks whose
absence costs least go (the PPL criterion of Kim et al. 2024).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch
from torch import nn

from .arch import decoder_layers, decoder_prefix, set_submodule
from .calib_data import calibration_ids
from .hooks import run_layer
from .layerwise import LayerStep, replay_layers
from .methods.prune_layers import LayerPruneSpec
from .pruning_report import ReportTimer
from .report import MethodReport

log = logging.getLogger(__name__)


def angular_distance(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Mean over tokens of arccos(cos(x_in, x_out)) / pi, in [0, 1]."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs, strict=True):
        cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1.0, 1.0)
        total += float(torch.arccos(cos).sum()) / math.pi
        count += cos.numel()
    return total / count


@torch.inference_mode()
def loss_without(model: nn.Module, step: LayerStep, ids: torch.Tensor) -> float:
    """Mean next-token loss on `ids`, continuing from the step's inputs with its block left out."""
    later = decoder_layers(model)[step.index + 1 :]
    total, count, offset = 0.0, 0, 0
    for batch in step.inputs:
        hidden = batch.hidden
        for layer in later:
            hidden = run_layer(layer, replace(batch, hidden=hidden))
        logits = model.lm_head(model.model.norm(hidden)).float()
        targets = ids[offset : offset + hidden.shape[0], 1:]
        offset += hidden.shape[0]
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += targets.numel()
    return total / count


@torch.no_grad()
def block_importance(model: nn.Module, ids: torch.Tensor, importance: str) -> list[float]:
    """Importance per block (higher = keep); one pass over the calibration data."""
    scores = []
    for step in replay_layers(model, ids, f"prune-layers ({importance})"):
        outputs = step.run()
        if importance == "angular":
            inputs = [batch.hidden for batch in step.inputs]
            scores.append(angular_distance(inputs, outputs))
        else:
            scores.append(math.exp(loss_without(model, step, ids)))
        step.outputs = outputs  # the block is unchanged: reuse its outputs
    return scores


def remove_layers(model: nn.Module, drop: list[int]) -> None:
    """Delete blocks, renumber the rest, and keep model.config consistent."""
    layers = decoder_layers(model)
    kept = [layer for index, layer in enumerate(layers) if index not in set(drop)]
    for index, layer in enumerate(kept):
        # The HF KV cache is indexed by layer_idx; it must be 0..n-1 again.
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
    set_submodule(model, decoder_prefix(model), nn.ModuleList(kept))
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        cfg.layer_types = [t for index, t in enumerate(types) if index not in set(drop)]
    cfg.num_hidden_layers = len(kept)


@torch.no_grad()
def apply_layer_pruning(model: nn.Module, spec: LayerPruneSpec) -> MethodReport:
    timer = ReportTimer(model, spec)
    spec.check_model(model.config)
    count = len(decoder_layers(model))
    scores = block_importance(model, calibration_ids(model, spec.calibration), spec.importance)
    candidates = range(spec.keep_first, count - spec.keep_last)
    drop = sorted(sorted(candidates, key=lambda index: scores[index])[: spec.remove])
    remove_layers(model, drop)
    log.info("prune-layers removed blocks %s of %d", drop, count)
    return timer.report(
        len(drop),
        removed_layers=drop,
        layers=f"{count} -> {count - len(drop)}",
        importance={str(i): round(score, 5) for i, score in enumerate(scores)},
    )
