"""Per-input-channel scales that leave the float function unchanged (SmoothQuant, AWQ).

A group's input X is divided by s and its weights' columns multiplied by s: (X / s)(W s)^T is
X W^T. The division is folded into the op producing X (a norm's weight, or the rows of the
previous Linear), so it costs nothing at run time; where nothing can take it, the group's
Linears are wrapped in InputScaled, which multiplies by 1/s on the way in.
"""

from __future__ import annotations

from typing import Any, Self

import torch
from torch import nn

from slimserve.kernels.artifact import dtype_from_name, dtype_name, require_keys

from .arch import InputGroup, set_submodule
from .composite import inner_from_meta, inner_meta


def tie_repeats(values: torch.Tensor, group: InputGroup, reduce: str = "amax") -> torch.Tensor:
    """Make a per-channel vector equal across the copies of one `prev` channel (GQA)."""
    if group.repeat == 1:
        return values
    d = group.head_dim
    copies = values.reshape(-1, group.repeat, d)
    tied = copies.amax(dim=1, keepdim=True) if reduce == "amax" else copies.mean(1, keepdim=True)
    return tied.expand_as(copies).reshape(-1)


def prev_channels(s: torch.Tensor, group: InputGroup) -> torch.Tensor:
    """The scale per output channel of `prev` (one copy of each tied block)."""
    if group.repeat == 1:
        return s
    return s.reshape(-1, group.repeat, group.head_dim)[:, 0, :].reshape(-1)


@torch.no_grad()
def fold_into_prev(group: InputGroup, s: torch.Tensor) -> None:
    """Divide the output of `group.prev` by s (per channel)."""
    prev = group.prev
    if prev is None:
        raise ValueError(f"group {group.name} has no previous op to fold a scale into")
    inv = 1.0 / prev_channels(s, group).float()
    if isinstance(prev, nn.Linear):
        prev.weight.copy_(prev.weight.float() * inv[:, None])
        if prev.bias is not None:
            prev.bias.copy_(prev.bias.float() * inv)
    else:
        prev.weight.copy_(prev.weight.float() * inv)


@torch.no_grad()
def scale_columns(group: InputGroup, s: torch.Tensor) -> None:
    """Multiply every weight column of the group's Linears by s (in place)."""
    for _, linear in group.linears:
        linear.weight.copy_(linear.weight.float() * s.float()[None, :])


def apply_input_scale(group: InputGroup, s: torch.Tensor, fold: bool = True) -> bool:
    """Scale the group's weights by s and its input by 1/s; returns whether it was folded.

    Unfolded, the caller must wrap each Linear's replacement in InputScaled(…, 1 / s).
    """
    scale_columns(group, s)
    if fold and group.prev is not None:
        fold_into_prev(group, s)
        return True
    return False


class InputScaled(nn.Module):
    """inner(x * input_scale): a kept (unfolded) smoothing / AWQ scale."""

    def __init__(self, inner: nn.Module, input_scale: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner = inner
        self.in_features = getattr(inner, "in_features", input_scale.numel())
        self.out_features = getattr(inner, "out_features", None)
        self.register_buffer("input_scale", input_scale.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.input_scale)

    def meta(self) -> dict[str, Any]:
        return {"inner": inner_meta(self.inner), "dtype": dtype_name(self.input_scale.dtype)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        require_keys(cls.__name__, meta, ("inner", "dtype"))
        inner = inner_from_meta(meta["inner"])
        dtype = dtype_from_name(meta["dtype"])
        return cls(inner, torch.empty(inner.in_features, dtype=dtype), dtype)


def wrap_unfolded(model: nn.Module, group: InputGroup, s: torch.Tensor, dtype: torch.dtype) -> None:
    """Wrap the group's (already replaced) modules so they see x / s."""
    for name, _ in group.linears:
        set_submodule(model, name, InputScaled(model.get_submodule(name), 1.0 / s, dtype))
