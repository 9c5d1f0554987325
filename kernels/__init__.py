"""slimserve kernels: compressed Linear modules and the matmul ops behind them.

The public names load on first use (PEP 562), so that `slimserve.kernels.cpu_isa`, which the
torch-free gateway reads, does not import torch; importing this package never imports triton
either: the Triton kernels load on first CUDA use.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "Int8Embedding": "int8",
    "Int8Linear": "int8",
    "int8_weight_matmul": "int8",
    "quantize_int8_absmax": "int8",
    "LowBitLinear": "lowbit",
    "lowbit_weight_matmul": "lowbit",
    "quantize_per_token_int8": "reference",
    "SparseLinear": "sparse24",
    "sparse24_matmul": "sparse24",
    "W8A8Linear": "w8a8",
    "w8a8_matmul": "w8a8",
}
_MODULES = ("cpu_isa", "cpu_paths", "native")

__all__ = ["COMPRESSED_MODULES", *_EXPORTS, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    if name == "COMPRESSED_MODULES":
        return tuple(
            __getattr__(cls)
            for cls in ("Int8Linear", "Int8Embedding", "LowBitLinear", "W8A8Linear", "SparseLinear")
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
