"""Process and accelerator memory of one replica."""

from __future__ import annotations

import psutil
import torch
from pydantic import BaseModel


class MemoryStats(BaseModel):
    rss_bytes: int  # resident set size of this process
    gpu_allocated_bytes: int  # tensors allocated by torch on the current GPU (0 without one)
    gpu_peak_bytes: int  # the most ever allocated since the process started


def memory_stats() -> MemoryStats:
    allocated = peak = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        allocated = torch.cuda.memory_allocated()
        peak = torch.cuda.max_memory_allocated()
    return MemoryStats(
        rss_bytes=psutil.Process().memory_info().rss,
        gpu_allocated_bytes=allocated,
        gpu_peak_bytes=peak,
    )
