"""Capturing what flows into decoder layers and Linears on calibration data."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn

from .arch import InputGroup

GRAM_CHUNK = 512  # tokens per 16-bit partial Gram product

# "input": 16-bit inputs multiply in 16 bits per chunk of tokens, summed in fp32 (several times
# faster here); "fp32": inputs upcast first (a Cholesky factor or an OBS solve that must not see
# 16-bit rounding in the matrix).
GramPrecision = Literal["input", "fp32"]


class Recorder(Protocol):
    """Accumulates one input group's input, [tokens, in_features] per call."""

    def add(self, x: torch.Tensor) -> None: ...


class InputStats:
    """Running per-channel statistics of one Linear input over calibration tokens.

    absmax (SmoothQuant, LLM.int8 outliers), mean |x| (AWQ), the column norms ||X_j||_2
    (Wanda, FFN channel pruning), optionally the Gram matrix X^T X (GPTQ's and SparseGPT's
    Hessian, the exact output error of AWQ's searches, low-rank whitening), and optionally every
    `sample_every`-th token itself (SmoothQuant's alpha search needs real rows: its activation
    quantizer is per token, which no second moment describes).
    """

    def __init__(
        self, width: int, gram: GramPrecision | None = None, sample_every: int = 0
    ) -> None:
        self.count = 0
        self.absmax = torch.zeros(width)
        self.abssum = torch.zeros(width, dtype=torch.float64)
        self.squares = torch.zeros(width)
        self.gram_precision = gram
        self.gram = torch.zeros(width, width) if gram else None
        self.sample_every = sample_every
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.sample_every:
            self.samples.append(x[:: self.sample_every].clone())
        self.count += x.shape[0]
        magnitude = x.abs()
        self.absmax = torch.maximum(self.absmax, magnitude.amax(dim=0).float())
        self.abssum += magnitude.sum(dim=0, dtype=torch.float64)
        self.squares += x.float().pow(2).sum(dim=0)
        if self.gram is None:
            return
        if x.dtype == torch.float32 or self.gram_precision == "fp32":
            x = x.float()
            self.gram.addmm_(x.t(), x)
        else:
            for chunk in x.split(GRAM_CHUNK):
                self.gram += (chunk.t() @ chunk).float()

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 per input feature over the tokens seen."""
        return self.squares.sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        """E[x x^T] (the 2/n of the GPTQ paper only rescales it; damping is relative)."""
        if self.gram is None:
            raise ValueError("these statistics were collected without the Gram matrix")
        return self.gram / max(self.count, 1)


def input_stats(
    gram: GramPrecision | None = None, sample_every: int = 0
) -> Callable[[InputGroup], InputStats]:
    """A recorder factory for run_layerwise: InputStats for every input group."""
    return lambda group: InputStats(group.in_features, gram, sample_every)


def _feed(record: Recorder, _module: nn.Module, args: tuple, _output: Any) -> None:
    record.add(args[0].reshape(-1, args[0].shape[-1]))


@contextmanager
def record_inputs(groups: list[InputGroup], recorders: dict[str, Recorder]) -> Iterator[None]:
    """Feed each group's shared input to its recorder (keyed by group name) while the block
    under it runs; groups without a recorder are not hooked."""
    handles = []
    for group in groups:
        record = recorders.get(group.name)
        if record is None:
            continue
        first = group.linears[0][1]  # the group's Linears all read the same tensor
        handles.append(first.register_forward_hook(functools.partial(_feed, record)))
    try:
        yield
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
