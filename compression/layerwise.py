"""Layer-by-layer calibration: the loop every data-aware method shares.

The model runs once up to its first decoder layer; then each layer in turn runs on the
captured inputs with hooks recording its Linears' inputs, is processed (pruned, scaled,
quantized, replaced), and its outputs become the next layer's inputs. Only one layer's
activations are alive at a time, and the output head never runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import InputGroup, decoder_layers, decoder_prefix, input_groups
from .hooks import LayerBatch, Recorder, capture_layer_inputs, record_inputs, run_layer

R = TypeVar("R", bound=Recorder)


@dataclass
class LayerStep:
    """Decoder layer `index` (qualified name `name`) with its calibration inputs.

    `outputs` is what the next layer receives; left None, the layer is run again after the
    caller is done with it, so a changed layer feeds its changed outputs on.
    """

    index: int
    name: str
    layer: nn.Module
    inputs: list[LayerBatch]
    outputs: list[torch.Tensor] | None = None

    def run(self) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [run_layer(self.layer, batch) for batch in self.inputs]


def replay_layers(
    model: nn.Module, ids: torch.Tensor, desc: str, batch_size: int = 8
) -> Iterator[LayerStep]:
    """Yield each decoder layer with the calibration hidden states that reach it."""
    layers = decoder_layers(model)
    prefix = decoder_prefix(model)
    batches = capture_layer_inputs(model, layers[0], ids, batch_size)
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=None)):
        step = LayerStep(index, f"{prefix}.{index}", layer, batches)
        yield step
        outputs = step.outputs if step.outputs is not None else step.run()
        batches = [replace(b, hidden=out) for b, out in zip(batches, outputs, strict=True)]


def run_layerwise(
    model: nn.Module,
    ids: torch.Tensor,
    record: Callable[[InputGroup], R | None],
    process: Callable[[nn.Module, list[InputGroup], dict[str, R]], None],
    *,
    skip: list[str],
    propagate: Literal["float", "processed"],
    desc: str,
    batch_size: int = 8,
) -> None:
    """Per layer: `record(group)` makes each input group's recorder (None: not recorded), the
    layer runs with them hooked, then `process(layer, groups, recorders)` changes it.

    `propagate`: "processed" re-runs each layer after `process` so later layers calibrate on
    the compressed model's activations; "float" passes the unmodified outputs on (one forward
    per layer, statistics from the float model).
    """
    for step in replay_layers(model, ids, desc, batch_size):
        groups = input_groups(step.layer, step.name, skip)
        recorders = {group.name: r for group in groups if (r := record(group)) is not None}
        with record_inputs(groups, recorders):
            outputs = step.run()
        with torch.no_grad():
            process(step.layer, groups, recorders)
        if propagate == "float":
            step.outputs = outputs
