"""Engine "vllm": vLLM's AsyncLLM on a checkpoint directory, behind the same event stream.

vLLM is imported lazily so that the torch engine never pays for it. On CPU it runs the model in
its own engine-core process (spawned; inside a Ray actor it does this by itself).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator
from typing import Any

from . import orphan_guard
from .limits import EngineLimits, context_error, queue_full_error
from .types import EngineEvent, SamplingParams

log = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


class VllmEngine:
    """Implements `Engine` (protocol.py); it does not score (no `ScoringEngine`)."""

    # AsyncLLM streams to the event loop it was started on.
    serves_any_loop = False

    def __init__(
        self,
        model_path: str,
        dtype: str,
        limits: EngineLimits,
        enforce_eager: bool = True,
        kv_cache_gb: float = 1.0,
    ) -> None:
        self.model_path = model_path
        self.dtype = dtype
        self.limits = limits
        self.enforce_eager = enforce_eager
        self.kv_cache_bytes = int(kv_cache_gb * 2**30)
        self._llm: Any = None
        self._guard: subprocess.Popen | None = None
        self._in_flight = 0
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "finished": 0, "peak_batch": 0}

    def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_path,
            dtype=self.dtype,
            max_model_len=self.limits.max_model_len,
            max_num_seqs=self.limits.max_num_seqs,
            enforce_eager=self.enforce_eager,
            kv_cache_memory_bytes=self.kv_cache_bytes,
            # Prefill budget per step: vLLM's chunked prefill does what our prefill chunks do.
            max_num_batched_tokens=max(self.limits.prefill_chunk_tokens, self.limits.max_num_seqs),
        )
        before = orphan_guard.descendants()
        self._llm = AsyncLLM.from_engine_args(args)
        # Its engine-core process does not notice this process dying: a guard ends it then.
        self._guard = orphan_guard.guard_new_children(before)
        log.info("vLLM engine started on %s", self.model_path)

    def is_alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._guard is not None:  # nothing left to guard
            self._guard.terminate()
            self._guard.wait(timeout=10)
            self._guard = None

    def stats(self) -> dict[str, Any]:
        return {
            "running": self._in_flight,
            "waiting": 0,  # vLLM queues internally; its own scheduler stats are not exposed here
            "kv_cache_bytes": self.kv_cache_bytes,
            **self.counters,
        }

    def _sampling(self, params: SamplingParams, prompt_len: int):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VllmSamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            max_tokens=params.max_tokens or self.limits.max_model_len - prompt_len,
            stop=params.stop or None,
            ignore_eos=params.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineEvent]:
        problem = context_error(prompt_ids, params, self.limits.max_model_len)
        if problem is None and self._in_flight >= (
            self.limits.max_num_seqs + self.limits.max_queued_requests
        ):
            problem = queue_full_error()
        if problem is not None:
            yield EngineEvent(kind="error", error=problem)
            return
        self._in_flight += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], self._in_flight)
        finished = False
        generated = 0
        try:
            yield EngineEvent(kind="accepted", prompt_tokens=len(prompt_ids))
            stream = self._llm.generate(
                {"prompt_token_ids": prompt_ids},
                self._sampling(params, len(prompt_ids)),
                request_id,
            )
            async for output in stream:
                completion = output.outputs[0]
                count = len(completion.token_ids)
                generated += count
                self.counters["generated_tokens"] += count
                if count or completion.text:
                    yield EngineEvent(kind="delta", text=completion.text, tokens=count)
                if output.finished:
                    finished = True
                    self.counters["finished"] += 1
                    self.counters["prompt_tokens"] += len(prompt_ids)
                    yield EngineEvent(
                        kind="done",
                        finish_reason=_FINISH_REASONS.get(completion.finish_reason, "stop"),
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=generated,
                    )
        finally:
            self._in_flight -= 1
            if not finished and self._llm is not None:
                await self._llm.abort(request_id)  # the caller left: free vLLM's slot too
