"""Calibration data and the block-by-block pass the data-aware methods share.

Methods prune one decoder block at a time (as SparseGPT and Wanda do): the calibration hidden
states enter block i, hooks record what its Linears see, the method changes the block, and the
block's outputs are recomputed with the changed weights before moving on, so later blocks are
fitted to the inputs they will really get.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import load_text, token_windows
from .prune_specs import CalibrationSpec
from .pruning_common import decoder_layers

log = logging.getLogger(__name__)

_override: ContextVar[torch.Tensor | None] = ContextVar("calibration_override", default=None)


@contextlib.contextmanager
def calibration_override(ids: torch.Tensor) -> Iterator[None]:
    """Use these token ids [n, T] instead of loading text (tests, tables comparing methods)."""
    token = _override.set(ids)
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@functools.lru_cache(maxsize=8)
def _windows(path: str, source: str, samples: int, seq_len: int) -> torch.Tensor:
    windows = token_windows(_tokenizer(path), load_text(source, "calibration"), seq_len)
    if windows.shape[0] < samples:
        log.warning("calibration text has only %d windows of %d tokens", len(windows), seq_len)
        return windows
    # Evenly spread over the text rather than its first pages, for topic variety.
    picks = torch.linspace(0, windows.shape[0] - 1, samples).round().long()
    return windows[picks]


def calibration_ids(model: nn.Module, calibration: CalibrationSpec) -> torch.Tensor:
    """LongTensor [samples, seq_len] of calibration tokens for this model's tokenizer."""
    override = _override.get()
    if override is not None:
        return override
    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path:
        raise ValueError(
            "calibration needs the model's tokenizer, but the model has no name_or_path; "
            "load it with from_pretrained or wrap the call in calibration_override(ids)"
        )
    return _windows(str(path), calibration.source, calibration.samples, calibration.seq_len)


class SecondMoment:
    """Running X^T X over the rows seen (the Hessian of the layer-wise squared error)."""

    def __init__(self, features: int) -> None:
        self.matrix = torch.zeros(features, features)
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.float()
        self.matrix.addmm_(x.t(), x)
        self.rows += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.matrix / max(self.rows, 1)


class ColumnNorms:
    """Running sum of squares per input feature; `norms` is ||X_j||_2 over the rows seen."""

    def __init__(self, features: int) -> None:
        self.squares = torch.zeros(features)
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> None:
        self.squares += x.float().pow(2).sum(0)
        self.rows += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        return self.squares.sqrt()


Hook = Callable[[torch.Tensor], None]


@dataclass
class LayerStep:
    """Block `index` with its calibration inputs; `forward` runs it, optionally with hooks."""

    index: int
    layer: nn.Module
    inputs: list[torch.Tensor]
    _call: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    outputs: list[torch.Tensor] | None = field(default=None)

    @torch.inference_mode()
    def forward(self, hooks: dict[nn.Module, Hook] | None = None) -> list[torch.Tensor]:
        """Outputs for every input batch; hooks receive each hooked module's input as [rows, K].

        A caller that leaves the block unchanged afterwards may keep these as `step.outputs`.
        """
        handles = []
        last: list = [None, None]
        for module, hook in (hooks or {}).items():

            def pre_hook(_module, args, hook=hook):
                # Modules fed the same tensor (q/k/v, gate/up) get the same [rows, K] object,
                # so an accumulator can recognise a shared input by identity.
                if args[0] is not last[0]:
                    last[0], last[1] = args[0], args[0].reshape(-1, args[0].shape[-1])
                hook(last[1])

            handles.append(module.register_forward_pre_hook(pre_hook))
        try:
            return [self._call(self.layer, h) for h in self.inputs]
        finally:
            for handle in handles:
                handle.remove()


class BlockRunner:
    """Runs calibration hidden states through the decoder blocks one at a time."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> None:
        self.model = model
        inner = model.model
        with torch.inference_mode():
            self.hidden = [inner.embed_tokens(batch) for batch in ids.split(batch_size)]
            length = ids.shape[1]
            self.positions = torch.arange(length).unsqueeze(0)
            self.position_embeddings = inner.rotary_emb(self.hidden[0], self.positions)
        self.mask = None
        if getattr(model.config, "_attn_implementation", "sdpa") != "sdpa":
            # Eager attention takes no causal flag: give it an additive causal mask.
            dtype = self.hidden[0].dtype
            blocked = torch.ones(length, length, dtype=torch.bool).triu(1)
            self.mask = torch.zeros(length, length, dtype=dtype).masked_fill(
                blocked, torch.finfo(dtype).min
            )[None, None]

    def call_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(
            hidden,
            attention_mask=self.mask,
            position_ids=self.positions,
            position_embeddings=self.position_embeddings,
        )
        return out[0] if isinstance(out, tuple) else out

    def steps(self, desc: str, start: int = 0) -> Iterator[LayerStep]:
        """Yield each block; after the caller is done its outputs feed the next block."""
        layers = decoder_layers(self.model)
        for index in tqdm(range(start, len(layers)), desc=desc, unit="layer", disable=None):
            step = LayerStep(index, layers[index], self.hidden, self.call_block)
            yield step
            self.hidden = step.outputs if step.outputs is not None else step.forward()

    @torch.inference_mode()
    def loss_from(self, hidden: list[torch.Tensor], ids: torch.Tensor, skip: int) -> float:
        """Mean next-token loss continuing from block `skip`'s input with that block left out."""
        layers = decoder_layers(self.model)
        inner = self.model.model
        total, count, offset = 0.0, 0, 0
        for h in hidden:
            for index in range(skip + 1, len(layers)):
                h = self.call_block(layers[index], h)
            logits = self.model.lm_head(inner.norm(h)).float()
            targets = ids[offset : offset + h.shape[0], 1:]
            offset += h.shape[0]
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += targets.numel()
        return total / count
