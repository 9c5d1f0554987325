"""Compression methods applied to a loaded model at replica startup."""

from slimserve.compression.registry import apply_compression
from slimserve.compression.report import CompressionReport, MethodReport, resident_weight_bytes
from slimserve.compression.specs import CompressionSpec, Int8WeightOnlySpec

__all__ = [
    "CompressionReport",
    "CompressionSpec",
    "Int8WeightOnlySpec",
    "MethodReport",
    "apply_compression",
    "resident_weight_bytes",
]
