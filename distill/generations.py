"""Sequence-level KD data (Kim and Rush): the teacher's greedy continuations of prompts taken
from the training text, generated once and kept on disk beside the student."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .config import SequenceKD

log = logging.getLogger(__name__)


@torch.inference_mode()
def teacher_continuations(
    teacher: nn.Module, windows: torch.Tensor, options: SequenceKD, cache: Path
) -> torch.Tensor:
    """[prompts, prompt_tokens + new_tokens] token ids: each prompt and what the teacher wrote."""
    if cache.is_file():
        stored = torch.load(cache)
        if stored["options"] == options.model_dump():
            log.info("teacher generations from %s", cache)
            return stored["ids"]
    prompts = windows[: options.prompts, : options.prompt_tokens]
    rows = []
    for prompt in tqdm(prompts, desc="teacher generations", disable=None):
        out = teacher.generate(
            prompt[None],
            max_new_tokens=options.new_tokens,
            min_new_tokens=options.new_tokens,  # equal lengths: one tensor, no padding
            do_sample=False,
            pad_token_id=0,
        )
        rows.append(out[0])
    ids = torch.stack(rows)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"options": options.model_dump(), "ids": ids}, cache)
    return ids
