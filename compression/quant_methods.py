"""Quantization methods by name."""

from __future__ import annotations

from slimserve.compression.int8 import apply_int8_weight_only

QUANT_METHODS = {
    "int8-weight-only": apply_int8_weight_only,
}
