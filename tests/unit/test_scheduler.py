"""The torch engine's scheduler on plain data: admission order, slot and token budgets, chunked
prefill, releases that keep the batch packed, prefix reuse, and a simulated KV cache that every
planned copy must keep consistent."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from slimserve.serve.engine.prefix_cache import MIN_REUSE_TOKENS, PrefixCache
from slimserve.serve.engine.scheduler import Scheduler, SlotMove, StepPlan


@dataclass(eq=False)
class Seq:
    name: str
    prompt_ids: list[int]
    cached: int = 0
    aborted: bool = False
    full_prefill: bool = False
    generated: list[int] = field(default_factory=list)


def _scheduler(
    slots: int = 4, budget: int = 16, queue: int = 8, prefix_slots: int = 0, prefix_len: int = 64
) -> Scheduler[Seq]:
    return Scheduler(slots, budget, queue, PrefixCache(slots + 1, prefix_slots, prefix_len))


def _queue(scheduler: Scheduler[Seq], *lengths: int) -> list[Seq]:
    seqs = [Seq(f"r{i}", list(range(100 * i, 100 * i + n))) for i, n in enumerate(lengths)]
    for seq in seqs:
        scheduler.enqueue(seq)
    return seqs


def _chunks(plan: StepPlan[Seq]) -> list[tuple[str, int, int, int, bool]]:
    return [(c.seq.name, c.slot, c.start, len(c.token_ids), c.last) for c in plan.chunks]


def test_waiting_requests_are_admitted_in_arrival_order_within_the_token_budget():
    scheduler = _scheduler(budget=16)
    _queue(scheduler, 5, 7, 9, 3)
    plan = scheduler.plan()
    assert plan.decode == []
    # 5 + 7 whole, then the third cut at the budget; the fourth waits.
    assert _chunks(plan) == [("r0", 0, 0, 5, True), ("r1", 1, 0, 7, True), ("r2", 2, 0, 4, False)]
    assert [s.name for s in plan.admitted] == ["r0", "r1", "r2"]
    assert scheduler.waiting() == 1
    outcome = scheduler.complete(plan)
    assert [s.name for s in outcome.joined] == ["r0", "r1"]
    assert [s.name for s in scheduler.decoding] == ["r0", "r1"]
    assert [s.name for s in scheduler.prefilling] == ["r2"]

    # The half-done prompt goes first, in the slot right after the batch; then the next.
    plan = scheduler.plan()
    assert [s.name for s in plan.decode] == ["r0", "r1"]
    assert _chunks(plan) == [("r2", 2, 4, 5, True), ("r3", 3, 0, 3, True)]
    scheduler.complete(plan)
    assert [s.name for s in scheduler.decoding] == ["r0", "r1", "r2", "r3"]
    assert [s.cached for s in scheduler.decoding] == [6, 8, 9, 3]
    assert scheduler.running() == 4 and not scheduler.prefilling


def test_a_long_prompt_is_spread_over_steps_and_never_exceeds_the_budget():
    scheduler = _scheduler(budget=16)
    (seq,) = _queue(scheduler, 40)
    starts = []
    while not scheduler.decoding:
        plan = scheduler.plan()
        assert sum(len(c.token_ids) for c in plan.chunks) <= 16
        starts.append(plan.chunks[0].start)
        scheduler.complete(plan)
    assert starts == [0, 16, 32]
    assert seq.cached == 40


def test_no_more_sequences_than_slots():
    scheduler = _scheduler(slots=2, budget=100)
    _queue(scheduler, 3, 3, 3)
    plan = scheduler.plan()
    assert [c.seq.name for c in plan.chunks] == ["r0", "r1"]
    scheduler.complete(plan)
    # Both slots decode: nothing is admitted until one is released.
    plan = scheduler.plan()
    assert len(plan.decode) == 2 and plan.chunks == [] and scheduler.waiting() == 1
    scheduler.complete(plan)
    assert scheduler.release([0]) == [SlotMove(1, 0, 4)]
    plan = scheduler.plan()
    assert _chunks(plan) == [("r2", 1, 0, 3, True)]


def test_release_keeps_the_batch_packed_and_the_prefill_right_after_it():
    scheduler = _scheduler(slots=4, budget=10)
    _queue(scheduler, 2, 3, 4, 20)
    scheduler.complete(scheduler.plan())  # r0..r2 decode, r3 half-done in slot 3
    assert [s.cached for s in scheduler.decoding] == [2, 3, 4]
    assert scheduler.prefilling[0].cached == 1
    moves = scheduler.release([0, 2])
    # Slot 2 is the last: dropped in place; the prefill moves down. Then slot 0 takes slot 1's
    # sequence and the prefill moves down again.
    assert moves == [SlotMove(3, 2, 1), SlotMove(1, 0, 3), SlotMove(2, 1, 1)]
    assert [s.name for s in scheduler.decoding] == ["r1"]
    assert _chunks(scheduler.plan())[0] == ("r3", 1, 1, 10, False)


def test_aborted_requests_are_skipped_and_dropped():
    scheduler = _scheduler(budget=100)
    seqs = _queue(scheduler, 3, 3, 3)
    seqs[1].aborted = True
    assert scheduler.waiting() == 2
    plan = scheduler.plan()
    assert [c.seq.name for c in plan.chunks] == ["r0", "r2"]
    scheduler.complete(plan)
    seqs[0].aborted = True
    assert scheduler.drop_aborted() == [SlotMove(1, 0, 3)]
    assert scheduler.decoding == [seqs[2]]
    assert scheduler.has_work()


def test_a_full_queue_is_reported():
    scheduler = _scheduler(queue=2)
    _queue(scheduler, 3)
    assert not scheduler.queue_full()
    _queue(scheduler, 3)
    assert scheduler.queue_full()


def test_a_shared_prefix_is_copied_from_the_prefix_cache():
    scheduler = _scheduler(slots=2, budget=64, prefix_slots=1)
    shared = list(range(1, 1 + 2 * MIN_REUSE_TOKENS))
    first, second = Seq("a", [*shared, 90, 91]), Seq("b", [*shared, 70])
    scheduler.enqueue(first)
    plan = scheduler.plan()
    assert plan.moves == []
    outcome = scheduler.complete(plan)
    # The finished prompt is kept in the prefix slot (slot 3: 2 batch slots, then scoring's).
    assert outcome.moves == [SlotMove(0, 3, len(first.prompt_ids))]
    scheduler.enqueue(second)
    plan = scheduler.plan()
    assert plan.moves == [SlotMove(3, 1, len(shared))]
    assert _chunks(plan) == [("b", 1, len(shared), 1, True)]


def test_a_full_prefill_computes_every_position_despite_a_cached_prefix():
    """A request for prompt log-probabilities needs the logits of every prompt position."""
    scheduler = _scheduler(slots=2, budget=64, prefix_slots=1)
    shared = list(range(1, 1 + 2 * MIN_REUSE_TOKENS))
    scheduler.enqueue(Seq("a", [*shared, 90]))
    scheduler.complete(scheduler.plan())
    scheduler.enqueue(Seq("b", [*shared, 70], full_prefill=True))
    plan = scheduler.plan()
    assert plan.moves == []
    assert _chunks(plan) == [("b", 1, 0, len(shared) + 1, True)]


def test_finished_prompts_without_a_prefix_cache_are_not_kept():
    scheduler = _scheduler(prefix_slots=0)
    _queue(scheduler, 2 * MIN_REUSE_TOKENS)
    assert scheduler.complete(scheduler.plan()).moves == []


def test_a_failed_step_takes_every_running_sequence_off():
    scheduler = _scheduler(budget=8)
    _queue(scheduler, 3, 20, 2)
    scheduler.complete(scheduler.plan())
    victims = scheduler.clear_running()
    assert [s.name for s in victims] == ["r0", "r1"]
    assert scheduler.running() == 0 and scheduler.waiting() == 1


class _Cache:
    """What a KV cache holds, as token ids per slot: enough to check every planned copy."""

    def __init__(self, slots: int) -> None:
        self.slots: list[list[int | None]] = [[] for _ in range(slots)]

    def write(self, slot: int, start: int, tokens: list[int]) -> None:
        row = self.slots[slot]
        row.extend([None] * (start + len(tokens) - len(row)))
        row[start : start + len(tokens)] = tokens

    def move(self, moves: list[SlotMove]) -> None:
        for move in moves:
            self.write(move.target, 0, self.slots[move.source][: move.length])


@pytest.mark.parametrize("seed", range(5))
def test_random_traffic_keeps_every_sequence_in_its_own_slot(seed):
    """Arrivals, aborts and finishes at random, prompts sharing prefixes: after every step each
    running sequence's slot holds exactly its own tokens, and no step breaks a budget."""
    rng = random.Random(seed)
    slots, budget = 4, 12
    scheduler = _scheduler(slots=slots, budget=budget, queue=100, prefix_slots=2)
    cache = _Cache(slots + 1 + 2)
    prefixes = [[rng.randrange(1000) for _ in range(10)] for _ in range(2)]
    reused = split = 0
    for step in range(300):
        if step < 200 and rng.random() < 0.4:
            prompt = rng.choice(prefixes)[: rng.randrange(11)]
            prompt += [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
            seq = Seq(f"s{step}", prompt)
            scheduler.enqueue(seq)
        for seq in [*scheduler.decoding, *scheduler.prefilling]:
            if rng.random() < 0.03:
                seq.aborted = True
        cache.move(scheduler.drop_aborted())
        plan = scheduler.plan()
        cache.move(plan.moves)
        reused += sum(move.length for move in plan.moves)
        split += sum(not chunk.last for chunk in plan.chunks)
        assert len(plan.decode) + len(plan.chunks) <= slots
        assert sum(len(c.token_ids) for c in plan.chunks) <= budget
        for slot, seq in enumerate(plan.decode):
            cache.write(slot, seq.cached, [seq.generated[-1]])
        for chunk in plan.chunks:
            assert chunk.slot == len(plan.decode) + plan.chunks.index(chunk)
            assert chunk.token_ids == chunk.seq.prompt_ids[chunk.start :][: len(chunk.token_ids)]
            cache.write(chunk.slot, chunk.start, chunk.token_ids)
        outcome = scheduler.complete(plan)
        cache.move(outcome.moves)
        finished = []
        for index, seq in enumerate(scheduler.decoding):
            if seq in plan.decode or seq in outcome.joined:
                seq.generated.append(rng.randrange(1000))
                if rng.random() < 0.15:
                    finished.append(index)
        cache.move(scheduler.release(finished))
        for slot, seq in enumerate([*scheduler.decoding, *scheduler.prefilling]):
            assert not seq.aborted
            own = [*seq.prompt_ids, *seq.generated][: seq.cached]
            assert cache.slots[slot][: seq.cached] == own, f"step {step}, slot {slot}"
    assert reused > 0 and split > 0  # the traffic did exercise prefix reuse and chunking
