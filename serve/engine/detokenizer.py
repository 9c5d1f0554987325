"""Incremental detokenization: emits only text that is final.

Text is held back while it ends in an incomplete UTF-8 sequence (a multi-byte character split
across tokens) or while its tail could still grow into a stop string.

Each token costs the same at any sequence length: `tokenizers.DecodeStream` decodes only a short
window of recent tokens, and the stop-string search looks only at text not yet sent (at most the
longest stop string plus the newest chunk). Decoding the whole sequence for every token would
make a stream's cost quadratic in its length.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


def held_stop_prefix(stops: list[str], text: str) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        # The HF fast tokenizer's `tokenizers.Tokenizer`: the decoder its `decode` runs. Its
        # optional clean-up of spaces is not applied; transformers skips it for BPE vocabularies.
        self._backend: Tokenizer = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = [s for s in stop if s]
        # DecodeStream does not expose what it holds back, and `flush` must release it, so the
        # tokens since its last chunk are kept here.
        self._pending: list[int] = []
        self._held = ""  # decoded but not sent: a tail that could still grow into a stop string
        self.stopped = False

    def _release(self, text: str, final: bool) -> str:
        """Send unsent `text` up to a stop string, or up to a tail that could start one."""
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        end = len(text) if final else len(text) - held_stop_prefix(self._stop, text)
        self._held = text[end:]
        return text[:end]

    def add(self, token_id: int) -> str:
        """Add one token; returns the newly final text (may be empty)."""
        if self.stopped:
            return ""
        self._pending.append(token_id)
        # None while the text ends in an incomplete character, or when the token adds no text
        # (a skipped special token).
        chunk = self._stream.step(self._backend, token_id)
        if chunk is None:
            return ""
        self._pending = []
        return self._release(self._held + chunk, final=False)

    def flush(self) -> str:
        """At the end of generation: release whatever was held back (an incomplete character
        comes out as U+FFFD, as a full decode gives it)."""
        if self.stopped:
            return ""
        # Decoded on their own: they follow a chunk that ended on a complete character, so the
        # tokens before them do not change their text.
        tail = self._backend.decode(self._pending, skip_special_tokens=True)
        self._pending = []
        return self._release(self._held + tail, final=True)
