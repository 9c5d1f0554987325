"""The benchmark a variant runs on itself right after loading: quality and speed.

Perplexity: held-out text (the evaluation split of the calibration source, never seen by a
data-aware compression method) in non-overlapping windows, scored by the engine's `score()`.
Speed: prefill tokens/s (requests of `prefill_tokens` prompt tokens, one new token each) and
decode tokens/s (after every stream has its first token) at each batch size, through the
engine's own `generate()`, so batching is the engine's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import torch
from pydantic import BaseModel, Field

from slimserve.compression.calibration import load_text, token_windows

from ..config import SelfBenchOptions
from ..engine.protocol import Engine, ScoringEngine
from ..engine.types import SamplingParams

log = logging.getLogger(__name__)

DECODE_PROMPT_TOKENS = 32


class SelfBenchResult(BaseModel):
    perplexity: float | None = None
    perplexity_tokens: int = 0
    text: str = "pydoc"
    prefill_tokens_per_second: dict[str, float] = Field(default_factory=dict)  # batch -> tok/s
    decode_tokens_per_second: dict[str, float] = Field(default_factory=dict)  # batch -> tok/s
    seconds: float = 0.0
    unavailable: list[str] = Field(default_factory=list)


async def perplexity(engine: ScoringEngine, windows: torch.Tensor) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every next-token prediction in the windows."""
    nll, count = 0.0, 0
    for window in windows.tolist():
        nll -= float((await engine.target_logprobs(window)).sum())
        count += len(window) - 1
    return math.exp(nll / count), count


async def _run_stream(engine: Engine, name: str, prompt: list[int], params: SamplingParams) -> list:
    """(time, tokens) of each delta event of one request."""
    stamps = []
    async for event in engine.generate(name, prompt, params):
        if event.kind == "error":
            raise RuntimeError(f"self-benchmark request failed: {event.error.message}")
        if event.kind == "delta" and event.tokens:
            stamps.append((time.perf_counter(), event.tokens))
    return stamps


async def prefill_rate(engine: Engine, prompts: list[list[int]]) -> float:
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    started = time.perf_counter()
    await asyncio.gather(
        *(_run_stream(engine, f"bench-prefill-{i}", p, params) for i, p in enumerate(prompts))
    )
    return sum(map(len, prompts)) / (time.perf_counter() - started)


async def decode_rate(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    """Tokens/s once every stream has its first token. An engine may hand a caller several
    steps' tokens as one delta when the caller lags behind; if every token came before that
    point (a fast engine, a busy loop), the rate is taken over the whole requests instead,
    their short prefill included, rather than reported as 0."""
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    started = time.perf_counter()
    streams = await asyncio.gather(
        *(_run_stream(engine, f"bench-decode-{i}", p, params) for i, p in enumerate(prompts))
    )
    all_started = max(stamps[0][0] for stamps in streams)
    ended = max(stamps[-1][0] for stamps in streams)
    after = sum(n for stamps in streams for t, n in stamps if t > all_started)
    if after > 0 and ended > all_started:
        return after / (ended - all_started)
    total = sum(n for stamps in streams for _, n in stamps)
    return total / max(ended - started, 1e-9)


def _prompts(ids: torch.Tensor, count: int, length: int) -> list[list[int]]:
    return [ids[i * length : (i + 1) * length].tolist() for i in range(count)]


async def run_self_bench(
    engine: Engine, tokenizer: Any, options: SelfBenchOptions, max_model_len: int, max_num_seqs: int
) -> SelfBenchResult:
    started = time.perf_counter()
    result = SelfBenchResult(text=options.text)
    text = load_text(options.text, "evaluation")
    window = min(options.window_tokens, max_model_len)
    if options.perplexity_windows and isinstance(engine, ScoringEngine):
        windows = token_windows(tokenizer, text, window, options.perplexity_windows)
        result.perplexity, result.perplexity_tokens = await perplexity(engine, windows)
    elif options.perplexity_windows:
        result.unavailable.append("perplexity: this engine does not score")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    prefill_len = min(options.prefill_tokens, max_model_len - 1)
    decode_len = min(options.decode_tokens, max_model_len - DECODE_PROMPT_TOKENS - 1)
    for batch in sorted({min(b, max_num_seqs) for b in options.batch_sizes}):
        if ids.numel() < batch * max(prefill_len, DECODE_PROMPT_TOKENS):
            result.unavailable.append(f"batch {batch}: not enough evaluation text")
            continue
        prompts = _prompts(ids, batch, prefill_len)
        result.prefill_tokens_per_second[str(batch)] = round(await prefill_rate(engine, prompts), 2)
        if decode_len >= 1:
            prompts = _prompts(ids, batch, DECODE_PROMPT_TOKENS)
            rate = await decode_rate(engine, prompts, decode_len)
            result.decode_tokens_per_second[str(batch)] = round(rate, 2)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def run_self_bench_blocking(*args: Any) -> SelfBenchResult:
    """Runs it on a fresh event loop in its own thread: the caller may sit inside a running loop
    (Ray Serve runs replica constructors on its event loop thread)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="self-bench") as pool:
        return pool.submit(asyncio.run, run_self_bench(*args)).result()
