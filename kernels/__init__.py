"""slimserve kernels: compressed Linear modules and the matmul ops behind them."""

from slimserve.kernels.int8 import (
    Int8Embedding,
    Int8Linear,
    int8_weight_matmul,
    quantize_int8_absmax,
)

__all__ = ["Int8Embedding", "Int8Linear", "int8_weight_matmul", "quantize_int8_absmax"]
