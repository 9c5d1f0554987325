"""Engine "torch": iteration-level (continuous) batching.

Every step drops aborted sequences, then runs one forward pass that decodes a token for every
running sequence and, in the same pass, prefills chunks of waiting prompts (what goes into a
step is the scheduler's: see scheduler.py). New requests therefore join the running batch
without a pass of their own, a burst of them joins in a step or two, finished ones leave at
once, and a long prompt is spread over several steps. This module runs that loop: the model
calls, sampling, and delivering each step's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from slimserve.kernels.dispatch import chosen_backends
from slimserve.models.llama_runner import LlamaRunner, PrefillChunk

from .detokenizer import IncrementalDetokenizer
from .limits import (
    EngineLimits,
    check_score_length,
    context_error,
    queue_full_error,
    server_error,
    token_range_error,
)
from .logits import SequenceLogits, logprob_rows, token_logprobs
from .loop_delivery import LoopSink
from .pacing import StepPacing, StreamPacer
from .prefix_cache import PrefixCache
from .sampling import make_generator, sample_tokens
from .scheduler import Chunk, Scheduler, SlotMove, StepPlan
from .structured import GrammarCompiler, StructuredOutputError
from .types import EngineEvent, ErrorInfo, SamplingParams, TokenLogprob, merge_deltas

log = logging.getLogger(__name__)


class EventSink(Protocol):
    """Where a sequence's events go. The engine thread calls `deliver` once per step with that
    step's events for this sink, as (the sequence's `key`, event) pairs. A sink with a true
    `paced` attribute has its deltas coalesced under the engine's stream budget, if it has one
    (`TorchEngine.pace_streams`)."""

    def deliver(self, items: list[tuple[Any, EngineEvent]]) -> bool:
        """False when the receiver is gone: its sequences are aborted."""
        ...


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    detokenizer: IncrementalDetokenizer
    sink: EventSink
    key: Any  # the sink's handle for this sequence (a queue in-process, the id over a pipe)
    generator: torch.Generator | None
    # Penalties, bias, min_tokens, grammar: None when the request asks for none of them.
    logits: SequenceLogits | None = None
    arrived: float = field(default_factory=time.perf_counter)
    queue_seconds: float | None = None
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V sit in the cache
    aborted: bool = False
    finished: bool = False
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

    @property
    def full_prefill(self) -> bool:
        """Every prompt position's logits are wanted, so no cached prefix may stand in."""
        return self.params.prompt_logprobs is not None


class _Outbox:
    """The events of one engine step, grouped by sink and delivered once at the step's end.
    With `pacing` set, the deltas of sinks that ask for it (`paced = True`) are coalesced under
    its budget (pacing.py)."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[EventSink, list[_Sequence], list]] = {}
        self.pacing: StepPacing | None = None

    def add(self, seq: _Sequence, event: EngineEvent) -> None:
        if self.pacing is None or not getattr(seq.sink, "paced", False):
            self._queue(seq, event)
            return
        for out in self.pacing.admit(id(seq), seq, event, time.monotonic()):
            self._queue(seq, out)

    def flush(self) -> None:
        if self.pacing is not None:
            for seq in self.pacing.open_owners():
                if seq.aborted:  # its caller left: nothing more goes out for it
                    self.pacing.forget(id(seq))
            for seq, held in self.pacing.due(time.monotonic()):
                self._queue(seq, held)
        for sink, sequences, items in self._pending.values():
            if not sink.deliver(items):
                for seq in sequences:
                    seq.aborted = True
        self._pending.clear()

    def _queue(self, seq: _Sequence, event: EngineEvent) -> None:
        entry = self._pending.get(id(seq.sink))
        if entry is None:
            entry = self._pending[id(seq.sink)] = (seq.sink, [], [])
        entry[1].append(seq)
        entry[2].append((seq.key, event))


ScoreReply = Callable[[torch.Tensor | None, Exception | None], None]


@dataclass
class _ScoreJob:
    token_ids: list[int]
    reply: ScoreReply  # called on the engine thread with (log-probs, None) or (None, error)


def loop_reply(loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> ScoreReply:
    """A reply, callable from any thread, that settles `future` on its own loop."""

    def reply(value: torch.Tensor | None, error: Exception | None) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: that caller's loop is gone
            loop.call_soon_threadsafe(settle_future, future, value, error)

    return reply


def settle_future(future: asyncio.Future, value: Any, error: Exception | None) -> None:
    if future.done():  # the caller may have been cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def gather_targets(logprobs: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Row i of `logprobs` predicts token i + 1: the log-probability each next token got."""
    targets = torch.tensor(token_ids[1:]).unsqueeze(1)
    return logprobs[:-1].gather(1, targets).squeeze(1)


async def drain_events(events: asyncio.Queue[EngineEvent]) -> AsyncIterator[EngineEvent]:
    """A request's events up to done or error, coalescing deltas that piled up while the
    consumer was slow: fewer, larger messages downstream."""
    while True:
        merged = await events.get()
        while merged.kind == "delta" and not events.empty():
            following = events.get_nowait()
            if following.kind != "delta":
                yield merged
                merged = following
                break
            merged = merge_deltas(merged, following)
        yield merged
        if merged.kind in ("done", "error", "forwarded"):
            return


class TorchEngine:
    """Implements `ScoringEngine` (protocol.py)."""

    serves_any_loop = True  # events go to whichever caller's loop asked (see LoopSink)

    def __init__(self, model: Any, tokenizer: Any, limits: EngineLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        # Slots: the batch, one for scoring (so it never waits for a free slot), then the
        # prefix cache's entries (shorter, in the runner's store).
        self.score_slot = limits.max_num_seqs
        prefix_tokens = min(limits.prefix_cache_tokens, limits.max_model_len)
        self.scheduler: Scheduler[_Sequence] = Scheduler(
            limits.max_num_seqs,
            limits.prefill_chunk_tokens,
            limits.max_queued_requests,
            PrefixCache(limits.max_num_seqs + 1, limits.prefix_cache_slots, prefix_tokens),
        )
        self.runner = LlamaRunner(
            model,
            limits.max_num_seqs + 1,
            limits.max_model_len,
            pack_dense=True,
            store_slots=limits.prefix_cache_slots,
            store_len=prefix_tokens,
        )
        self._score_jobs: deque[_ScoreJob] = deque()
        self.eos_ids = self._eos_ids(model, tokenizer)
        self.vocab_size = int(model.config.vocab_size)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, sorted(self.eos_ids))
        self._wakeup = threading.Event()
        self._outbox = _Outbox()
        # One sink per caller loop, so a step wakes each loop once however many it serves.
        self._loop_sinks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {
            "steps": 0,
            "generated_tokens": 0,
            "prompt_tokens": 0,  # prompt tokens run through the model
            "prefix_cached_tokens": 0,  # prompt tokens whose K/V was copied from the prefix cache
            "finished": 0,
            "peak_batch": 0,  # most sequences decoded in one step: evidence of batching
        }

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    # ---- lifecycle -------------------------------------------------------------------------

    def pace_streams(self, pacer: StreamPacer) -> None:
        """Coalesce the deltas of paced sinks under this budget from now on (before `run`)."""
        self._outbox.pacing = StepPacing(pacer)

    def start(self) -> None:
        """Run the engine loop on a background thread (in-process serving and tests)."""
        self._thread = threading.Thread(target=self.run, name="torch-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the engine loop to return after its current step (thread-safe)."""
        self._stopping = True
        self._wakeup.set()

    def shutdown(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return {
            "running": self.scheduler.running(),
            "waiting": self.scheduler.waiting(),
            "kv_cache_bytes": self.runner.kv_cache_bytes,
            "packed_weight_bytes": self.runner.packed_weight_bytes,
            "kernels": chosen_backends(),  # this process's: the engine may run in its own
            **self.counters,
        }

    # ---- the caller's side -----------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: EventSink,
        key: Any,
    ) -> _Sequence | ErrorInfo:
        """Queue a request (thread-safe); its events go to `sink` under `key`. An ErrorInfo
        when it cannot be taken (too long for the context, or the queue is full)."""
        problem = context_error(prompt_ids, params, self.limits.max_model_len)
        problem = problem or token_range_error(prompt_ids, params, self.vocab_size)
        if problem is None and self.scheduler.queue_full():
            problem = queue_full_error()
        if problem is not None:
            return problem
        logits = None
        if SequenceLogits.needed(params):
            try:
                grammar = self.grammars.state(params.structured) if params.structured else None
            except StructuredOutputError as error:
                return ErrorInfo(status=400, message=str(error), param="response_format")
            held_back = self.eos_ids | set(params.stop_token_ids)
            logits = SequenceLogits(params, prompt_ids, self.vocab_size, held_back, grammar)
        limit = self.limits.max_model_len - len(prompt_ids)
        seq = _Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=limit if params.max_tokens is None else params.max_tokens,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop),
            sink=sink,
            key=key,
            generator=make_generator(params),
            logits=logits,
        )
        self.scheduler.enqueue(seq)
        self._wakeup.set()
        return seq

    def abort(self, seq: _Sequence) -> None:
        """The caller went away: free its slot at the next step (no-op once finished)."""
        if not seq.finished:
            seq.aborted = True
            self._wakeup.set()

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineEvent]:
        """Yields accepted, then deltas, then done; or a single error event."""
        events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        sink = self._loop_sink(asyncio.get_running_loop())
        seq = self.submit(request_id, prompt_ids, params, sink, events)
        if isinstance(seq, ErrorInfo):
            yield EngineEvent(kind="error", error=seq)
            return
        try:  # a caller that leaves at "accepted" leaves a queued request: abort it too
            yield EngineEvent(kind="accepted", prompt_tokens=len(prompt_ids))
            async for event in drain_events(events):
                yield event
        finally:
            self.abort(seq)

    def _loop_sink(self, loop: asyncio.AbstractEventLoop) -> LoopSink:
        sink = self._loop_sinks.get(loop)
        if sink is None:
            sink = self._loop_sinks[loop] = LoopSink(loop)
        return sink

    def submit_score(self, token_ids: list[int], reply: ScoreReply) -> None:
        """Queue a scoring job (thread-safe); `reply` gets the result on the engine thread."""
        check_score_length(token_ids, self.limits.max_model_len)
        self._score_jobs.append(_ScoreJob(list(token_ids), reply))
        self._wakeup.set()

    async def score(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token log-probabilities at every position: float32 [len(token_ids), vocab].

        Row i is the distribution the model predicts after token_ids[: i + 1]. Runs on the
        engine thread between decode steps (for shadow comparison and quality checks).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.submit_score(token_ids, loop_reply(loop, future))
        return await future

    async def target_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [len(token_ids) - 1]: the log-probability of each next token (perplexity)."""
        return gather_targets(await self.score(token_ids), token_ids)

    def _score_one(self, job: _ScoreJob) -> None:
        try:
            logits = self.runner.prefill(self.score_slot, job.token_ids, 0, True, every=True)
        except Exception as error:
            job.reply(None, error)
            return
        job.reply(torch.log_softmax(logits, dim=-1), None)

    # ---- the engine thread -----------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, on the calling thread, until `stop`. The engine process runs it
        on its main thread: the thread that loaded the model already owns an OpenMP team, and a
        second team on another thread made libgomp throttle its spin-waits, which measured
        1.7x slower per decode step on 2 cores."""
        with torch.inference_mode():
            while not self._stopping:
                if not (self.scheduler.has_work() or self._score_jobs):
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                try:
                    self._step()
                except Exception as error:  # keep the replica alive; fail only what was running
                    log.exception("engine step failed")
                    self._fail_running(error)

    def _step(self) -> None:
        self._move_slots(self.scheduler.drop_aborted())
        if self._score_jobs:
            self._score_one(self._score_jobs.popleft())
        try:
            self._forward_once()
            # Counted before the events go out: a caller that reads stats on its last event
            # sees this step.
            self.counters["steps"] += 1
        finally:
            self._outbox.flush()

    def _move_slots(self, moves: list[SlotMove]) -> None:
        for move in moves:
            self.runner.move_slot(move.source, move.target, move.length)

    def _forward_once(self) -> None:
        """One pass over the weights: a token for every decoding sequence plus chunks of
        waiting prompts, so joining requests never stall the running ones for a pass."""
        step = self.scheduler.plan()
        self._start_prefills(step)
        if step.empty:
            return
        batch = step.decode
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(batch))
        decode_logits, chunk_logits = self.runner.step(
            [s.generated[-1] for s in batch],
            [s.cached for s in batch],
            [PrefillChunk(c.slot, c.token_ids, c.start, _logits_wanted(c)) for c in step.chunks],
        )
        self.counters["prompt_tokens"] += sum(len(c.token_ids) for c in step.chunks)
        ends: list[torch.Tensor] = []
        for chunk, logits in zip(step.chunks, chunk_logits, strict=True):
            if chunk.seq.full_prefill:
                self._add_prompt_logprobs(chunk, logits)
                logits = logits[-1]
            if chunk.last:
                ends.append(logits)
        outcome = self.scheduler.complete(step)
        self._move_slots(outcome.moves)
        finished = self._accept_decoded(batch, decode_logits) if batch else []
        # Finished prompts joined the batch right after `batch`, in chunk order.
        sampled: list[tuple[int, _Sequence, torch.Tensor]] = []
        for index, (seq, end) in enumerate(zip(outcome.joined, ends, strict=True), len(batch)):
            if seq.full_prefill:
                self._outbox.add(
                    seq, EngineEvent(kind="prompt", prompt_logprobs=seq.prompt_logprobs)
                )
            if seq.max_new_tokens == 0:  # the prompt was all that was asked for
                self._finish(seq, "length")
                finished.append(index)
            else:
                sampled.append((index, seq, end))
        if sampled:
            seqs = [seq for _, seq, _ in sampled]
            tokens, entries = self._choose(seqs, torch.stack([end for _, _, end in sampled]))
            for (index, seq, _), token, entry in zip(sampled, tokens, entries, strict=True):
                if self._accept_token(seq, token, entry):
                    finished.append(index)
        self._move_slots(self.scheduler.release(finished))

    def _add_prompt_logprobs(self, chunk: Chunk[_Sequence], logits: torch.Tensor) -> None:
        """Row j of a chunk's logits predicts prompt token start + j + 1."""
        seq = chunk.seq
        if chunk.start == 0:
            seq.prompt_logprobs.append(None)  # nothing predicts the first token
        targets = seq.prompt_ids[chunk.start + 1 : chunk.start + len(chunk.token_ids) + 1]
        if targets:
            # As vLLM reports them: the model's distribution, before temperature or penalties.
            rows = logprob_rows(logits[: len(targets)], temperature=0.0)
            top = seq.params.prompt_logprobs or 0
            seq.prompt_logprobs.extend(token_logprobs(rows, targets, top))

    def _start_prefills(self, step: StepPlan[_Sequence]) -> None:
        """Copy the reused prompt prefixes of newly admitted requests into their slots."""
        now = time.perf_counter()
        for seq in step.admitted:
            seq.queue_seconds = now - seq.arrived
        self._move_slots(step.moves)
        self.counters["prefix_cached_tokens"] += sum(move.length for move in step.moves)

    def _accept_decoded(self, batch: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Sample and record a token for each decoding sequence; the indices that finished."""
        tokens, entries = self._choose(batch, logits)
        return [
            i
            for i, (s, t, e) in enumerate(zip(batch, tokens, entries, strict=True))
            if self._accept_token(s, t, e)
        ]

    def _choose(
        self, seqs: list[_Sequence], logits: torch.Tensor
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """A token per row of float32 logits [B, V] (processed in place first), and its
        log-probability entry for the sequences that asked."""
        for row, seq in enumerate(seqs):
            if seq.logits is not None:
                seq.logits.process(logits[row])
        tokens = sample_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        entries: list[TokenLogprob | None] = [None] * len(seqs)
        for row, seq in enumerate(seqs):
            if seq.params.logprobs is not None:
                temperature = 0.0 if seq.params.greedy else seq.params.temperature
                rows = logprob_rows(logits[row : row + 1], temperature)
                entries[row] = token_logprobs(rows, [tokens[row]], seq.params.logprobs)[0]
        return tokens, entries

    def _accept_token(self, seq: _Sequence, token: int, entry: TokenLogprob | None) -> bool:
        """Record a sampled token and stream its text; True when the sequence has finished."""
        seq.generated.append(token)
        self.counters["generated_tokens"] += 1
        if seq.logits is not None and not seq.logits.accept(token):
            seq.finished = True
            info = server_error(f"token {token} broke the request's output grammar")
            self._outbox.add(seq, EngineEvent(kind="error", error=info))
            return True
        reason = None
        text = ""
        if token in seq.params.stop_token_ids or (
            token in self.eos_ids and not seq.params.ignore_eos
        ):
            reason = "stop"
        else:
            text = seq.detokenizer.add(token)
            if seq.detokenizer.stopped:
                reason = "stop"
            elif len(seq.generated) >= seq.max_new_tokens:
                reason = "length"
        if reason is not None:
            text += seq.detokenizer.flush()
        delta = EngineEvent(
            kind="delta",
            text=text,
            tokens=1,
            logprobs=None if entry is None else [entry],
        )
        self._outbox.add(seq, delta)
        if reason is None:
            return False
        self._finish(seq, reason)
        return True

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finished = True
        self.counters["finished"] += 1
        self._outbox.add(
            seq,
            EngineEvent(
                kind="done",
                finish_reason=reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.generated),
                queue_seconds=seq.queue_seconds,
            ),
        )

    def _fail_running(self, error: Exception) -> None:
        info = server_error(f"generation failed: {error}")
        for seq in self.scheduler.clear_running():
            seq.finished = True
            self._outbox.add(seq, EngineEvent(kind="error", error=info))
        self._outbox.flush()


def _logits_wanted(chunk: Chunk[_Sequence]) -> str:
    if chunk.seq.full_prefill:
        return "all"
    return "last" if chunk.last else "none"
