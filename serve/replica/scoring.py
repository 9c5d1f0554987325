"""Teacher-forced scoring of a prompt plus a reference completion, for shadow comparison.

The variant tokenizes the request's prompt exactly as for generation, appends the reference
completion's tokens, and returns the next-token log-probabilities at every position that has a
next token (row i predicts token i + 1), as float16 to halve what crosses the process boundary.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ..engine.protocol import Engine, ScoringEngine


class ScoreResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    token_ids: list[int]
    prompt_tokens: int
    logprobs: Any  # numpy float16 [len(token_ids) - 1, vocab]

    def as_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "logprobs": self.logprobs,
        }


def scored_ids(prompt_ids: list[int], reference_ids: list[int], limit: int) -> list[int]:
    """Prompt + reference, cut to `limit` tokens from the front of the prompt (the reference and
    the end of the prompt are what the comparison is about)."""
    ids = prompt_ids + reference_ids
    return ids[-limit:] if len(ids) > limit else ids


async def score_reference(
    engine: Engine, prompt_ids: list[int], reference_ids: list[int], limit: int
) -> ScoreResult:
    if not isinstance(engine, ScoringEngine):
        raise NotImplementedError("this engine does not score; next-token KL is unavailable")
    ids = scored_ids(prompt_ids, reference_ids, limit)
    if len(ids) < 2:
        raise ValueError("need at least two tokens to score")
    logprobs = await engine.score(ids)
    prompt_tokens = max(len(ids) - len(reference_ids), 0)
    rows = logprobs[:-1].to(torch.float16).numpy()
    return ScoreResult(token_ids=ids, prompt_tokens=prompt_tokens, logprobs=rows)
