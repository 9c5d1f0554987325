"""Engine "torch": iteration-level (continuous) batching on a background thread.

Every step the scheduler (1) drops aborted sequences, (2) prefills at most
`prefill_chunk_tokens` prompt tokens of the next waiting sequence, and (3) runs one decode step
for every sequence already decoding. New requests therefore join the running batch between
decode steps, finished ones leave at once, and a long prompt is spread over several steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from slimserve.serve.engine.detokenizer import IncrementalDetokenizer
from slimserve.serve.engine.limits import EngineLimits, context_error, queue_full_error
from slimserve.serve.engine.llama_runner import LlamaRunner
from slimserve.serve.engine.sampling import make_generator, sample_tokens
from slimserve.serve.engine.types import EngineEvent, ErrorInfo, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    detokenizer: IncrementalDetokenizer
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    generator: torch.Generator | None
    arrived: float = field(default_factory=time.perf_counter)
    queue_seconds: float | None = None
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose K/V sit in the cache
    aborted: bool = False
    finished: bool = False


class _Outbox:
    """Events of one engine step, handed to each caller's event loop in one wake-up.

    A call_soon_threadsafe per token per sequence costs a loop wake-up each; batching them per
    step keeps the replica's event loop (and the GIL) free for the streaming work.
    """

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, EngineEvent]]] = {}

    def add(self, seq: _Sequence, event: EngineEvent) -> None:
        self._pending.setdefault(seq.loop, []).append((seq, event))

    def flush(self) -> None:
        for loop, items in self._pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that caller's event loop is gone
                for seq, _ in items:
                    seq.aborted = True
        self._pending.clear()


@dataclass
class _ScoreJob:
    token_ids: list[int]
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future


def _resolve(future: asyncio.Future, outcome: Any, value: Any) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        outcome(value)


def _deliver(items: list[tuple[_Sequence, EngineEvent]]) -> None:
    for seq, event in items:
        seq.events.put_nowait(event)


class TorchEngine:
    def __init__(self, model: Any, tokenizer: Any, limits: EngineLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        # One slot beyond the batch is reserved for scoring, so it never waits for a free slot.
        self.score_slot = limits.max_num_seqs
        self.runner = LlamaRunner(
            model, limits.max_num_seqs + 1, limits.max_model_len, pack_dense=True
        )
        self._score_jobs: deque[_ScoreJob] = deque()
        self.eos_ids = self._eos_ids(model, tokenizer)
        self._waiting: deque[_Sequence] = deque()
        self._decoding: list[_Sequence] = []  # index == KV slot
        self._prefilling: _Sequence | None = None  # always in slot len(self._decoding)
        self._wakeup = threading.Event()
        self._outbox = _Outbox()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {
            "steps": 0,
            "generated_tokens": 0,
            "prompt_tokens": 0,
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

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self._decoding) + (self._prefilling is not None),
            "waiting": sum(not s.aborted for s in self._waiting),
            "kv_cache_bytes": self.runner.kv_cache_bytes,
            "packed_weight_bytes": self.runner.packed_weight_bytes,
            **self.counters,
        }

    # ---- the caller's side -----------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineEvent]:
        """Yields accepted, then deltas, then done; or a single error event."""
        problem = context_error(prompt_ids, params, self.limits.max_model_len)
        if problem is None and len(self._waiting) >= self.limits.max_queued_requests:
            problem = queue_full_error()
        if problem is not None:
            yield EngineEvent(kind="error", error=problem)
            return
        seq = _Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=params.max_tokens or self.limits.max_model_len - len(prompt_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop),
            loop=asyncio.get_running_loop(),
            events=asyncio.Queue(),
            generator=make_generator(params),
        )
        self._waiting.append(seq)
        self._wakeup.set()
        yield EngineEvent(kind="accepted", prompt_tokens=len(prompt_ids))
        try:
            while True:
                event = await seq.events.get()
                merged = event
                # Coalesce what piled up while the consumer was slow: fewer, larger messages.
                while merged.kind == "delta" and not seq.events.empty():
                    following = seq.events.get_nowait()
                    if following.kind != "delta":
                        yield merged
                        merged = following
                        break
                    merged = EngineEvent(
                        kind="delta",
                        text=merged.text + following.text,
                        tokens=merged.tokens + following.tokens,
                    )
                yield merged
                if merged.kind in ("done", "error"):
                    return
        finally:
            if not seq.finished:
                seq.aborted = True  # the caller went away: free the slot at the next step
                self._wakeup.set()

    async def score(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token log-probabilities at every position: float32 [len(token_ids), vocab].

        Row i is the distribution the model predicts after token_ids[: i + 1]. Runs on the
        engine thread between decode steps (for shadow comparison and quality checks).
        """
        if not 0 < len(token_ids) <= self.limits.max_model_len:
            limit = self.limits.max_model_len
            raise ValueError(f"can score 1..{limit} tokens, got {len(token_ids)}")
        loop = asyncio.get_running_loop()
        job = _ScoreJob(list(token_ids), loop, loop.create_future())
        self._score_jobs.append(job)
        self._wakeup.set()
        return await job.result

    def _score_one(self, job: _ScoreJob) -> None:
        try:
            logits = self.runner.prefill(self.score_slot, job.token_ids, 0, True, every=True)
            outcome, value = job.result.set_result, torch.log_softmax(logits, dim=-1)
        except Exception as error:
            outcome, value = job.result.set_exception, error
        with contextlib.suppress(RuntimeError):  # RuntimeError: that caller's loop is gone
            job.loop.call_soon_threadsafe(_resolve, job.result, outcome, value)

    # ---- the scheduler thread --------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                if not (self._waiting or self._decoding or self._prefilling or self._score_jobs):
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                    continue
                try:
                    self._step()
                except Exception as error:  # keep the replica alive; fail only what was running
                    log.exception("engine step failed")
                    self._fail_running(error)

    def _step(self) -> None:
        self._drop_aborted()
        if self._score_jobs:
            self._score_one(self._score_jobs.popleft())
        try:
            self._prefill_some()
            if self._decoding:
                self._decode_once()
        finally:
            self._outbox.flush()
        self.counters["steps"] += 1

    def _drop_aborted(self) -> None:
        for index in range(len(self._decoding) - 1, -1, -1):
            if self._decoding[index].aborted:
                self._release(index)
        if self._prefilling is not None and self._prefilling.aborted:
            self._prefilling = None

    def _prefill_some(self) -> None:
        if self._prefilling is None:
            if len(self._decoding) >= self.limits.max_num_seqs:
                return
            while self._waiting and self._prefilling is None:
                candidate = self._waiting.popleft()
                if not candidate.aborted:
                    self._prefilling = candidate
            if self._prefilling is None:
                return
            self._prefilling.queue_seconds = time.perf_counter() - self._prefilling.arrived
        seq = self._prefilling
        start = seq.cached
        chunk = seq.prompt_ids[start : start + self.limits.prefill_chunk_tokens]
        done = start + len(chunk) == len(seq.prompt_ids)
        logits = self.runner.prefill(len(self._decoding), chunk, start, want_logits=done)
        seq.cached += len(chunk)
        self.counters["prompt_tokens"] += len(chunk)
        if not done:
            return
        self._prefilling = None
        token = sample_tokens(logits.unsqueeze(0), [seq.params], [seq.generator])[0]
        self._decoding.append(seq)  # it already sits in slot len(self._decoding)
        if self._accept_token(seq, token):
            self._release(len(self._decoding) - 1)

    def _decode_once(self) -> None:
        batch = self._decoding
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(batch))
        logits = self.runner.decode([s.generated[-1] for s in batch], [s.cached for s in batch])
        for seq in batch:
            seq.cached += 1
        tokens = sample_tokens(logits, [s.params for s in batch], [s.generator for s in batch])
        finished = [
            i
            for i, (s, t) in enumerate(zip(batch, tokens, strict=True))
            if self._accept_token(s, t)
        ]
        for index in reversed(finished):
            self._release(index)

    def _accept_token(self, seq: _Sequence, token: int) -> bool:
        """Record a sampled token and stream its text; True when the sequence has finished."""
        seq.generated.append(token)
        self.counters["generated_tokens"] += 1
        reason = None
        text = ""
        if token in self.eos_ids and not seq.params.ignore_eos:
            reason = "stop"
        else:
            text = seq.detokenizer.add(token)
            if seq.detokenizer.stopped:
                reason = "stop"
            elif len(seq.generated) >= seq.max_new_tokens:
                reason = "length"
        if reason is not None:
            text += seq.detokenizer.flush()
        self._outbox.add(seq, EngineEvent(kind="delta", text=text, tokens=1))
        if reason is None:
            return False
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
        return True

    def _release(self, index: int) -> None:
        """Free slot `index`, keeping decoding sequences packed in slots 0..B-1."""
        last = len(self._decoding) - 1
        if index != last:
            moved = self._decoding[last]
            self.runner.move_slot(last, index, moved.cached)
            self._decoding[index] = moved
        self._decoding.pop()
        if self._prefilling is not None:  # it must stay right after the decoding block
            self.runner.move_slot(last + 1, last, self._prefilling.cached)

    def _fail_running(self, error: Exception) -> None:
        info = ErrorInfo(status=500, type="server_error", message=f"generation failed: {error}")
        victims = [*self._decoding, *([self._prefilling] if self._prefilling else [])]
        self._decoding.clear()
        self._prefilling = None
        for seq in victims:
            seq.finished = True
            self._outbox.add(seq, EngineEvent(kind="error", error=info))
        self._outbox.flush()
