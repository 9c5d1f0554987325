"""CompressionSpec: the union of every method's spec, selected by the `method` field."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .prune_specs import PRUNE_SPECS
from .quant_specs import QUANT_SPECS, Int8WeightOnlySpec
from .spec_base import SpecBase

ALL_SPECS = (*QUANT_SPECS, *PRUNE_SPECS)

if len(ALL_SPECS) == 1:
    CompressionSpec = ALL_SPECS[0]
else:
    CompressionSpec = Annotated[Union[ALL_SPECS], Field(discriminator="method")]  # noqa: UP007

__all__ = ["ALL_SPECS", "CompressionSpec", "Int8WeightOnlySpec", "SpecBase"]
