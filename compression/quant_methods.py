"""Quantization methods by name."""

from __future__ import annotations

from .awq import apply_awq
from .gobo import apply_gobo
from .gptq import apply_gptq
from .int8 import apply_int8_weight_only
from .llm_int8 import apply_llm_int8
from .rtn import apply_rtn
from .smoothquant import apply_smoothquant

QUANT_METHODS = {
    "int8-weight-only": apply_int8_weight_only,
    "llm-int8": apply_llm_int8,
    "gobo": apply_gobo,
    "smoothquant-w8a8": apply_smoothquant,
    "rtn": apply_rtn,
    "gptq": apply_gptq,
    "awq": apply_awq,
}
