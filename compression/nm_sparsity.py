"""Masks from importance scores (unstructured and N:M) and packing 2:4 weights.

A mask is True where a weight is removed. Selection uses topk on indices rather than a threshold so
ties never change the count: the achieved sparsity is exactly the rounded target.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .arch import set_submodule

log = logging.getLogger(__name__)


def lowest_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """True at exactly k lowest scores along `dim` (ties broken by position)."""
    if scores.dim() == 1 and k > 0:
        return _lowest_flat(scores, k)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(dim, scores.topk(k, dim=dim, largest=False).indices, True)
    return mask


def _lowest_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    # kthvalue is a linear-time selection; topk with k ~ n/2 sorts and is several times slower.
    threshold = scores.kthvalue(k).values
    mask = scores < threshold
    ties = (scores == threshold).nonzero().squeeze(1)[: k - int(mask.sum())]
    mask[ties] = True
    return mask


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest `sparsity` share of every row (per output comparison, as in Wanda)."""
    return lowest_mask(scores, round(sparsity * scores.shape[1]), dim=1)


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove the lowest `sparsity` share of the whole matrix."""
    flat = lowest_mask(scores.reshape(-1), round(sparsity * scores.numel()), dim=0)
    return flat.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive scores along the last dim (K % m == 0)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features are not divisible by M={m}")
    groups = scores.reshape(rows, cols // m, m)
    return lowest_mask(groups, m - n, dim=2).view(rows, cols)


def holds_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive weights along K has at most n nonzeros."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // m, m).sum(-1)
    return bool((nonzero <= n).all())


def sparse_linear_class() -> type | None:
    """kernels' SparseLinear when the kernels package provides it."""
    try:
        from slimserve.kernels import SparseLinear
    except ImportError:
        return None
    return SparseLinear


def pack_2_4(model: nn.Module, names: list[str]) -> int:
    """Swap 2:4-sparse Linears for SparseLinear (kept half + metadata); returns how many."""
    cls = sparse_linear_class()
    if cls is None:
        log.warning("slimserve.kernels has no SparseLinear; 2:4 weights stay dense with zeros")
        return 0
    for name in names:
        linear = model.get_submodule(name)
        packed = cls.from_dense(linear.weight.data, linear.bias, linear.weight.dtype)
        set_submodule(model, name, packed)
    return len(names)
