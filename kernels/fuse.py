"""Fuse projections that read the same input (q|k|v, gate|up) into one module.

One matmul over the concatenated output channels replaces several: fewer calls per layer and
larger N per call. Every module type keeps its own format (dense weights are prepacked for
oneDNN); mixed or unknown types are not fused.
"""

from __future__ import annotations

import torch
from torch import nn

from .dense_cpu import fuse_dense
from .int8 import Int8Linear
from .lowbit import LowBitLinear
from .packing import unpack_int3, unpack_int4
from .sparse24 import SparseLinear
from .w8a8 import W8A8Linear


def _bias(modules: list[nn.Module]) -> torch.Tensor | None:
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    if any(b is None for b in biases):
        # One projection without bias: zeros keep the fused output identical.
        biases = [
            torch.zeros(m.out_features, dtype=next(b for b in biases if b is not None).dtype)
            if m.bias is None
            else m.bias
            for m in modules
        ]
    return torch.cat([b.detach() for b in biases])


def _codes(module: LowBitLinear) -> torch.Tensor:
    if module.bits == 4:
        return unpack_int4(module.qweight)
    return unpack_int3(module.qweight, module.qweight_hi)


def fuse_linears(modules: list[nn.Module]) -> nn.Module | None:
    """A module whose output is the concatenation of `modules`' outputs, or None."""
    if all(type(m) is nn.Linear for m in modules):
        return fuse_dense(modules)
    kinds = {type(m) for m in modules}
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    if kind is Int8Linear:
        scale_dtype = modules[0].scale.dtype
        return Int8Linear(
            torch.cat([m.qweight for m in modules]),
            torch.cat([m.scale for m in modules]),
            _bias(modules),
            scale_dtype,
        )
    if kind is W8A8Linear:
        return W8A8Linear.from_quantized(
            torch.cat([m.qweight for m in modules]),
            torch.cat([m.weight_scale for m in modules]),
            _bias(modules),
            modules[0].compute_dtype,
        )
    if kind is SparseLinear:
        # Values and position codes are per output channel: they concatenate as they stand.
        if any(m.cpu_values is not None for m in modules):
            return None  # packed for CPU serving already: the plain buffers are gone
        return SparseLinear.from_compressed(
            torch.cat([m.values for m in modules]),
            torch.cat([m.meta_bits for m in modules]),
            _bias(modules),
            modules[0].compute_dtype,
        )
    if kind is LowBitLinear:
        first = modules[0]
        if any(m.bits != first.bits or m.group_size != first.group_size for m in modules):
            return None
        return LowBitLinear.from_codes(
            torch.cat([_codes(m) for m in modules]),
            torch.cat([m.scales for m in modules]),
            torch.cat([m.zeros for m in modules]),
            first.group_size,
            first.bits,
            _bias(modules),
            first.compute_dtype,
        )
    return None
