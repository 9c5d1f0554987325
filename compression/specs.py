"""The registry of compression methods: one line per method, in `METHOD_SPECS`.

Each entry is a spec class from `methods/` carrying the method's name, fields, `apply` and the
engines that serve it. The config's `CompressionSpec` union and the name -> method lookup
(`METHODS`) are both built from this list. Importing this module does not import torch.
"""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from .methods.awq import AWQSpec
from .methods.gobo import GoboSpec
from .methods.gptq import GPTQSpec
from .methods.int8_weight_only import Int8WeightOnlySpec
from .methods.llm_int8 import LLMInt8Spec
from .methods.low_rank import LowRankSpec
from .methods.magnitude import MagnitudeSpec
from .methods.prune_ffn import FFNPruneSpec
from .methods.prune_heads import HeadPruneSpec
from .methods.prune_layers import LayerPruneSpec
from .methods.rtn import RTNSpec
from .methods.smoothquant_w8a8 import SmoothQuantSpec
from .methods.sparsegpt import SparseGPTSpec
from .methods.wanda import WandaSpec
from .spec_base import CalibrationSpec, Engine, SpecBase

METHOD_SPECS: tuple[type[SpecBase], ...] = (
    # quantization
    Int8WeightOnlySpec,
    LLMInt8Spec,
    GoboSpec,
    SmoothQuantSpec,
    RTNSpec,
    GPTQSpec,
    AWQSpec,
    # pruning and low-rank
    MagnitudeSpec,
    WandaSpec,
    SparseGPTSpec,
    HeadPruneSpec,
    FFNPruneSpec,
    LayerPruneSpec,
    LowRankSpec,
)

METHODS: dict[str, type[SpecBase]] = {spec.method_name(): spec for spec in METHOD_SPECS}
if len(METHODS) != len(METHOD_SPECS):
    raise RuntimeError("two spec classes in METHOD_SPECS share a method name")

CompressionSpec = Annotated[Union[METHOD_SPECS], Field(discriminator="method")]  # noqa: UP007

__all__ = [
    "METHODS",
    "METHOD_SPECS",
    "CalibrationSpec",
    "CompressionSpec",
    "Engine",
    "Int8WeightOnlySpec",
    "SpecBase",
]
