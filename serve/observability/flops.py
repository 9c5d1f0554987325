"""Model FLOPs per token (`FlopModel`) and the token work of a request (`TokenWork`).

The FLOP model is counted from the modules that really run (`serve.flop_count`, which needs
torch); this module is plain arithmetic, so the gateway can use it without loading torch.

Attention adds 4 x heads x head_dim FLOPs per layer per context token (QK^T and AV) for each
token processed. Token work is tracked as three numbers (see `TokenWork`), which makes the total
exact for prefill (only the last prompt position computes logits), decode and scoring.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


class FlopModel(BaseModel):
    """FLOPs of one token, split the way the work is counted."""

    body_flops_per_token: float  # decoder-layer matmuls
    head_flops_per_token: float  # the output projection (logits)
    attention_flops_per_context_token: float  # per token processed, per token attended to
    layers: int
    sparse_halved_modules: int = 0  # 2:4 modules whose sparse kernel runs (counted at half)

    @property
    def matmul_flops_per_token(self) -> float:
        return self.body_flops_per_token + self.head_flops_per_token

    def flops(self, work: TokenWork) -> float:
        return (
            self.body_flops_per_token * work.body_tokens
            + self.head_flops_per_token * work.head_tokens
            + self.attention_flops_per_context_token * work.context_sum
        )

    def flops_per_token_at(self, context: float) -> float:
        """One decode token attending to `context` tokens."""
        return self.matmul_flops_per_token + self.attention_flops_per_context_token * context


@dataclass
class TokenWork:
    """Tokens through the decoder, tokens whose logits were computed, and the sum over those
    tokens of how many positions each attended to."""

    body_tokens: float = 0.0
    head_tokens: float = 0.0
    context_sum: float = 0.0

    def __iadd__(self, other: TokenWork) -> TokenWork:
        self.body_tokens += other.body_tokens
        self.head_tokens += other.head_tokens
        self.context_sum += other.context_sum
        return self


def prefill_work(prompt_tokens: int) -> TokenWork:
    """A prompt of P tokens: P through the layers, logits at the last only; token p attends to
    p + 1 positions."""
    p = prompt_tokens
    return TokenWork(p, 1 if p else 0, p * (p + 1) / 2)


def decode_work(prompt_tokens: int, first: int, count: int) -> TokenWork:
    """Generated tokens first..first+count-1 (1-based). Token 1 comes from the prefill's logits;
    token j >= 2 is one decode step over token j-1, attending to prompt_tokens + j - 1 positions.
    """
    steps = [j for j in range(first, first + count) if j >= 2]
    context = sum(prompt_tokens + j - 1 for j in steps)
    return TokenWork(len(steps), len(steps), context)


def score_work(tokens: int) -> TokenWork:
    """Scoring L tokens: one pass with logits at every position."""
    return TokenWork(tokens, tokens, tokens * (tokens + 1) / 2)
