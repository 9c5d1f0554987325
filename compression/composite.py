"""Modules that wrap a kernel module (outlier paths, kept input scales), with the artifact-cache
protocol: `meta()` nests the inner module's class path and meta, `from_meta` rebuilds it."""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn


def inner_meta(module: nn.Module) -> dict[str, Any]:
    cls = type(module)
    return {"cls": f"{cls.__module__}:{cls.__qualname__}", "meta": module.meta()}


def inner_from_meta(entry: dict[str, Any]) -> nn.Module:
    module_path, _, qualname = entry["cls"].partition(":")
    obj: Any = importlib.import_module(module_path)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj.from_meta(entry["meta"])
