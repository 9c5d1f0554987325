"""The torch engine's scheduling decisions, as plain data: no model, no tensors, no threads.

Each step decodes one token for every sequence in the running batch and, in the same forward
pass, prefills up to `prefill_chunk_tokens` prompt tokens of waiting requests, admitted in
arrival order while the budget and the free slots last. Only the last prompt of a step can stop
short of its end, so at most one prompt is ever half-done between steps.

KV slots: decoding sequences sit packed in slots 0..B-1 (a step reads a plain view of the
cache), prompts being prefilled right after them. Releasing a sequence moves the last one into
its slot. The scheduler says which cache copies that takes (`SlotMove`); the engine runs them.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .prefix_cache import PrefixCache


class Schedulable(Protocol):
    """What the scheduler reads and keeps up to date on a request."""

    prompt_ids: list[int]
    cached: int  # tokens whose K/V sit in the request's slot; the scheduler advances it
    aborted: bool
    full_prefill: bool  # every prompt position is computed: no cached prefix stands in


S = TypeVar("S", bound=Schedulable)


@dataclass(frozen=True)
class SlotMove:
    """Copy the first `length` cached positions of slot `source` to slot `target`."""

    source: int
    target: int
    length: int


@dataclass(frozen=True)
class Chunk(Generic[S]):
    """Prompt tokens [start, start + len(token_ids)) of `seq`, prefilled in `slot`."""

    seq: S
    slot: int
    start: int
    token_ids: list[int]
    last: bool  # it ends the prompt: its last token's logits give the first generated token


@dataclass
class StepPlan(Generic[S]):
    decode: list[S]  # one token each; index == slot
    chunks: list[Chunk[S]]
    # Prefix-cache copies into newly admitted requests' slots, to run before the pass.
    moves: list[SlotMove] = field(default_factory=list)
    admitted: list[S] = field(default_factory=list)  # left the queue this step

    @property
    def empty(self) -> bool:
        return not self.decode and not self.chunks


@dataclass
class StepOutcome(Generic[S]):
    joined: list[S]  # prompts finished this step, now at the end of the decode batch
    moves: list[SlotMove]  # their prompts copied into the prefix cache


class Scheduler(Generic[S]):
    def __init__(
        self,
        max_num_seqs: int,
        prefill_chunk_tokens: int,
        max_queued_requests: int,
        prefix_cache: PrefixCache,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_queued_requests = max_queued_requests
        self.prefix_cache = prefix_cache
        # Appended by callers' threads, popped and purged by the engine's: append and popleft
        # are atomic; a purge rebuilds the deque, so it and append hold the lock.
        self._waiting: deque[S] = deque()
        self._waiting_lock = threading.Lock()
        self.decoding: list[S] = []  # index == KV slot
        # Prompts being prefilled, in the slots right after the decoding ones; between steps at
        # most one (a prompt longer than a step's budget).
        self.prefilling: list[S] = []

    # ---- queue -------------------------------------------------------------------------------

    def queue_full(self) -> bool:
        """Counting live requests only: one dropped while queued frees its place at once."""
        return self.waiting() >= self.max_queued_requests

    def enqueue(self, seq: S) -> None:
        with self._waiting_lock:
            self._waiting.append(seq)

    def waiting(self) -> int:
        """Live queued requests (aborted ones leave the queue only when admission reaches
        them). Safe from any thread: list() copies the deque in one step."""
        return sum(not seq.aborted for seq in list(self._waiting))

    def running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self._waiting or self.decoding or self.prefilling)

    # ---- a step ------------------------------------------------------------------------------

    def drop_aborted(self) -> list[SlotMove]:
        """Forget aborted sequences, queued or running (so that requests dropped while the
        batch is full do not pile up in the queue); the copies that keep the rest packed."""
        if any(seq.aborted for seq in list(self._waiting)):
            with self._waiting_lock:
                self._waiting = deque(seq for seq in self._waiting if not seq.aborted)
        self.prefilling = [seq for seq in self.prefilling if not seq.aborted]
        gone = [i for i, seq in enumerate(self.decoding) if seq.aborted]
        return self.release(gone)

    def plan(self) -> StepPlan[S]:
        """This step's work: every decoding sequence, then prompt chunks in the slots right
        after them: the prompt left unfinished by the last step first, then waiting requests in
        arrival order, while the step's budget of prompt tokens and the free slots last."""
        step: StepPlan[S] = StepPlan(decode=list(self.decoding), chunks=[])
        budget = self.prefill_chunk_tokens
        slot = len(self.decoding)
        while budget > 0 and slot < self.max_num_seqs:
            if len(self.prefilling) == len(step.chunks):
                admitted = self._admit(slot, step)
                if admitted is None:
                    break
                self.prefilling.append(admitted)
            seq = self.prefilling[len(step.chunks)]
            ids = seq.prompt_ids[seq.cached : seq.cached + budget]
            last = seq.cached + len(ids) == len(seq.prompt_ids)
            step.chunks.append(Chunk(seq, slot, seq.cached, ids, last))
            budget -= len(ids)
            slot += 1
        return step

    def _admit(self, slot: int, step: StepPlan[S]) -> S | None:
        """The next live waiting request, its reusable prompt prefix copied into `slot`."""
        while self._waiting:
            seq = self._waiting.popleft()
            if seq.aborted:
                continue
            hit = None if seq.full_prefill else self.prefix_cache.lookup(seq.prompt_ids)
            if hit is not None:
                step.moves.append(SlotMove(hit.slot, slot, hit.tokens))
                seq.cached = hit.tokens
            step.admitted.append(seq)
            return seq
        return None

    def complete(self, step: StepPlan[S]) -> StepOutcome[S]:
        """The pass ran: advance every sequence's cache, move finished prompts into the batch
        (in slot order, since their chunks sat right after it) and keep their prompts in the
        prefix cache. Call before releasing any finished sequence: releases move slots."""
        for seq in step.decode:
            seq.cached += 1
        outcome: StepOutcome[S] = StepOutcome(joined=[], moves=[])
        self.prefilling = []
        for chunk in step.chunks:
            chunk.seq.cached += len(chunk.token_ids)
            if not chunk.last:  # only the step's last chunk can stop short
                self.prefilling.append(chunk.seq)
                continue
            kept = self.prefix_cache.slot_to_fill(chunk.seq.prompt_ids)
            if kept is not None:
                outcome.moves.append(SlotMove(chunk.slot, kept.slot, kept.tokens))
            self.decoding.append(chunk.seq)
            outcome.joined.append(chunk.seq)
        return outcome

    def release(self, indices: list[int]) -> list[SlotMove]:
        """Free the decoding slots `indices`, keeping the batch packed in slots 0..B-1 and the
        prompts being prefilled right after it; the copies that takes, in order."""
        moves: list[SlotMove] = []
        for index in sorted(indices, reverse=True):
            last = len(self.decoding) - 1
            if index != last:
                moved = self.decoding[last]
                moves.append(SlotMove(last, index, moved.cached))
                self.decoding[index] = moved
            self.decoding.pop()
            for offset, seq in enumerate(self.prefilling):
                moves.append(SlotMove(last + 1 + offset, last + offset, seq.cached))
        return moves

    def clear_running(self) -> list[S]:
        """Take every running sequence off the batch (a failed step); they are returned."""
        victims = [*self.decoding, *self.prefilling]
        self.decoding.clear()
        self.prefilling = []
        return victims
