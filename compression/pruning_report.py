"""What the pruning and low-rank methods put in their MethodReport: time, bytes, sparsity."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .report import MethodReport, resident_weight_bytes
from .spec_base import SpecBase


def zero_fraction(weights: Iterable[torch.Tensor]) -> float:
    zeros = total = 0
    for weight in weights:
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)


class ReportTimer:
    """Collects what a method needs for its MethodReport: time and bytes before/after."""

    def __init__(self, model: nn.Module, spec: SpecBase) -> None:
        self.model = model
        self.spec = spec
        self.started = time.perf_counter()
        self.bytes_before = resident_weight_bytes(model)

    def report(self, modules_replaced: int, **detail: Any) -> MethodReport:
        return MethodReport(
            method=self.spec.method,  # type: ignore[attr-defined]
            spec=self.spec.model_dump(mode="json"),
            modules_replaced=modules_replaced,
            seconds=time.perf_counter() - self.started,
            bytes_before=self.bytes_before,
            bytes_after=resident_weight_bytes(self.model),
            detail=detail,
        )
