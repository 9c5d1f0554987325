"""Fields and checks shared by the group-wise low-bit weight methods (rtn, gptq, awq, gobo)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator

from ..spec_base import Engine, SpecBase


def power_of_two(value: int, field: str) -> int:
    if value <= 0 or value & (value - 1):
        raise ValueError(f"{field} must be a positive power of two, got {value}")
    return value


def check_group_divides(spec: SpecBase, group_size: int, model_config: Any) -> None:
    """Every targeted Linear's in-features must be a multiple of the group size."""
    # Imported here: arch needs torch, and the specs are also read by the torch-free gateway.
    from ..arch import linear_shapes, skipped

    bad = sorted(
        {
            k
            for name, (_, k) in linear_shapes(model_config).items()
            if k % group_size and not skipped(name, spec.skip)
        }
    )
    if bad:
        good = [g for g in (128, 64, 32) if all(k % g == 0 for k in bad)]
        hint = f"; {good[0]} divides them" if good else ""
        raise ValueError(
            f"group_size {group_size} does not divide the in-features {bad} of this model{hint}"
        )


class GroupWiseSpec(SpecBase):
    """A 4 / 3-bit grid per group of `group_size` input features (served by `LowBitLinear`)."""

    bits: Literal[4, 3] = 4
    # 64, not the usual 128: SmolLM2's hidden size 576 is not a multiple of 128.
    group_size: int = 64
    # "integer": the usual GPTQ / AWQ checkpoint layout. "float": the grid starts exactly at
    # each group's minimum (lower error; the slimserve kernels read it, exporters may not).
    zero_point: Literal["integer", "float"] = "integer"

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        return power_of_two(value, "group_size")

    def check_model(self, model_config: Any) -> None:
        check_group_divides(self, self.group_size, model_config)

    def runs_on(self, engine: Engine) -> bool:
        # vLLM reads the compressed-tensors export: 4-bit with integer zero points only.
        if engine == "vllm":
            return self.bits == 4 and self.zero_point == "integer"
        return super().runs_on(engine)
