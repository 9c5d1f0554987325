"""How alike two variants are on one request: the math, no I/O.

- exact match: the two generated texts are identical;
- token agreement: on the source's completion (teacher-forced), the share of positions where the
  target's most likely next token is the source's most likely next token;
- next-token KL: KL(source || target) of the next-token distributions, averaged over every
  position of prompt + reference, in nats;
- reference perplexity: exp(mean NLL) of the source's completion under each variant.

KL and agreement need both variants' log-probabilities over the same token ids; when either is
missing (an engine without score()) or the tokenizations differ, they are None.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from pydantic import BaseModel


class ShadowScores(BaseModel):
    exact_match: bool
    token_agreement: float | None = None
    next_token_kl_nats: float | None = None
    source_reference_perplexity: float | None = None
    target_reference_perplexity: float | None = None
    scored_tokens: int = 0


class ShadowSummary(BaseModel):
    """Means over a pair's recent comparisons."""

    comparisons: int
    scored: int  # comparisons with log-probabilities from both sides (KL, agreement)
    exact_match: float | None
    token_agreement: float | None
    next_token_kl_nats: float | None
    source_reference_perplexity: float | None
    target_reference_perplexity: float | None


def _reference_ppl(logprobs: np.ndarray, ids: list[int], rows: range) -> float | None:
    if not rows:
        return None
    targets = [ids[r + 1] for r in rows]
    nll = -float(logprobs[np.arange(rows.start, rows.stop), targets].mean())
    return math.exp(nll)


def compare(
    source_text: str,
    target_text: str,
    source_score: dict[str, Any] | None,
    target_score: dict[str, Any] | None,
) -> ShadowScores:
    """numpy, not torch: this runs in the gateway, which does not load torch."""
    scores = ShadowScores(exact_match=source_text == target_text)
    if source_score is None or target_score is None:
        return scores
    ids = source_score["token_ids"]
    if ids != target_score["token_ids"]:
        return scores  # different tokenizers: positions do not line up
    lp_s = np.asarray(source_score["logprobs"], dtype=np.float32)
    lp_t = np.asarray(target_score["logprobs"], dtype=np.float32)
    kl = (np.exp(lp_s) * (lp_s - lp_t)).sum(axis=-1)
    scores.next_token_kl_nats = max(float(kl.mean()), 0.0)
    scores.scored_tokens = len(ids)
    rows = range(max(source_score["prompt_tokens"] - 1, 0), len(ids) - 1)
    if rows:
        picks_s = lp_s[rows.start :].argmax(axis=-1)
        picks_t = lp_t[rows.start :].argmax(axis=-1)
        scores.token_agreement = float((picks_s == picks_t).mean())
        scores.source_reference_perplexity = _reference_ppl(lp_s, ids, rows)
        scores.target_reference_perplexity = _reference_ppl(lp_t, ids, rows)
    return scores


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(results: Iterable[ShadowScores]) -> ShadowSummary:
    results = list(results)
    return ShadowSummary(
        comparisons=len(results),
        scored=sum(r.next_token_kl_nats is not None for r in results),
        exact_match=_mean(float(r.exact_match) for r in results),
        token_agreement=_mean(r.token_agreement for r in results),
        next_token_kl_nats=_mean(r.next_token_kl_nats for r in results),
        source_reference_perplexity=_mean(r.source_reference_perplexity for r in results),
        target_reference_perplexity=_mean(r.target_reference_perplexity for r in results),
    )
