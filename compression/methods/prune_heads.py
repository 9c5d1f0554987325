"""`prune-heads`: remove attention heads, the same count in every layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ..spec_base import CalibrationSpec, UniformStructuredSpec

if TYPE_CHECKING:
    from torch import nn

    from ..report import MethodReport


class HeadPruneSpec(UniformStructuredSpec):
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

    def apply(self, model: nn.Module) -> MethodReport:
        from ..structured import apply_head_pruning

        return apply_head_pruning(model, self)
