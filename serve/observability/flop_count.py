"""A variant's FLOP model, counted from the modules that really run after compression.

Matmuls cost 2 FLOPs per weight a token touches. The count walks the model's innermost
Linear-like modules (anything with integer `in_features` / `out_features` and no such child), so
what compression changed is what gets counted: structurally pruned heads, FFN channels and
layers shrink the shapes, low-rank factors are two thin Linears, and a 2:4 SparseLinear counts
half only where a sparse kernel (torch's semi-structured tensor-core matmul) runs; elsewhere its
weight is expanded and multiplied densely. Quantized weights cost the same FLOPs as dense ones,
and unstructured zeros (magnitude / Wanda at a float sparsity) still run as dense math.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimserve.kernels.sparse24 import SparseLinear, select_sparse24_backend

from .flops import FlopModel


def _is_matmul(module: nn.Module) -> bool:
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def _leaf_matmuls(root: nn.Module) -> list[nn.Module]:
    leaves = []
    for module in root.modules():
        if not _is_matmul(module):
            continue
        if any(_is_matmul(child) for child in module.modules() if child is not module):
            continue  # a wrapper (low-rank, outlier, scaled): its inner modules do the math
        leaves.append(module)
    return leaves


def sparse_kernel_runs(module: SparseLinear) -> bool:
    """Whether this 2:4 module's matmul skips the zero half (sparse tensor cores)."""
    probe = torch.empty(
        1, module.in_features, dtype=module.compute_dtype, device=module.values.device
    )
    return select_sparse24_backend(probe, module.semi_structured) == "cuda-semi-structured"


def _weights_touched(modules: list[nn.Module]) -> tuple[float, int]:
    total, halved = 0.0, 0
    for module in modules:
        weights = float(module.in_features * module.out_features)
        if isinstance(module, SparseLinear) and sparse_kernel_runs(module):
            weights /= 2
            halved += 1
        total += weights
    return total, halved


def _flop_model(
    body_leaves: list[nn.Module],
    head_leaves: list[nn.Module],
    layers: int,
    heads: int,
    head_dim: int,
) -> FlopModel:
    body, body_halved = _weights_touched(body_leaves)
    head, head_halved = _weights_touched(head_leaves)
    return FlopModel(
        body_flops_per_token=2 * body,
        head_flops_per_token=2 * head,
        attention_flops_per_context_token=4.0 * layers * heads * head_dim,
        layers=layers,
        sparse_halved_modules=body_halved + head_halved,
    )


def count_model_flops(model: nn.Module) -> FlopModel:
    """The FLOP model of a Llama-family causal LM as its module tree stands (also on the meta
    device, e.g. a skeleton built from a checkpoint's config)."""
    head_module = model.get_output_embeddings()
    head_ids = {id(m) for m in head_module.modules()} if head_module is not None else set()
    leaves = _leaf_matmuls(model)
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inner = getattr(model, "model", None)
    layers = len(inner.layers) if inner is not None and hasattr(inner, "layers") else 0
    return _flop_model(
        [m for m in leaves if id(m) not in head_ids],
        [m for m in leaves if id(m) in head_ids],
        layers or cfg.num_hidden_layers,
        heads,
        head_dim,
    )


def count_runner_flops(runner: Any) -> FlopModel:
    """The FLOP model of what a LlamaRunner really calls: its per-layer plans (with the fused,
    prepacked dense projections and the compressed modules) and its output projection."""
    seen: set[int] = set()
    body: list[nn.Module] = []
    for plan in runner.layers:
        for module in vars(plan).values():
            if isinstance(module, nn.Module) and id(module) not in seen:
                seen.add(id(module))
                body.extend(_leaf_matmuls(module))
    head = _leaf_matmuls(runner.lm_head)
    return _flop_model(body, head, len(runner.layers), runner.n_heads, runner.head_dim)


def count_engine_flops(engine: Any) -> FlopModel | None:
    """From the engine's own runner when it has one (engine "torch"), as its engine process
    reported it (`flops`); else None."""
    reported = getattr(engine, "flops", None)
    if isinstance(reported, FlopModel):
        return reported
    runner = getattr(engine, "runner", None)
    return count_runner_flops(runner) if runner is not None else None
