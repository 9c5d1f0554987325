"""Fused projections compute exactly what the separate ones do, for every module type."""

import pytest
import torch
from torch import nn

from slimserve.kernels import (
    Int8Linear,
    LowBitLinear,
    SparseLinear,
    W8A8Linear,
    quantize_int8_absmax,
)
from slimserve.kernels.fuse import fuse_linears


def _linears(sizes=(48, 16, 16), k=64, bias=False):
    torch.manual_seed(0)
    return [nn.Linear(k, n, bias=bias) for n in sizes]


def _lowbit(linear, bits, group=32):
    w = linear.weight.float()
    n, k = w.shape
    grouped = w.view(n, k // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    top = 2**bits - 1
    scale = ((high - low) / top).clamp(min=1e-8)
    zero = torch.round(-low / scale).clamp(0, top)
    codes = torch.clamp(torch.round(grouped / scale[..., None]) + zero[..., None], 0, top)
    return LowBitLinear.from_codes(
        codes.view(n, k).to(torch.uint8), scale, zero, group, bits, linear.bias, torch.float32
    )


def _w8a8(linear):
    q, scale = quantize_int8_absmax(linear.weight)
    return W8A8Linear.from_quantized(q, scale, linear.bias, torch.float32)


def _sparse24(linear):
    w = linear.weight.detach().clone()
    groups = w.view(w.shape[0], -1, 4)
    groups.scatter_(-1, groups.abs().topk(2, dim=-1, largest=False).indices, 0.0)
    return SparseLinear.from_dense(w, linear.bias, torch.float32)


MAKERS = {
    "dense": lambda m: m,
    "int8": Int8Linear.from_linear,
    "w8a8": _w8a8,
    "w4": lambda m: _lowbit(m, 4),
    "w3": lambda m: _lowbit(m, 3),
    "sparse24": _sparse24,
}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_equals_concatenated(kind, bias, rows):
    modules = [MAKERS[kind](m) for m in _linears(bias=bias)]
    fused = fuse_linears(modules)
    assert fused is not None
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        expected = torch.cat([m(x) for m in modules], dim=-1)
        got = fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mixed_kinds_are_not_fused():
    dense, other = _linears(sizes=(16, 16))
    assert fuse_linears([dense, Int8Linear.from_linear(other)]) is None
    a, b = (
        _lowbit(m, 4, group) for m, group in zip(_linears(sizes=(16, 16)), (32, 64), strict=True)
    )
    assert fuse_linears([a, b]) is None


def test_sparse_modules_packed_for_cpu_are_not_fused():
    a, b = (_sparse24(m) for m in _linears(sizes=(16, 16)))
    a.pack_for_cpu()
    assert fuse_linears([a, b]) is None
