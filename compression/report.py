"""What a compression did: per method, and for the model as a whole."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field
from torch import nn


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counting storage shared by tied tensors once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


class MethodReport(BaseModel):
    method: str
    spec: dict[str, Any]
    modules_replaced: int
    seconds: float
    bytes_before: int
    bytes_after: int
    detail: dict[str, Any] = Field(default_factory=dict)


class CompressionReport(BaseModel):
    methods: list[MethodReport] = Field(default_factory=list)
    weight_bytes_before: int
    weight_bytes_after: int

    @property
    def compression_ratio(self) -> float:
        """Original bytes over compressed bytes (2.0 means half the size)."""
        return self.weight_bytes_before / max(self.weight_bytes_after, 1)

    def summary(self) -> str:
        if not self.methods:
            return f"no compression; {self.weight_bytes_after / 1e6:.1f} MB of weights"
        steps = ", ".join(
            f"{m.method} ({m.modules_replaced} modules, {m.seconds:.2f}s)" for m in self.methods
        )
        return (
            f"{steps}: weights {self.weight_bytes_before / 1e6:.1f} MB -> "
            f"{self.weight_bytes_after / 1e6:.1f} MB ({self.compression_ratio:.2f}x smaller)"
        )
