"""Artifact-cache protocol shared by the compressed modules.

`meta()` returns the JSON-serializable constructor arguments (shapes, bits, dtype name, ...);
`from_meta(meta)` allocates a module with empty buffers of the right shapes and dtypes, which
`load_state_dict` then fills. Every packed tensor lives in a registered buffer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported compute dtype {dtype}; expected one of {sorted(_DTYPES)}")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype name {name!r} in module meta; expected one of {sorted(_DTYPES)}"
        ) from None


def require_keys(cls_name: str, meta: dict[str, Any], keys: Iterable[str]) -> None:
    missing = [key for key in keys if key not in meta]
    if missing:
        raise ValueError(f"{cls_name} meta is missing {missing}; got keys {sorted(meta)}")
