"""Shared pieces of the pruning methods: finding blocks and Linears, measuring sparsity."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .report import MethodReport, resident_weight_bytes
from .spec_base import SpecBase


class UnsupportedArchitectureError(ValueError):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-family causal LM (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no model.layers; pruning supports Llama-family models"
        )
    return layers


def matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


def layer_linears(
    model: nn.Module, index: int, skip: list[str], targets: list[str] | None = None
) -> dict[str, nn.Linear]:
    """Qualified name -> Linear inside decoder block `index`, minus `skip`, within `targets`."""
    prefix = f"model.layers.{index}."
    found = {}
    for name, module in decoder_layers(model)[index].named_modules():
        full = prefix + name
        if not isinstance(module, nn.Linear) or matches(full, skip):
            continue
        if targets is not None and not matches(full, targets):
            continue
        found[full] = module
    return found


def all_layer_linears(
    model: nn.Module, skip: list[str], targets: list[str] | None = None
) -> dict[str, nn.Linear]:
    found: dict[str, nn.Linear] = {}
    for index in range(len(decoder_layers(model))):
        found.update(layer_linears(model, index, skip, targets))
    return found


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
