"""Low-rank factorization: W [N, K] ~ B [N, r] @ A [r, K], stored as two thinner Linears.

Plain SVD minimises ||W - BA||_F. The activation-aware form minimises the output error on
calibration inputs, ||(W - BA) X^T||_F: with S the Cholesky factor of X^T X / n (S S^T), it is the
truncated SVD of W S mapped back by S^-1 (the whitening of SVD-LLM, Wang et al. 2024).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from slimserve.kernels.artifact import dtype_from_name, dtype_name, require_keys

from .arch import InputGroup, block_linears, set_submodule
from .calib_data import calibration_ids
from .hooks import InputStats
from .layerwise import run_layerwise
from .methods.low_rank import LowRankSpec
from .pruning_report import ReportTimer
from .report import MethodReport

log = logging.getLogger(__name__)


class LowRankLinear(nn.Module):
    """y = up(down(x)): down [r, K] without bias, up [N, r] with the original bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.has_bias, self.dtype = bias, dtype  # the factors may later become int8 modules
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def meta(self) -> dict[str, Any]:
        """Constructor arguments for the artifact cache (same protocol as slimserve.kernels)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "has_bias": self.has_bias,
            "dtype": dtype_name(self.dtype),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> LowRankLinear:
        keys = ("in_features", "out_features", "rank", "has_bias", "dtype")
        require_keys(cls.__name__, meta, keys)
        return cls(
            int(meta["in_features"]),
            int(meta["out_features"]),
            int(meta["rank"]),
            bool(meta["has_bias"]),
            dtype_from_name(meta["dtype"]),
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def whitening(second_moment: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower Cholesky factor S of E[x x^T] (+ a small ridge so it is invertible)."""
    h = second_moment.float().clone()
    h.diagonal().add_(damp * h.diagonal().mean() + 1e-8)
    return torch.linalg.cholesky(h)


def choose_rank(singular: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return min(rank, singular.numel())
    share = singular.pow(2).cumsum(0) / singular.pow(2).sum().clamp(min=1e-30)
    return int((share < energy).sum()) + 1


def factorize(
    weight: torch.Tensor,
    rank: int | None = None,
    energy: float | None = None,
    second_moment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [N, r], A [r, K]) in float32, with B @ A ~ weight."""
    w = weight.detach().float()
    scale = whitening(second_moment) if second_moment is not None else None
    target = w @ scale if scale is not None else w
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root.unsqueeze(1) * vh[:r]
    if scale is not None:
        # a S^-1: solve S^T a'^T = a^T, i.e. a' = a @ S^-1 without forming the inverse.
        a = torch.linalg.solve_triangular(scale, a, upper=False, left=False)
    return b, a


def low_rank_linear(linear: nn.Linear, b: torch.Tensor, a: torch.Tensor) -> LowRankLinear:
    dtype = linear.weight.dtype
    module = LowRankLinear(
        linear.in_features, linear.out_features, a.shape[0], linear.bias is not None, dtype
    )
    module.down.weight.data.copy_(a.to(dtype))
    module.up.weight.data.copy_(b.to(dtype))
    if linear.bias is not None:
        module.up.bias.data.copy_(linear.bias.data)
    return module


@torch.no_grad()
def apply_low_rank(model: nn.Module, spec: LowRankSpec) -> MethodReport:
    timer = ReportTimer(model, spec)
    ranks: dict[str, int] = {}
    kept_dense: list[str] = []

    def replace(name: str, linear: nn.Linear, moment: torch.Tensor | None) -> None:
        b, a = factorize(linear.weight, spec.rank, spec.energy, moment)
        rank = a.shape[0]
        if rank * (linear.in_features + linear.out_features) >= linear.weight.numel():
            kept_dense.append(name)  # two factors would be no smaller than W
            return
        set_submodule(model, name, low_rank_linear(linear, b, a))
        ranks[name] = rank

    wanted = block_linears(model, spec.skip, spec.targets)

    def targeted(group: InputGroup) -> list[tuple[str, nn.Linear]]:
        return [(name, linear) for name, linear in group.linears if name in wanted]

    def record(group: InputGroup) -> InputStats | None:
        # fp32 products: the whitening is a Cholesky factor of this matrix.
        return InputStats(group.in_features, gram="fp32") if targeted(group) else None

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        for group in groups:
            for name, linear in targeted(group):
                replace(name, linear, stats[group.name].hessian)

    if spec.activation_aware:
        run_layerwise(
            model,
            calibration_ids(model, spec.calibration),
            record,
            process,
            skip=spec.skip,
            propagate="processed",  # whitened on the factorized blocks' outputs
            desc="low-rank",
        )
    else:
        for name, linear in wanted.items():
            replace(name, linear, None)
    if kept_dense:
        log.info("low-rank kept %d Linears dense (rank too high to save bytes)", len(kept_dense))
    return timer.report(
        len(ranks),
        ranks=ranks,
        mean_rank=sum(ranks.values()) / max(len(ranks), 1),
        kept_dense=kept_dense,
    )
