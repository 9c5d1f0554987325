"""Loading and building transformers causal LMs, one at a time in a process.

transformers sets torch's process-wide default dtype around a load or build given a `dtype`, then
puts back the one it found. Two at once in one process (threads: cache loaders racing for one
artifact, say) can each find the other's dtype, and the last to finish leaves it set for good;
a build without a dtype made meanwhile takes the other's. So every load and build goes through
here, under one lock.
"""

from __future__ import annotations

import threading
from typing import Any

_ONE_AT_A_TIME = threading.RLock()


def causal_lm_from_pretrained(path: str, **options: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained(path, **options)`, alone in this process."""
    from transformers import AutoModelForCausalLM

    with _ONE_AT_A_TIME:
        return AutoModelForCausalLM.from_pretrained(path, **options)


def causal_lm_from_config(config: Any, **options: Any) -> Any:
    """`AutoModelForCausalLM.from_config(config, **options)`, alone in this process."""
    from transformers import AutoModelForCausalLM

    with _ONE_AT_A_TIME:
        return AutoModelForCausalLM.from_config(config, **options)
