"""Incremental detokenization: emits only text that is final.

Text is held back while it ends in an incomplete UTF-8 sequence (a multi-byte character split
across tokens) or while its tail could still grow into a stop string.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already sent
        self.stopped = False

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def add(self, token_id: int) -> str:
        """Add one token; returns the newly final text (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        # Any tail that could begin a stop string was held back, so search only unsent text.
        cut = min(
            (i for i in (text.find(s, self._emitted) for s in self._stop) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            out = text[self._emitted : cut]
            self._emitted = cut
            return out
        end = len(text)
        if text.endswith(_REPLACEMENT):
            end = len(text.rstrip(_REPLACEMENT))
        end -= self._held_tail(text[:end])
        if end <= self._emitted:
            return ""
        out = text[self._emitted : end]
        self._emitted = end
        return out

    def flush(self) -> str:
        """At the end of generation: release whatever was held back."""
        if self.stopped:
            return ""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        out = text[self._emitted :]
        self._emitted = len(text)
        return out
