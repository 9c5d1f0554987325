"""Calibration token windows for the data-aware methods (split="calibration" of calibration.py)."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .calibration import load_text, token_windows
from .spec_base import CalibrationSpec

log = logging.getLogger(__name__)

# "first": the first `samples` windows of the text; "spread": `samples` windows evenly spread
# over it, for topic variety.
WindowPick = Literal["first", "spread"]

_override: ContextVar[torch.Tensor | None] = ContextVar("calibration_override", default=None)


@contextlib.contextmanager
def calibration_override(ids: torch.Tensor) -> Iterator[None]:
    """Use these token ids [n, T] instead of loading text (tests, tables comparing methods)."""
    token = _override.set(ids)
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _source_version(source: str) -> tuple[int, int] | None:
    """A user file's (mtime, size), so an edited file is tokenized again."""
    if source == "pydoc":
        return None
    stat = Path(source).stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=8)
def _all_windows(
    path: str, source: str, seq_len: int, _version: tuple[int, int] | None
) -> torch.Tensor:
    # Tokenizing the whole text takes seconds; every method of a variant reuses it.
    return token_windows(_tokenizer(path), load_text(source, "calibration"), seq_len)


def calibration_ids(
    model: nn.Module, calib: CalibrationSpec, pick: WindowPick = "spread"
) -> torch.Tensor:
    """LongTensor [samples, seq_len] of calibration text (fewer rows if the text is short)
    for this model's tokenizer, or the ids of an enclosing calibration_override."""
    override = _override.get()
    if override is not None:
        return override
    path = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not path:
        raise ValueError(
            "calibration needs the model's tokenizer, but the model does not say where it was "
            "loaded from; load it with from_pretrained or wrap the call in calibration_override"
        )
    source, samples, seq_len = calib.source, calib.samples, calib.seq_len
    windows = _all_windows(str(path), source, seq_len, _source_version(source))
    if windows.shape[0] < samples:
        log.warning(
            "calibration text %s has only %d windows of %d tokens (asked for %d)",
            source,
            windows.shape[0],
            seq_len,
            samples,
        )
        return windows
    if pick == "first":
        return windows[:samples]
    return windows[torch.linspace(0, windows.shape[0] - 1, samples).round().long()]
