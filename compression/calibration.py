"""Calibration and evaluation text, offline and disjoint.

The default source is Python's own documentation (`pydoc_data.topics`, ~465 KB of English on
every machine). Topics are split by a stable hash of their name: calibration never sees a topic
that evaluation uses. Users may pass their own .txt or .jsonl (a "text" field per line).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch

Split = Literal["calibration", "evaluation"]
EVAL_SHARE = 0.3  # fraction of topics held out for evaluation


def _topic_split(name: str) -> Split:
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") / 2**32
    return "evaluation" if bucket < EVAL_SHARE else "calibration"


def pydoc_text(split: Split) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics) if _topic_split(name) == split)


def file_text(path: str | Path) -> str:
    path = Path(path)
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        return "\n\n".join(json.loads(line)["text"] for line in lines if line.strip())
    return path.read_text()


def load_text(source: str, split: Split) -> str:
    """source: "pydoc" (split applies) or a path to the user's own .txt / .jsonl."""
    return pydoc_text(split) if source == "pydoc" else file_text(source)


def token_windows(tokenizer, text: str, window: int, count: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of `window` tokens: LongTensor [n, window]."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // window
    if count is not None:
        n = min(n, count)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)
