"""What happens to one sequence's logits between the model and the sampler, and the
log-probabilities reported back.

Order, as vLLM applies them: the structured-output mask, logit bias, min_tokens (no EOS or
stop token yet), then the repetition penalty (prompt and output tokens) and the frequency and
presence penalties (output tokens, OpenAI's definition). Reported log-probabilities of generated
tokens are taken after all of that and the temperature, before top-p truncation: the
distribution the token was drawn from.
"""

from __future__ import annotations

import math

import torch

from .structured import GrammarState
from .types import SamplingParams, TokenLogprob, TopLogprob

NEG_INF = float("-inf")


class SequenceLogits:
    """Per-sequence processing state: token counts for the penalties, the grammar position."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: list[int],
        vocab_size: int,
        stop_ids: set[int],
        grammar: GrammarState | None,
    ) -> None:
        self.params = params
        self.grammar = grammar
        self._generated = 0
        self._counts: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        if params.frequency_penalty or params.presence_penalty:
            self._counts = torch.zeros(vocab_size, dtype=torch.float32)
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(vocab_size, dtype=torch.bool)
            self._seen[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self._bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long)
            self._bias = ids, torch.tensor(list(params.logit_bias.values()))
        self._held_back = torch.tensor(sorted(stop_ids), dtype=torch.long)

    @staticmethod
    def needed(params: SamplingParams) -> bool:
        return params.penalized or params.min_tokens > 0 or params.structured is not None

    def process(self, logits: torch.Tensor) -> None:
        """Apply this sequence's processing to its float32 logits row [V], in place."""
        p = self.params
        if self.grammar is not None:
            self.grammar.mask(logits)
        if self._bias is not None:
            ids, values = self._bias
            logits[ids] += values
        if self._generated < p.min_tokens and len(self._held_back):
            logits[self._held_back] = NEG_INF
        if self._seen is not None:
            seen = logits[self._seen]
            logits[self._seen] = torch.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
        if self._counts is not None:
            logits -= p.frequency_penalty * self._counts
            logits -= p.presence_penalty * (self._counts > 0).float()

    def accept(self, token: int) -> bool:
        """Record a sampled token; False if the grammar did not allow it."""
        self._generated += 1
        if self._counts is not None:
            self._counts[token] += 1
        if self._seen is not None:
            self._seen[token] = True
        return self.grammar is None or self.grammar.accept(token)


def logprob_rows(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax of float32 logits [n, V] at a temperature (0: the logits as they are)."""
    scaled = logits / temperature if temperature > 0 else logits
    return torch.log_softmax(scaled.float(), dim=-1)


def token_logprobs(logprobs: torch.Tensor, token_ids: list[int], top: int) -> list[TokenLogprob]:
    """One entry per row of `logprobs` [n, V]: token_ids[i]'s log-probability and the `top`
    most likely tokens (masked tokens, at -inf, are left out: JSON has no infinity)."""
    chosen = logprobs.gather(1, torch.tensor(token_ids, dtype=torch.long).unsqueeze(1))
    entries = [
        TokenLogprob(token_id=t, logprob=v)
        for t, v in zip(token_ids, chosen[:, 0].tolist(), strict=True)
    ]
    if top > 0:
        values, ids = logprobs.topk(top, dim=-1)
        for entry, row_values, row_ids in zip(entries, values.tolist(), ids.tolist(), strict=True):
            entry.top = [
                TopLogprob(token_id=i, logprob=v)
                for v, i in zip(row_values, row_ids, strict=True)
                if not math.isinf(v)
            ]
    return entries
