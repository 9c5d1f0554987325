"""Quality of a (compressed) causal LM: sliding-window perplexity on held-out text, and
agreement with a reference model's next-token distribution.

Both use the plain transformers forward (model(input_ids).logits) under inference mode, in
batches, with a progress bar. Held-out text is calibration.py's split="evaluation", disjoint
from what the data-aware methods calibrate on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration import load_text

# Tokens per forward batch: bounds the [batch, seq, vocab] logits (49152 wide here).
BATCH_TOKENS = 1024


def evaluation_ids(
    tokenizer: Any, source: str = "pydoc", max_tokens: int | None = None
) -> torch.Tensor:
    """The held-out text as one token stream, LongTensor [1, L] (first `max_tokens` tokens)."""
    text = load_text(source, "evaluation")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    return ids[:, :max_tokens] if max_tokens is not None else ids


def sliding_windows(
    stream: torch.Tensor, context: int, stride: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of `context` tokens every `stride` tokens over a 1-D stream, and a mask
    [n, context - 1] of the next-token predictions each window scores.

    With stride < context every token after the first is scored exactly once, by the first
    window that reaches it, and (past the first window) sees at least context - stride tokens
    before it; with stride == context, a window's first token has no context and goes unscored.
    A last window ending at the stream's end keeps all windows the same length.
    """
    length = stream.numel()
    if length < 2:
        raise ValueError("need at least two tokens to score a prediction")
    context = min(context, length)
    starts = list(range(0, length - context + 1, stride))
    if starts[-1] + context < length:
        starts.append(length - context)
    windows = torch.stack([stream[s : s + context] for s in starts])
    mask = torch.zeros(len(starts), context - 1, dtype=torch.bool)
    scored_until = 1  # stream positions < this are scored (position 0 has no prediction)
    for row, start in enumerate(starts):
        end = start + context
        first = max(scored_until, start + 1)
        mask[row, first - start - 1 : end - start - 1] = True
        scored_until = end
    return windows, mask


def _batches(count: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, count)) for i in range(0, count, batch)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    context: int = 512,
    stride: int = 256,
    *,
    tokenizer: Any | None = None,
    text: str | None = None,
    batch_size: int | None = None,
) -> float:
    """Strided fixed-context perplexity over `input_ids` ([n, window] rows are joined into one
    stream; [L] also accepted), or over `text` tokenized by `tokenizer`."""
    if input_ids is None:
        if tokenizer is None or text is None:
            raise ValueError("pass input_ids, or tokenizer and text")
        input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if stride <= 0 or stride > context:
        raise ValueError(f"stride must be in [1, context={context}], got {stride}")
    windows, mask = sliding_windows(input_ids.reshape(-1), context, stride)
    batch = batch_size or max(1, BATCH_TOKENS // windows.shape[1])
    device = _device(model)
    nll = 0.0
    scored = 0
    with torch.inference_mode():
        for part in tqdm(_batches(len(windows), batch), desc="perplexity", disable=None):
            ids = windows[part].to(device)
            keep = mask[part].to(device)
            logits = model(ids).logits[:, :-1][keep]  # only the scored predictions
            targets = ids[:, 1:][keep]
            nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            scored += int(keep.sum())
    return math.exp(nll / scored)


def compare_to_reference(
    model: nn.Module,
    reference: nn.Module,
    token_windows: torch.Tensor,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Top-1 next-token agreement with `reference`, and mean KL(reference || model) per
    position (nats), over token windows [n, window]."""
    batch = batch_size or max(1, BATCH_TOKENS // token_windows.shape[1])
    device = _device(model)
    agree = 0
    kl_sum = 0.0
    positions = 0
    with torch.inference_mode():
        for part in tqdm(_batches(len(token_windows), batch), desc="vs reference", disable=None):
            ids = token_windows[part].to(device)
            ref = F.log_softmax(reference(ids).logits.float(), dim=-1)
            out = F.log_softmax(model(ids).logits.float(), dim=-1)
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            kl_sum += float(F.kl_div(out, ref, log_target=True, reduction="sum"))
            positions += ids.numel()
    return {"agreement": agree / positions, "kl": kl_sum / positions}
