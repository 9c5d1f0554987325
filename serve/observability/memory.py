"""Process and accelerator memory of one replica."""

from __future__ import annotations

import contextlib

import psutil
import torch
from pydantic import BaseModel


class MemoryStats(BaseModel):
    rss_bytes: int  # resident set size of this process and its children (the engine's)
    gpu_allocated_bytes: int  # tensors allocated by torch on the current GPU (0 without one)
    gpu_peak_bytes: int  # the most ever allocated since the process started


def _tree_rss(process: psutil.Process) -> int:
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it may exit meanwhile
            total += child.memory_info().rss
    return total


def memory_stats() -> MemoryStats:
    allocated = peak = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        allocated = torch.cuda.memory_allocated()
        peak = torch.cuda.max_memory_allocated()
    return MemoryStats(
        rss_bytes=_tree_rss(psutil.Process()),
        gpu_allocated_bytes=allocated,
        gpu_peak_bytes=peak,
    )
