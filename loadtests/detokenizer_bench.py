"""Per-token cost of streaming detokenization at growing sequence lengths.

    python -m slimserve.loadtests.detokenizer_bench --lengths 128 512 2048 8192

Compares the engine's `IncrementalDetokenizer` (tokenizers' DecodeStream) with a baseline that
decodes the whole sequence again for every token, as the engine did before. Each measurement
times `--tokens` consecutive tokens after a sequence of the given length, with a stop string
set (so the stop-string search and hold-back are in the timed path), on the default model's
tokenizer and text mixing ASCII, accented letters, CJK and emoji.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any, Protocol

from transformers import AutoTokenizer

from slimserve.models.store import DEFAULT_MODEL_ALIAS, resolve_model
from slimserve.serve.engine.detokenizer import IncrementalDetokenizer, held_stop_prefix
from slimserve.serve.logs import configure_logging

log = logging.getLogger("slimserve.loadtests.detokenizer_bench")

TEXT = (
    "The café on the corner serves naïve crème brûlée. 東京タワーの夜景はきれいです。 "
    "Streaming output 🚀🎉 should never show half a character: Ölçü, Zürich, São Paulo.\n"
)
STOP = ["</answer>"]  # never occurs in TEXT: its prefix "<" is checked on every token


class Detokenizer(Protocol):
    stopped: bool

    def add(self, token_id: int) -> str: ...


class FullRedecodeBaseline:
    """BASELINE ONLY (the engine's previous algorithm): decodes all tokens for every new one,
    so each token costs time proportional to the sequence length."""

    _REPLACEMENT = "\ufffd"

    def __init__(self, tokenizer: Any, stop: list[str], prefix: list[int]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        # Starts as if `prefix` had been streamed: replaying it here would take quadratic time.
        self._ids = list(prefix)
        text = tokenizer.decode(self._ids, skip_special_tokens=True)
        self._emitted = len(text.rstrip(self._REPLACEMENT)) - held_stop_prefix(self._stop, text)
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        cut = min(
            (i for i in (text.find(s, self._emitted) for s in self._stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            out = text[self._emitted : cut]
            self._emitted = cut
            return out
        end = len(text.rstrip(self._REPLACEMENT))
        end -= held_stop_prefix(self._stop, text[:end])
        if end <= self._emitted:
            return ""
        out = text[self._emitted : end]
        self._emitted = end
        return out


def _incremental(tokenizer: Any, prefix: list[int]) -> IncrementalDetokenizer:
    detok = IncrementalDetokenizer(tokenizer, STOP)
    for token in prefix:  # linear in the prefix, so it is simply streamed
        detok.add(token)
    return detok


def _time_per_token(detok: Detokenizer, timed: list[int]) -> float:
    """Microseconds per `add` over the timed tokens."""
    started = time.perf_counter()
    for token in timed:
        detok.add(token)
    elapsed = time.perf_counter() - started
    if detok.stopped:  # a stop would end the timed work early
        raise RuntimeError("the benchmark text hit a stop string")
    return elapsed / len(timed) * 1e6


def measure(
    tokenizer: Any, ids: list[int], length: int, tokens: int, repeats: int
) -> tuple[float, float]:
    """Median microseconds per token (baseline, incremental) for tokens length+1..length+tokens."""
    prefix, timed = ids[:length], ids[length : length + tokens]
    baseline, incremental = [], []
    for _ in range(repeats):
        baseline.append(_time_per_token(FullRedecodeBaseline(tokenizer, STOP, prefix), timed))
        incremental.append(_time_per_token(_incremental(tokenizer, prefix), timed))
    return statistics.median(baseline), statistics.median(incremental)


def render(rows: list[tuple[int, float, float]]) -> str:
    lines = [
        "| sequence length | full re-decode per token (baseline), us "
        "| IncrementalDetokenizer per token, us | speedup |",
        "|---|---|---|---|",
    ]
    for length, baseline, incremental in rows:
        lines.append(
            f"| {length} | {baseline:.1f} | {incremental:.1f} | {baseline / incremental:.0f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 2048, 8192])
    parser.add_argument("--tokens", type=int, default=64, help="timed tokens per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=DEFAULT_MODEL_ALIAS)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    needed = max(args.lengths) + args.tokens
    piece = tokenizer(TEXT, add_special_tokens=False).input_ids
    ids = (piece * (needed // len(piece) + 1))[:needed]
    rows = []
    for length in args.lengths:
        baseline, incremental = measure(tokenizer, ids, length, args.tokens, args.repeats)
        log.info(
            "length %d: baseline %.1f us/token, incremental %.1f us/token",
            length,
            baseline,
            incremental,
        )
        rows.append((length, baseline, incremental))
    print(render(rows))


if __name__ == "__main__":
    main()
