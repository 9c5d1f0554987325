"""Layer-by-layer calibration: the loop GPTQ, AWQ, SmoothQuant and LLM.int8() share.

The model runs once up to its first decoder layer; then each layer in turn runs on the
captured inputs with hooks recording its Linears' input statistics, is processed (scaled,
quantized, replaced), and its outputs become the next layer's inputs. Only one layer's
activations are alive at a time, and the output head never runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import InputGroup, decoder_layers, input_groups
from .hooks import (
    InputStats,
    capture_layer_inputs,
    record_inputs,
    run_layer,
)

ProcessFn = Callable[[nn.Module, list[InputGroup], dict[str, InputStats]], None]


def _qualified_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def run_layerwise(
    model: nn.Module,
    ids: torch.Tensor,
    process: ProcessFn,
    *,
    skip: list[str],
    gram: bool,
    propagate: Literal["float", "processed"],
    desc: str,
    batch_size: int = 8,
    sample_every: int = 0,
) -> None:
    """`propagate`: "processed" re-runs each layer after `process` so later layers calibrate on
    the compressed model's activations (GPTQ); "float" passes the unmodified outputs on (one
    forward per layer: AWQ, SmoothQuant, LLM.int8(), whose statistics come from the float model).
    `sample_every` > 0 also keeps every n-th token of each group's input (InputStats.samples).
    """
    layers = decoder_layers(model)
    prefix = _qualified_name(model, layers)
    batches = capture_layer_inputs(model, layers[0], ids, batch_size)
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=None)):
        groups = input_groups(layer, f"{prefix}.{index}", skip)
        with record_inputs(groups, gram, sample_every) as stats, torch.inference_mode():
            outputs = [run_layer(layer, batch) for batch in batches]
        with torch.no_grad():
            process(layer, groups, stats)
        if propagate == "processed":
            with torch.inference_mode():
                outputs = [run_layer(layer, batch) for batch in batches]
        batches = [replace(b, hidden=out) for b, out in zip(batches, outputs, strict=True)]
