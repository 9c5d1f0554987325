"""Quantization methods by name."""

from __future__ import annotations

from slimserve.compression.awq import apply_awq
from slimserve.compression.gobo import apply_gobo
from slimserve.compression.gptq import apply_gptq
from slimserve.compression.int8 import apply_int8_weight_only
from slimserve.compression.llm_int8 import apply_llm_int8
from slimserve.compression.rtn import apply_rtn
from slimserve.compression.smoothquant import apply_smoothquant

QUANT_METHODS = {
    "int8-weight-only": apply_int8_weight_only,
    "llm-int8": apply_llm_int8,
    "gobo": apply_gobo,
    "smoothquant-w8a8": apply_smoothquant,
    "rtn": apply_rtn,
    "gptq": apply_gptq,
    "awq": apply_awq,
}
