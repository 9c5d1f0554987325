"""Prompt prefixes kept in reserved KV slots, so requests that share one skip recomputing it.

Chat traffic repeats a long prefix (the template's system prompt) in every request. Keys and
values at positions before the first differing token depend only on the tokens before it, so a
new request whose prompt starts like a kept one copies that K/V (a memcpy) instead of running the
model over it. Entries are whole prompts of finished prefills, replaced least recently used.
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
    slot: int  # where the prefix's K/V sits
    tokens: int  # how many leading prompt tokens it covers


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    def __init__(self, first_slot: int, slots: int) -> None:
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

    def slot_to_fill(self, prompt_ids: list[int]) -> int | None:
        """The slot this fully cached prompt should be copied to, or None when a kept entry
        already covers it (or it is too short to be worth keeping)."""
        if len(prompt_ids) < MIN_REUSE_TOKENS or (not self._free and not self._entries):
            return None
        for entry in self._entries:
            if common_prefix(entry.token_ids, prompt_ids) == len(prompt_ids):
                entry.last_used = next(self._clock)
                return None
        if self._free:
            entry = _Entry(self._free.pop(), [], 0)
            self._entries.append(entry)
        else:
            entry = min(self._entries, key=lambda e: e.last_used)
        entry.token_ids = list(prompt_ids)
        entry.last_used = next(self._clock)
        return entry.slot
