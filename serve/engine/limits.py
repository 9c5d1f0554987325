"""Request admission rules shared by every engine."""

from __future__ import annotations

from dataclasses import dataclass

from .types import ErrorInfo, SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int
    max_model_len: int
    max_queued_requests: int
    prefill_chunk_tokens: int
    prefix_cache_slots: int = 0
    prefix_cache_tokens: int = 256


def context_error(prompt_ids: list[int], params: SamplingParams, limit: int) -> ErrorInfo | None:
    """The OpenAI-style 400 for an empty or too-long request, None if it fits."""
    if not prompt_ids:
        return ErrorInfo(status=400, message="the prompt is empty", param="prompt")
    wanted = 1 if params.max_tokens is None else params.max_tokens
    if len(prompt_ids) + wanted <= limit:
        return None
    return ErrorInfo(
        status=400,
        message=(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{len(prompt_ids) + wanted} tokens ({len(prompt_ids)} in the prompt, {wanted} for "
            "the completion). Please reduce the prompt or max_tokens."
        ),
        param="max_tokens" if params.max_tokens else "messages",
        code="context_length_exceeded",
    )


def token_range_error(
    prompt_ids: list[int], params: SamplingParams, vocab_size: int
) -> ErrorInfo | None:
    """The 400 for a token id outside the vocabulary, naming the field that holds it."""
    for field, ids in (
        ("prompt", prompt_ids),
        ("stop_token_ids", params.stop_token_ids),
        ("logit_bias", list(params.logit_bias)),
    ):
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            return ErrorInfo(
                status=400,
                message=f"token id {bad[0]} in '{field}' is outside the vocabulary "
                f"(0..{vocab_size - 1})",
                param=field,
            )
    return None


def queue_full_error() -> ErrorInfo:
    return ErrorInfo(
        status=503,
        type="server_overloaded",
        message="The server is at capacity; retry shortly.",
        code="queue_full",
    )


VARIANT_UNAVAILABLE = "variant_unavailable"


def unavailable_error(message: str) -> ErrorInfo:
    """A 503 that moves unpinned traffic to another variant (this one cannot serve at all)."""
    return ErrorInfo(status=503, type="server_error", message=message, code=VARIANT_UNAVAILABLE)


def server_error(message: str) -> ErrorInfo:
    return ErrorInfo(status=500, type="server_error", message=message)


def check_score_length(token_ids: list[int], limit: int) -> None:
    """Scoring takes 1..limit tokens (the engine's context window)."""
    if not 0 < len(token_ids) <= limit:
        raise ValueError(f"can score 1..{limit} tokens, got {len(token_ids)}")
