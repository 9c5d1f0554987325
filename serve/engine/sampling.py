"""Next-token choice per sequence: greedy, or temperature + top-p with a per-request seed."""

from __future__ import annotations

import torch

from slimserve.kernels import native

from .types import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed % 2**64)  # torch takes 0..2**64-1
    return generator


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token once the mass before it already reaches top_p; the first token always stays.
    drop = probs.cumsum(-1) - probs >= top_p
    drop[0] = False  # even when top_p rounds to 0 in float32
    sorted_logits[drop] = float("-inf")
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """logits [B, V] (float32) -> one token id per row."""
    if native.argmax_rows_supported(logits):
        chosen = native.serving_kernels().argmax_rows(logits)
    else:
        chosen = logits.argmax(dim=-1).tolist()
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scaled = logits[row] / p.temperature
        if not torch.isfinite(scaled).any():
            continue  # nothing allowed (a grammar that only ends, under min_tokens): the argmax
        if p.top_p < 1.0:
            scaled = _top_p_filter(scaled, p.top_p)
        probs = scaled.softmax(-1)
        chosen[row] = int(torch.multinomial(probs, 1, generator=generator).item())
    return chosen
