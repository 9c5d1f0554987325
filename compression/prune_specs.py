"""Specs of the pruning and low-rank methods (one pydantic model each, keyed by `method`).

Sparsity is either a float in [0, 1) (unstructured: that fraction of weights becomes zero) or an
"N:M" string (semi-structured: N weights kept in every group of M consecutive input weights, so
"2:4" is 50% sparse in the layout sparse tensor cores and `slimserve.kernels.SparseLinear` use).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .spec_base import CalibrationSpec, SpecBase

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
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    return {
        name: (module.out_features, module.in_features)
        for name, module in skeleton.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    }


class _SparsitySpec(SpecBase):
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


class MagnitudeSpec(_SparsitySpec):
    """Zero the smallest |W| (Han et al. 2015 style one-shot magnitude pruning)."""

    method: Literal["magnitude"]
    # per-layer: every Linear reaches the target; global: one threshold over all of them.
    scope: Literal["per-layer", "global"] = "per-layer"

    @model_validator(mode="after")
    def _global_is_unstructured(self) -> MagnitudeSpec:
        if self.scope == "global" and self.nm is not None:
            raise ValueError("scope: 'global' needs a float sparsity; N:M is per group already")
        return self


class WandaSpec(_SparsitySpec):
    """Score |W_ij| * ||X_j||_2 and prune per output row (Sun et al. 2023)."""

    method: Literal["wanda"]
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)


class SparseGPTSpec(_SparsitySpec):
    """One-shot OBS solver: prune and update the remaining weights (Frantar & Alistarh 2023)."""

    method: Literal["sparsegpt"]
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy update block")
    damp: float = Field(0.01, gt=0, lt=1, description="added to the Hessian diagonal, x mean")


class _UniformStructuredSpec(SpecBase):
    """Structured specs change every layer alike; per-layer exceptions would break that."""

    @field_validator("skip")
    @classmethod
    def _no_skip(cls, skip: list[str]) -> list[str]:
        if skip:
            raise ValueError("structured pruning changes every layer alike; skip is not supported")
        return skip


class HeadPruneSpec(_UniformStructuredSpec):
    """Remove attention heads, the same count in every layer (the serving runner needs it).

    keep_kv_heads removes whole GQA groups (a KV head with its query heads);
    keep_heads_per_group removes query heads inside each group. Importance is each head's
    contribution to the o_proj output on calibration text.
    """

    method: Literal["prune-heads"]
    keep_kv_heads: int | None = Field(None, ge=1)
    keep_heads_per_group: int | None = Field(None, ge=1)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @model_validator(mode="after")
    def _something_to_do(self) -> HeadPruneSpec:
        if self.keep_kv_heads is None and self.keep_heads_per_group is None:
            raise ValueError("set keep_kv_heads and/or keep_heads_per_group")
        return self

    def check_model(self, model_config: Any) -> None:
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        if self.keep_kv_heads is not None and self.keep_kv_heads >= kv_heads:
            raise ValueError(
                f"keep_kv_heads={self.keep_kv_heads} must be below the model's {kv_heads} KV heads"
            )
        per_group = heads // kv_heads
        if self.keep_heads_per_group is not None and self.keep_heads_per_group > per_group:
            raise ValueError(
                f"keep_heads_per_group={self.keep_heads_per_group} exceeds the model's "
                f"{per_group} query heads per KV head"
            )


class FFNPruneSpec(_UniformStructuredSpec):
    """Remove MLP channels (gate/up rows, down columns), the same count in every layer."""

    method: Literal["prune-ffn"]
    keep_fraction: float = Field(gt=0, lt=1, description="of intermediate_size")
    multiple_of: int = Field(64, ge=1, description="round the kept width to a multiple")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    def kept_width(self, intermediate_size: int) -> int:
        width = round(intermediate_size * self.keep_fraction / self.multiple_of) * self.multiple_of
        return max(self.multiple_of, min(width, intermediate_size))

    def check_model(self, model_config: Any) -> None:
        size = model_config.intermediate_size
        if self.kept_width(size) >= size:
            raise ValueError(
                f"keep_fraction={self.keep_fraction} with multiple_of={self.multiple_of} keeps all "
                f"{size} channels; lower keep_fraction or multiple_of"
            )


class LayerPruneSpec(_UniformStructuredSpec):
    """Remove whole decoder blocks (Shortened LLaMA, Kim et al. 2024; Gromov et al. 2024).

    angular: blocks whose output is closest in angle to their input go first;
    perplexity: blocks whose removal alone raises calibration perplexity least go first.
    """

    method: Literal["prune-layers"]
    remove: int = Field(ge=1, description="number of decoder blocks to remove")
    importance: Literal["angular", "perplexity"] = "angular"
    keep_first: int = Field(1, ge=0, description="leading blocks never removed")
    keep_last: int = Field(1, ge=0, description="trailing blocks never removed")
    calibration: CalibrationSpec = Field(
        default_factory=lambda: CalibrationSpec(samples=16, seq_len=256)
    )

    def check_model(self, model_config: Any) -> None:
        layers = model_config.num_hidden_layers
        removable = layers - self.keep_first - self.keep_last
        if self.remove > removable:
            raise ValueError(
                f"remove={self.remove} is too large: the model has {layers} layers and "
                f"keep_first={self.keep_first}, keep_last={self.keep_last} protect "
                f"{layers - max(removable, 0)}"
            )


class LowRankSpec(SpecBase):
    """Replace Linear layers by two thinner ones from a (whitened) SVD.

    activation_aware whitens by the calibration inputs' second moment first (SVD-LLM style), so
    the truncation minimises the output error ||(W - W')X|| rather than ||W - W'||.
    """

    method: Literal["low-rank"]
    rank: int | None = Field(None, gt=0, description="fixed rank for every target")
    energy: float | None = Field(None, gt=0, le=1, description="kept share of sum(sigma^2)")
    activation_aware: bool = True
    targets: list[str] = Field(
        default_factory=lambda: ["*.mlp.*"], description="fnmatch patterns on Linear names"
    )
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)

    @model_validator(mode="after")
    def _one_budget(self) -> LowRankSpec:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("set exactly one of rank or energy")
        return self

    def check_model(self, model_config: Any) -> None:
        if self.rank is None:
            return
        matched = {
            name: shape
            for name, shape in decoder_linear_shapes(model_config).items()
            if any(fnmatch.fnmatch(name, p) for p in self.targets)
            and not any(fnmatch.fnmatch(name, p) for p in self.skip)
        }
        if not matched:
            raise ValueError(f"targets {self.targets} match no Linear layer of the model")
        smallest = min(min(shape) for shape in matched.values())
        if self.rank >= smallest:
            raise ValueError(
                f"rank={self.rank} must be below the smallest targeted dimension ({smallest})"
            )


PRUNE_SPECS: tuple[type[SpecBase], ...] = (
    MagnitudeSpec,
    WandaSpec,
    SparseGPTSpec,
    HeadPruneSpec,
    FFNPruneSpec,
    LayerPruneSpec,
    LowRankSpec,
)
