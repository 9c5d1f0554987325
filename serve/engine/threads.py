"""The compute threads of a process that runs a torch engine."""

from __future__ import annotations

import torch

from slimserve.kernels import native

from ..config import EngineOptions


def configure_threads(options: EngineOptions, runs_torch_engine: bool) -> None:
    """torch's intra-op threads, and, where this process runs the torch engine's model, the
    threads of slimserve's own kernels (their own pool, which serves whatever torch's count is).
    A replica whose engine has its own process or is vLLM leaves the kernels unloaded."""
    torch.set_num_threads(options.intra_op_threads())
    if not runs_torch_engine:
        return
    kernels = native.kernels()
    if kernels is not None:
        kernels.set_threads(options.native_kernel_threads())
