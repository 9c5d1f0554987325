"""When the Triton kernels may run. Nothing here imports triton itself."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

# Decode batches up to this many rows take the low-bit GEMV kernel: it re-reads each weight tile
# per row from cache instead of padding M up to a 16-row tensor-core tile.
LOWBIT_GEMV_MAX_M = 16
TRITON_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs the kernels on CPU tensors (correctness only)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Triton compiles for CUDA tensors; CPU tensors only run under the interpreter, which is
    far too slow to serve with, so the dispatch only picks Triton for CUDA tensors."""
    return t.is_cuda and triton_installed()


def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number keeps split-K covered in tests


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """The Triton 3.9 interpreter multiplies bf16 dot operands as their raw uint16 bit patterns
    (numpy has no bf16), so under the interpreter bf16 tiles are widened to fp32 before tl.dot.
    That is exact: bf16 -> fp32 is lossless and the GPU MMA also accumulates bf16 products in fp32.
    On a GPU the native bf16 dot runs."""
    return interpreting() and dtype == torch.bfloat16
