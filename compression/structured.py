"""Structured pruning of attention heads and MLP channels: the tensors really shrink.

Counts stay uniform across layers (the serving runner and the cached-artifact skeleton both read
head counts and intermediate_size from model.config), but which heads or channels go is chosen
per layer from calibration data.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .arch import InputGroup, UnsupportedArchitectureError, decoder_layers
from .calib_data import calibration_ids
from .hooks import InputStats
from .layerwise import run_layerwise
from .methods.prune_ffn import FFNPruneSpec
from .methods.prune_heads import HeadPruneSpec
from .pruning_report import ReportTimer
from .report import MethodReport

log = logging.getLogger(__name__)


def shrink_linear(
    linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    """A new Linear keeping output `rows` and input `cols` (None keeps all)."""
    weight = linear.weight.data
    bias = linear.bias.data if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    out_features, in_features = weight.shape
    new = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _require_linear(module: nn.Module, what: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise UnsupportedArchitectureError(
            f"{what} is {type(module).__name__}, not nn.Linear: apply structured pruning before "
            "quantization or low-rank methods"
        )
    return module


class HeadImportance:
    """Per head: sum over tokens of ||W_o[:, head] a_head||^2, the head's share of o_proj output.

    Accumulated as per-head Gram matrices A_h^T A_h ([D, D] each), then contracted with
    W_h^T W_h once: the same number, at a fraction of the cost of projecting every head.
    """

    def __init__(self, o_proj: nn.Linear, n_heads: int, head_dim: int) -> None:
        self.o_proj = o_proj
        self.n_heads, self.head_dim = n_heads, head_dim
        self.grams = torch.zeros(n_heads, head_dim, head_dim)

    def add(self, x: torch.Tensor) -> None:
        heads = x.float().view(-1, self.n_heads, self.head_dim).transpose(0, 1)
        self.grams += heads.transpose(1, 2) @ heads

    @property
    def scores(self) -> torch.Tensor:
        w = self.o_proj.weight.detach().float().view(-1, self.n_heads, self.head_dim)
        w_grams = torch.einsum("ohd,ohe->hde", w, w)
        return (self.grams * w_grams).sum(dim=(1, 2))


def choose_heads(
    scores: torch.Tensor, n_kv: int, keep_kv: int | None, keep_per_group: int | None
) -> tuple[list[int], list[list[int]]]:
    """Kept KV groups and, for each, its kept query heads (indices within the group)."""
    per_group = scores.shape[0] // n_kv
    grid = scores.view(n_kv, per_group)
    groups = list(range(n_kv))
    if keep_kv is not None:
        groups = sorted(grid.sum(1).topk(keep_kv).indices.tolist())
    heads = []
    for group in groups:
        if keep_per_group is None:
            heads.append(list(range(per_group)))
        else:
            heads.append(sorted(grid[group].topk(keep_per_group).indices.tolist()))
    return groups, heads


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def prune_attention_heads(
    attn: nn.Module, groups: list[int], heads: list[list[int]], per_group: int, head_dim: int
) -> None:
    """Shrink q/k/v rows and o_proj columns; query heads stay grouped by their KV head."""
    query_heads = [g * per_group + h for g, kept in zip(groups, heads, strict=True) for h in kept]
    q_rows = _head_rows(query_heads, head_dim)
    kv_rows = _head_rows(groups, head_dim)
    for name, rows, cols in (
        ("q_proj", q_rows, None),
        ("k_proj", kv_rows, None),
        ("v_proj", kv_rows, None),
        ("o_proj", None, q_rows),
    ):
        linear = _require_linear(getattr(attn, name), f"self_attn.{name}")
        setattr(attn, name, shrink_linear(linear, rows, cols))
    attn.num_key_value_groups = len(heads[0])
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(query_heads)
    if hasattr(attn, "num_key_value_heads"):
        attn.num_key_value_heads = len(groups)


def _reads(group: InputGroup, suffix: str) -> bool:
    """Whether the group is the Linear named `suffix` (o_proj, down_proj) alone."""
    return len(group.linears) == 1 and group.linears[0][0].endswith(suffix)


@torch.no_grad()
def apply_head_pruning(model: nn.Module, spec: HeadPruneSpec) -> MethodReport:
    timer = ReportTimer(model, spec)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    spec.check_model(cfg)
    per_group = n_heads // n_kv
    removed: list[list[int]] = []  # per layer, in order
    kept_heads = kept_kv = 0

    def record(group: InputGroup) -> HeadImportance | None:
        if not _reads(group, ".self_attn.o_proj"):
            return None
        return HeadImportance(group.linears[0][1], n_heads, head_dim)

    def process(
        layer: nn.Module, groups: list[InputGroup], stats: dict[str, HeadImportance]
    ) -> None:
        nonlocal kept_heads, kept_kv
        attn = layer.self_attn
        _require_linear(attn.o_proj, "o_proj")
        (importance,) = stats.values()
        groups_kept, heads = choose_heads(
            importance.scores, n_kv, spec.keep_kv_heads, spec.keep_heads_per_group
        )
        kept = {g * per_group + h for g, hs in zip(groups_kept, heads, strict=True) for h in hs}
        removed.append(sorted(set(range(n_heads)) - kept))
        prune_attention_heads(attn, groups_kept, heads, per_group, head_dim)
        kept_heads, kept_kv = len(kept), len(groups_kept)

    run_layerwise(
        model,
        calibration_ids(model, spec.calibration),
        record,
        process,
        skip=[],
        propagate="processed",  # later layers score on the pruned layers' outputs
        desc="prune-heads",
    )
    cfg.head_dim = head_dim  # explicit: hidden_size // num_attention_heads no longer holds
    cfg.num_attention_heads = kept_heads
    cfg.num_key_value_heads = kept_kv
    return timer.report(
        4 * len(removed),
        heads=f"{n_heads} -> {kept_heads}",
        kv_heads=f"{n_kv} -> {kept_kv}",
        removed_heads={str(index): heads for index, heads in enumerate(removed)},
    )


def prune_mlp_channels(mlp: nn.Module, keep: torch.Tensor) -> None:
    for name in ("gate_proj", "up_proj"):
        linear = _require_linear(getattr(mlp, name), f"mlp.{name}")
        setattr(mlp, name, shrink_linear(linear, rows=keep))
    mlp.down_proj = shrink_linear(_require_linear(mlp.down_proj, "mlp.down_proj"), cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


@torch.no_grad()
def apply_ffn_pruning(model: nn.Module, spec: FFNPruneSpec) -> MethodReport:
    """Channel score ||a_j||_2 * ||W_down[:, j]||_2: its activation times its output weight."""
    timer = ReportTimer(model, spec)
    cfg = model.config
    size = cfg.intermediate_size
    width = spec.kept_width(size)
    spec.check_model(cfg)

    def record(group: InputGroup) -> InputStats | None:
        return InputStats(group.in_features) if _reads(group, ".mlp.down_proj") else None

    def process(layer: nn.Module, groups: list[InputGroup], stats: dict[str, InputStats]) -> None:
        mlp = layer.mlp
        down = _require_linear(mlp.down_proj, "mlp.down_proj")
        (norms,) = stats.values()
        scores = norms.norms * down.weight.detach().float().norm(dim=0)
        prune_mlp_channels(mlp, scores.topk(width).indices.sort().values)

    run_layerwise(
        model,
        calibration_ids(model, spec.calibration),
        record,
        process,
        skip=[],
        propagate="processed",  # later layers score on the pruned layers' outputs
        desc="prune-ffn",
    )
    cfg.intermediate_size = width
    layers = len(decoder_layers(model))
    return timer.report(3 * layers, intermediate_size=f"{size} -> {width}", layers=layers)
