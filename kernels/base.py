"""The base of every compressed Linear module: shape and bias handling, the artifact meta, and
the hook that packs a module for CPU serving (`pack_for_cpu`, applied to a whole model by
`pack_model_for_cpu`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

import torch
from torch import nn

from .artifact import dtype_from_name, dtype_name, require_keys

if TYPE_CHECKING:
    from .decode_step import NativeProjection


class CompressedLinear(nn.Module):
    """nn.Linear-compatible shell: flattens leading dims, adds the bias, restores the shape."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        has_bias: bool,
        compute_dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        dtype_name(compute_dtype)  # validates
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"bad shape: in_features={in_features}, out_features={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        bias = torch.empty(out_features, dtype=compute_dtype, device=device) if has_bias else None
        self.register_buffer("bias", bias)

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if (bias is None) != (self.bias is None):
            raise ValueError("bias presence differs from has_bias")
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {bias.shape}")
            self.bias.copy_(bias.detach())

    def _base_meta(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "has_bias": self.bias is not None,
            "dtype": dtype_name(self.compute_dtype),
        }

    def meta(self) -> dict[str, Any]:
        """Constructor arguments for the artifact cache (subclasses with more add to them)."""
        return self._base_meta()

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        """A module with empty buffers of the right shapes, for `load_state_dict`."""
        require_keys(cls.__name__, meta, ("in_features", "out_features", "has_bias", "dtype"))
        return cls(
            int(meta["in_features"]),
            int(meta["out_features"]),
            bool(meta["has_bias"]),
            dtype_from_name(meta["dtype"]),
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] in compute_dtype -> [M, N] in compute_dtype, without the bias."""
        raise NotImplementedError

    def native_projection(self) -> NativeProjection | None:
        """This projection as the one-call decode step reads it (kernels/decode_step.py), or
        None where no packed copy of ours serves decode rows (the default): the engine then
        calls the modules one by one."""
        return None

    def pack_for_cpu(self) -> int:
        """Move the weight into the layout the CPU kernels read fastest, once, before serving;
        the module may then no longer be saved or moved. Returns the bytes of the weight copies
        held for CPU serving (0: nothing to pack, the default)."""
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(
                f"expected last dim {self.in_features}, got input shape {tuple(shape)}"
            )
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != self.compute_dtype:
            x2 = x2.to(self.compute_dtype)
        out = self.matmul(x2)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def pack_model_for_cpu(model: nn.Module) -> int:
    """Pack every compressed Linear in `model` for CPU serving, nested ones included (e.g. the
    W8A8 inside LLM.int8's mixed module); returns the bytes of the copies held for it."""
    return sum(m.pack_for_cpu() for m in model.modules() if isinstance(m, CompressedLinear))
