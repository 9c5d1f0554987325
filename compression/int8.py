"""int8 weight-only quantization (absmax, per output channel or per tensor)."""

from __future__ import annotations

import time

from torch import nn
from tqdm.auto import tqdm

from slimserve.kernels.int8 import Int8Embedding, Int8Linear, quantize_int8_absmax

from .arch import set_submodule, target_linears
from .methods.int8_weight_only import Int8WeightOnlySpec
from .report import MethodReport, resident_weight_bytes

__all__ = ["apply_int8_weight_only", "quantize_embeddings", "set_submodule"]


def quantize_embeddings(model: nn.Module, per_channel: bool) -> int:
    """Quantize input embedding and lm_head; a tied pair keeps sharing one int8 table."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    dtype = embed.weight.dtype
    tied = head is not None and head.weight.data_ptr() == embed.weight.data_ptr()
    qweight, scale = quantize_int8_absmax(embed.weight, per_channel)
    scale = scale.to(dtype)
    model.set_input_embeddings(Int8Embedding(qweight, scale))
    if head is None:
        return 1
    if tied:
        new_head = Int8Linear(qweight, scale, head.bias, dtype)
    else:
        new_head = Int8Linear.from_linear(head, per_channel)
    model.set_output_embeddings(new_head)
    return 2


def apply_int8_weight_only(model: nn.Module, spec: Int8WeightOnlySpec) -> MethodReport:
    started = time.perf_counter()
    before = resident_weight_bytes(model)
    per_channel = spec.granularity == "per-channel"
    targets = target_linears(model, spec.skip)
    for name, linear in tqdm(targets, desc="int8-weight-only", unit="layer", disable=None):
        set_submodule(model, name, Int8Linear.from_linear(linear, per_channel))
    replaced = len(targets)
    if spec.include_embeddings:
        replaced += quantize_embeddings(model, per_channel)
    return MethodReport(
        method=spec.method,
        spec=spec.model_dump(),
        modules_replaced=replaced,
        seconds=time.perf_counter() - started,
        bytes_before=before,
        bytes_after=resident_weight_bytes(model),
    )
