"""Structured output: a JSON schema (or any JSON object) compiled by xgrammar into a token mask
that each decoding step applies before sampling."""

from __future__ import annotations

import threading
from typing import Any

import torch

from .types import StructuredOutput


class StructuredOutputError(ValueError):
    """The schema cannot be compiled (invalid, or beyond what the grammar engine supports)."""


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._matcher = matcher
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf (in place)."""
        import xgrammar as xgr

        self._matcher.fill_next_token_bitmask(self._bitmask)
        # The model's vocabulary may be padded past the tokenizer's: padded ids stay masked.
        xgr.apply_token_bitmask_inplace(
            logits.unsqueeze(0), self._bitmask, vocab_size=self._vocab_size
        )

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it."""
        return bool(self._matcher.accept_token(token))


class GrammarCompiler:
    """Compiles constraints for one tokenizer; xgrammar caches compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self._compiler: Any = None
        self._lock = threading.Lock()  # requests arrive on several threads

    def _get(self) -> Any:
        # Built on first use: engines that never see a constraint do not pay for it.
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self._vocab_size,
                    stop_token_ids=self._stop_token_ids,
                )
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def state(self, spec: StructuredOutput) -> GrammarState:
        import xgrammar as xgr

        compiler = self._get()
        try:
            # Compact JSON (no free whitespace): a small model otherwise may emit whitespace
            # until max_tokens runs out. Any object is the schema {"type": "object"}, as vLLM
            # compiles it.
            schema = spec.json_schema or '{"type": "object"}'
            compiled = compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as error:  # xgrammar raises RuntimeError/ValueError for bad schemas
            raise StructuredOutputError(f"the JSON schema cannot be used: {error}") from None
        return GrammarState(xgr.GrammarMatcher(compiled), self._vocab_size)
