"""Specs of the quantization methods (one pydantic model each, keyed by `method`)."""

from __future__ import annotations

from typing import Literal

from slimserve.compression.spec_base import SpecBase


class Int8WeightOnlySpec(SpecBase):
    """int8 weights with absmax scales, 16-bit activations (W8A16)."""

    method: Literal["int8-weight-only"]
    granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    # The tied embedding / lm_head matrix is a fifth of this model's bytes; quantize it too.
    include_embeddings: bool = True


QUANT_SPECS: tuple[type[SpecBase], ...] = (Int8WeightOnlySpec,)
