"""Sparsity fields shared by the unstructured and N:M pruning methods.

Sparsity is either a float in [0, 1) (unstructured: that fraction of weights becomes zero) or an
"N:M" string (semi-structured: N weights kept in every group of M consecutive input weights, so
"2:4" is 50% sparse in the layout sparse tensor cores and `slimserve.kernels.SparseLinear` use).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from pydantic import Field, field_validator

from ..spec_base import SpecBase

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(sparsity: str) -> tuple[int, int]:
    """ "2:4" -> (2, 4): keep 2 of every 4 consecutive input weights."""
    match = _NM.match(sparsity)
    if match is None:
        raise ValueError(f"sparsity {sparsity!r} is neither a float in [0, 1) nor 'N:M' like '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m or m > 64:
        raise ValueError(f"sparsity {sparsity!r}: need 0 < N < M <= 64 (N kept of every M)")
    return n, m


def decoder_linear_shapes(model_config: Any) -> dict[str, tuple[int, int]]:
    """Qualified name -> (out_features, in_features) of every Linear in the decoder blocks.

    Built on the meta device from the config alone, so no weights are read.
    """
    import torch
    from torch import nn

    from slimserve.models.loading import causal_lm_from_config

    with torch.device("meta"):
        skeleton = causal_lm_from_config(model_config)
    return {
        name: (module.out_features, module.in_features)
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }


class SparsitySpec(SpecBase):
    sparsity: float | str = Field(description='fraction in [0, 1), or "N:M" such as "2:4"')
    # Swap each 2:4 Linear for kernels' SparseLinear (kept half + 2-bit metadata) so the
    # bytes really shrink. Set false to keep a dense Linear with zeros, e.g. when a later
    # quantization spec should still see plain Linear modules.
    pack: bool = True

    @field_validator("sparsity")
    @classmethod
    def _sparsity_valid(cls, value: float | str) -> float | str:
        if isinstance(value, str):
            parse_nm(value)
            return value.replace(" ", "")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {value}")
        return value

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_nm(self.sparsity) if isinstance(self.sparsity, str) else None

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1.0 - nm[0] / nm[1] if nm else float(self.sparsity)

    def check_model(self, model_config: Any) -> None:
        nm = self.nm
        if nm is None:
            return
        for name, (_, in_features) in decoder_linear_shapes(model_config).items():
            if any(fnmatch.fnmatch(name, pattern) for pattern in self.skip):
                continue
            if in_features % nm[1]:
                raise ValueError(
                    f"sparsity {self.sparsity!r}: {name} has {in_features} input features, "
                    f"not divisible by {nm[1]}; add it to skip or choose another N:M"
                )
