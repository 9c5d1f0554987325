"""Capturing what flows into decoder layers and Linears on calibration data."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import InputGroup

GRAM_CHUNK = 512  # tokens per 16-bit partial Gram product


class InputStats:
    """Running per-channel statistics of one Linear input over calibration tokens.

    absmax (SmoothQuant, LLM.int8 outliers), mean |x| (AWQ), optionally the Gram matrix
    X^T X (GPTQ's Hessian, and the exact output error of AWQ's searches), and optionally every
    `sample_every`-th token itself (SmoothQuant's alpha search needs real rows: its activation
    quantizer is per token, which no second moment describes).
    """

    def __init__(self, width: int, gram: bool, sample_every: int = 0) -> None:
        self.count = 0
        self.absmax = torch.zeros(width)
        self.abssum = torch.zeros(width, dtype=torch.float64)
        self.gram = torch.zeros(width, width) if gram else None
        self.sample_every = sample_every
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.sample_every:
            self.samples.append(x[:: self.sample_every].clone())
        self.count += x.shape[0]
        magnitude = x.abs()
        self.absmax = torch.maximum(self.absmax, magnitude.amax(dim=0).float())
        self.abssum += magnitude.sum(dim=0, dtype=torch.float64)
        if self.gram is not None:
            if x.dtype == torch.float32:
                self.gram.addmm_(x.t(), x)
            else:
                # 16-bit inputs: a 16-bit GEMM (several times faster here than fp32) per chunk of
                # tokens, summed in fp32, so each rounding is relative to a partial sum only.
                for chunk in x.split(GRAM_CHUNK):
                    self.gram += (chunk.t() @ chunk).float()

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()

    @property
    def hessian(self) -> torch.Tensor:
        """E[x x^T] (the 2/n of the GPTQ paper only rescales it; damping is relative)."""
        if self.gram is None:
            raise ValueError("these statistics were collected without the Gram matrix")
        return self.gram / max(self.count, 1)


@contextmanager
def record_inputs(
    groups: list[InputGroup], gram: bool, sample_every: int = 0
) -> Iterator[dict[str, InputStats]]:
    """Statistics of each group's shared input while the block under it runs (keyed by name)."""
    stats: dict[str, InputStats] = {}
    handles = []
    for group in groups:
        record = stats[group.name] = InputStats(group.in_features, gram, sample_every)
        first = group.linears[0][1]  # the group's Linears all read the same tensor
        handles.append(
            first.register_forward_hook(lambda _m, args, _out, record=record: record.add(args[0]))
        )
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerBatch:
    """One batch of inputs to a decoder layer: hidden states and the keyword arguments
    (rotary embeddings, mask, positions) the model passed alongside."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


class _Captured(Exception):
    pass


def capture_layer_inputs(
    model: nn.Module, layer: nn.Module, ids: torch.Tensor, batch_size: int
) -> list[LayerBatch]:
    """Run the model on `ids` up to `layer` and keep what it receives (the rest never runs)."""
    batches: list[LayerBatch] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        batches.append(LayerBatch(hidden.detach(), kwargs))
        raise _Captured

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for chunk in ids.split(batch_size):
                with suppress(_Captured):
                    model(input_ids=chunk.to(device), use_cache=False)
    finally:
        handle.remove()
    return batches


def run_layer(layer: nn.Module, batch: LayerBatch) -> torch.Tensor:
    out = layer(batch.hidden, **batch.kwargs)
    return out[0] if isinstance(out, tuple) else out
