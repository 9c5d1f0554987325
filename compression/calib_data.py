"""Calibration token windows for the data-aware methods (split="calibration" of calibration.py)."""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from .calibration import load_text, token_windows
from .quant_specs import CalibrationSpec

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def model_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved beside the model's weights (every slimserve model dir has one)."""
    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path:
        raise ValueError("the model does not say where it was loaded from; pass a tokenizer")
    return _tokenizer(str(path))


def calibration_ids(
    model: nn.Module, calib: CalibrationSpec, tokenizer: Any | None = None
) -> torch.Tensor:
    """LongTensor [samples, seq_len] of calibration text (fewer rows if the text is short)."""
    tokenizer = tokenizer if tokenizer is not None else model_tokenizer(model)
    text = load_text(calib.source, "calibration")
    ids = token_windows(tokenizer, text, calib.seq_len, calib.samples)
    if ids.shape[0] < calib.samples:
        log.warning(
            "calibration text %s has only %d windows of %d tokens (asked for %d)",
            calib.source,
            ids.shape[0],
            calib.seq_len,
            calib.samples,
        )
    return ids
