"""Pruning and low-rank methods by name."""

from __future__ import annotations

from .layer_pruning import apply_layer_pruning
from .lowrank import apply_low_rank
from .magnitude import apply_magnitude
from .sparsegpt import apply_sparsegpt
from .structured import apply_ffn_pruning, apply_head_pruning
from .wanda import apply_wanda

PRUNE_METHODS: dict = {
    "magnitude": apply_magnitude,
    "wanda": apply_wanda,
    "sparsegpt": apply_sparsegpt,
    "prune-heads": apply_head_pruning,
    "prune-ffn": apply_ffn_pruning,
    "prune-layers": apply_layer_pruning,
    "low-rank": apply_low_rank,
}
