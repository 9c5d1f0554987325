"""The compute threads of a process that runs a torch engine."""

from __future__ import annotations

import torch

from slimserve.kernels import native

from ..config import EngineOptions


def configure_threads(options: EngineOptions) -> None:
    """torch's intra-op threads, and the threads of slimserve's own kernels (their own pool,
    which serves whatever torch's count is)."""
    torch.set_num_threads(options.intra_op_threads())
    kernels = native.kernels()
    if kernels is not None:
        kernels.set_threads(options.native_kernel_threads())
