"""Prompt prefixes kept in a K/V store, so requests that share one skip recomputing it.

Chat traffic repeats a long prefix (the template's system prompt, the earlier turns) and load
tests and evaluations repeat whole prompts. Keys and values at positions before the first
differing token depend only on the tokens before it, so a new request whose prompt starts like a
kept one copies that K/V (a memcpy) instead of running the model over it. Entries are the first
`max_tokens` tokens of finished prefills, replaced least recently used. The store's entries are
short (not whole context-length slots), so many prompts fit in the memory of a few slots.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# Shorter shared prefixes are not worth a slot copy.
MIN_REUSE_TOKENS = 8


@dataclass
class _Entry:
    slot: int
    token_ids: list[int]
    last_used: int


@dataclass(frozen=True)
class PrefixHit:
    slot: int  # where the prefix's K/V sits (or goes)
    tokens: int  # how many leading prompt tokens it covers


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    def __init__(self, first_slot: int, slots: int, max_tokens: int) -> None:
        """Entries in slots first_slot.., each holding up to `max_tokens` positions."""
        self.max_tokens = max_tokens
        self._free = list(range(first_slot, first_slot + slots))
        self._entries: list[_Entry] = []
        self._clock = itertools.count()

    def lookup(self, prompt_ids: list[int]) -> PrefixHit | None:
        """The longest kept prefix of this prompt, leaving its last token to compute (its
        logits give the first generated token)."""
        best: _Entry | None = None
        best_tokens = 0
        for entry in self._entries:
            tokens = min(common_prefix(entry.token_ids, prompt_ids), len(prompt_ids) - 1)
            if tokens > best_tokens:
                best, best_tokens = entry, tokens
        if best is None or best_tokens < MIN_REUSE_TOKENS:
            return None
        best.last_used = next(self._clock)
        return PrefixHit(best.slot, best_tokens)

    def slot_to_fill(self, prompt_ids: list[int]) -> PrefixHit | None:
        """Where to copy this fully cached prompt's first tokens (and how many), or None when
        a kept entry already covers them (or the prompt is too short to be worth keeping)."""
        kept = list(prompt_ids[: self.max_tokens])
        if len(kept) < MIN_REUSE_TOKENS or (not self._free and not self._entries):
            return None
        for entry in self._entries:
            if common_prefix(entry.token_ids, kept) == len(kept):
                entry.last_used = next(self._clock)
                return None
        if self._free:
            entry = _Entry(self._free.pop(), [], 0)
            self._entries.append(entry)
        else:
            entry = min(self._entries, key=lambda e: e.last_used)
        entry.token_ids = kept
        entry.last_used = next(self._clock)
        return PrefixHit(entry.slot, len(kept))
