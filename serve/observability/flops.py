"""Model FLOPs per token (`FlopModel`), the token work of a request (`TokenWork`), and the
counting of a variant's FLOP model from the modules that really run after compression.

The gateway imports this module for the arithmetic alone, so it must not load torch: the counting
functions (`count_model_flops`, `count_runner_flops`, `count_engine_flops`) import torch and
slimserve.kernels only when called, and only engine processes call them.

Attention adds 4 x heads x head_dim FLOPs per layer per context token (QK^T and AV) for each
token processed. Token work is tracked as three numbers (see `TokenWork`), which makes the total
exact for prefill (only the last prompt position computes logits), decode and scoring.

Matmuls cost 2 FLOPs per weight a token touches. The count walks the model's innermost
Linear-like modules (anything with integer `in_features` / `out_features` and no such child), so
what compression changed is what gets counted: structurally pruned heads, FFN channels and
layers shrink the shapes, low-rank factors are two thin Linears, and a 2:4 SparseLinear counts
in full: its kernels (Triton, reference) expand the kept half and multiply densely. Quantized
weights cost the same FLOPs as dense ones, and unstructured zeros (magnitude / Wanda at a float
sparsity) still run as dense math.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:  # annotations only: importing torch here would load it into the gateway
    from torch import nn


class FlopModel(BaseModel):
    """FLOPs of one token, split the way the work is counted."""

    body_flops_per_token: float  # decoder-layer matmuls
    head_flops_per_token: float  # the output projection (logits)
    attention_flops_per_context_token: float  # per token processed, per token attended to
    layers: int

    @property
    def matmul_flops_per_token(self) -> float:
        return self.body_flops_per_token + self.head_flops_per_token

    def flops(self, work: TokenWork) -> float:
        return (
            self.body_flops_per_token * work.body_tokens
            + self.head_flops_per_token * work.head_tokens
            + self.attention_flops_per_context_token * work.context_sum
        )

    def flops_per_token_at(self, context: float) -> float:
        """One decode token attending to `context` tokens."""
        return self.matmul_flops_per_token + self.attention_flops_per_context_token * context


@dataclass
class TokenWork:
    """Tokens through the decoder, tokens whose logits were computed, and the sum over those
    tokens of how many positions each attended to."""

    body_tokens: float = 0.0
    head_tokens: float = 0.0
    context_sum: float = 0.0

    def __iadd__(self, other: TokenWork) -> TokenWork:
        self.body_tokens += other.body_tokens
        self.head_tokens += other.head_tokens
        self.context_sum += other.context_sum
        return self


def prefill_work(prompt_tokens: int) -> TokenWork:
    """A prompt of P tokens: P through the layers, logits at the last only; token p attends to
    p + 1 positions."""
    p = prompt_tokens
    return TokenWork(p, 1 if p else 0, p * (p + 1) / 2)


def decode_work(prompt_tokens: int, first: int, count: int) -> TokenWork:
    """Generated tokens first..first+count-1 (1-based). Token 1 comes from the prefill's logits;
    token j >= 2 is one decode step over token j-1, attending to prompt_tokens + j - 1 positions.
    """
    steps = [j for j in range(first, first + count) if j >= 2]
    context = sum(prompt_tokens + j - 1 for j in steps)
    return TokenWork(len(steps), len(steps), context)


def score_work(tokens: int) -> TokenWork:
    """Scoring L tokens: one pass with logits at every position."""
    return TokenWork(tokens, tokens, tokens * (tokens + 1) / 2)


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


def _weights_touched(modules: list[nn.Module]) -> float:
    return float(sum(module.in_features * module.out_features for module in modules))


def _flop_model(
    body_leaves: list[nn.Module],
    head_leaves: list[nn.Module],
    layers: int,
    heads: int,
    head_dim: int,
) -> FlopModel:
    return FlopModel(
        body_flops_per_token=2 * _weights_touched(body_leaves),
        head_flops_per_token=2 * _weights_touched(head_leaves),
        attention_flops_per_context_token=4.0 * layers * heads * head_dim,
        layers=layers,
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
    from torch import nn

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
