"""Compression methods applied to a loaded model at replica startup.

The names below load on first use (PEP 562), so that importing a spec module
(`slimserve.compression.specs`, which the config and the gateway need) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .registry import apply_compression
    from .report import (
        CompressionReport,
        MethodReport,
        resident_weight_bytes,
    )
    from .specs import CompressionSpec, Int8WeightOnlySpec

_WHERE = {
    "apply_compression": "slimserve.compression.registry",
    "CompressionReport": "slimserve.compression.report",
    "MethodReport": "slimserve.compression.report",
    "resident_weight_bytes": "slimserve.compression.report",
    "CompressionSpec": "slimserve.compression.specs",
    "Int8WeightOnlySpec": "slimserve.compression.specs",
}

__all__ = [
    "CompressionReport",
    "CompressionSpec",
    "Int8WeightOnlySpec",
    "MethodReport",
    "apply_compression",
    "resident_weight_bytes",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
