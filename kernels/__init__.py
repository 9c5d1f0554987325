"""slimserve kernels: compressed Linear modules and the matmul ops behind them.

Importing this package never imports triton; the Triton kernels load on first CUDA use.
"""

from slimserve.kernels import cpu_paths, native
from slimserve.kernels.int8 import (
    Int8Embedding,
    Int8Linear,
    int8_weight_matmul,
    quantize_int8_absmax,
)
from slimserve.kernels.lowbit import LowBitLinear, lowbit_weight_matmul
from slimserve.kernels.reference import quantize_per_token_int8
from slimserve.kernels.sparse24 import SparseLinear, sparse24_matmul
from slimserve.kernels.w8a8 import W8A8Linear, w8a8_matmul

COMPRESSED_MODULES = (Int8Linear, Int8Embedding, LowBitLinear, W8A8Linear, SparseLinear)

__all__ = [
    "COMPRESSED_MODULES",
    "Int8Embedding",
    "Int8Linear",
    "LowBitLinear",
    "SparseLinear",
    "W8A8Linear",
    "cpu_paths",
    "int8_weight_matmul",
    "lowbit_weight_matmul",
    "native",
    "quantize_int8_absmax",
    "quantize_per_token_int8",
    "sparse24_matmul",
    "w8a8_matmul",
]
