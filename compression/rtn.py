"""Round-to-nearest group-wise int4 / int3 (asymmetric, weight-only): the no-data baseline."""

from __future__ import annotations

import time

from torch import nn
from tqdm.auto import tqdm

from .arch import set_submodule, target_linears
from .grid import quantize_groups
from .lowbit import lowbit_linear
from .quant_specs import RTNSpec
from .report import MethodReport, resident_weight_bytes


def apply_rtn(model: nn.Module, spec: RTNSpec) -> MethodReport:
    spec.check_model(model.config)  # a clear error before any work, not a kernel's
    started = time.perf_counter()
    before = resident_weight_bytes(model)
    targets = target_linears(model, spec.skip)
    desc = f"rtn w{spec.bits}g{spec.group_size}"
    for name, linear in tqdm(targets, desc=desc, unit="layer", disable=None):
        quant = quantize_groups(
            linear.weight, spec.bits, spec.group_size, integer_zero=spec.zero_point == "integer"
        )
        set_submodule(model, name, lowbit_linear(quant, linear.bias, linear.weight.dtype))
    return MethodReport(
        method=spec.method,
        spec=spec.model_dump(),
        modules_replaced=len(targets),
        seconds=time.perf_counter() - started,
        bytes_before=before,
        bytes_after=resident_weight_bytes(model),
    )
