"""Engine "vllm": vLLM's AsyncLLM on a checkpoint directory, behind the same event stream.

vLLM is imported lazily so that the torch engine never pays for it. On CPU it runs the model in
its own engine-core process (spawned; inside a Ray actor it does this by itself).
"""

from __future__ import annotations

import logging
import math
import re
import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import orphan_guard
from .limits import EngineLimits, context_error, queue_full_error, server_error, token_range_error
from .types import MAX_LOGPROBS, EngineEvent, ErrorInfo, SamplingParams, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.logprobs import Logprob

log = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}
# vLLM's names for request fields, where ours differ.
_PARAM_NAMES = {"structured_outputs": "response_format"}
# What vLLM's structured-output validation says (its errors there name no parameter).
_STRUCTURED_WORDS = re.compile(r"structured|json|schema|grammar", re.IGNORECASE)


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
        self._vocab_size = 0
        self._guard: subprocess.Popen | None = None
        self._in_flight = 0
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "finished": 0, "peak_batch": 0}

    def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
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
            # Log-probabilities as the torch engine reports them: after penalties, logit_bias,
            # min_tokens, the grammar mask and temperature ("raw" is before all of those). vLLM
            # takes them after top-p too: with top_p < 1 they are renormalized over the nucleus.
            logprobs_mode="processed_logprobs",
            max_logprobs=MAX_LOGPROBS,
            # xgrammar like the torch engine, compact JSON: a small model otherwise may emit
            # whitespace until max_tokens runs out.
            structured_outputs_config=StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
        )
        before = orphan_guard.descendants()
        self._llm = AsyncLLM.from_engine_args(args)
        # Its engine-core process does not notice this process dying: a guard ends it then.
        self._guard = orphan_guard.guard_new_children(before)
        self._vocab_size = self._llm.model_config.get_vocab_size()
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

    def _sampling(self, params: SamplingParams, prompt_len: int) -> VllmSamplingParams:
        """vLLM's params for ours, checked as vLLM checks them on admission (raises
        VLLMValidationError or ValueError), so that a refusal is an error before "accepted"."""
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        prompt_only = params.max_tokens == 0
        if params.max_tokens is None:
            max_tokens = self.limits.max_model_len - prompt_len
        else:
            # vLLM refuses max_tokens=0: a prompt-only request samples one token (from the
            # prefill's last position, no extra forward pass) that generate() discards.
            max_tokens = max(params.max_tokens, 1)
        structured = None
        if params.structured is not None:
            schema = params.structured.json_schema
            structured = (
                StructuredOutputsParams(json_object=True)
                if schema is None
                else StructuredOutputsParams(json=schema)
            )
        sampling = VllmSamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            seed=None if params.seed is None else params.seed % 2**63,  # vLLM's is int64
            max_tokens=max_tokens,
            min_tokens=0 if prompt_only else params.min_tokens,
            stop=params.stop or None,
            stop_token_ids=params.stop_token_ids or None,
            ignore_eos=params.ignore_eos,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=params.logit_bias or None,
            logprobs=None if prompt_only else params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )
        config = self._llm.vllm_config
        # What vLLM's input processor runs inside generate(), where a refusal would come only
        # after "accepted" (a 200 already streaming); it runs again there, cheaply.
        sampling.verify(
            self._llm.model_config,
            config.speculative_config,
            config.structured_outputs_config,
            self._llm.tokenizer,
        )
        return sampling

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineEvent]:
        problem = context_error(prompt_ids, params, self.limits.max_model_len)
        problem = problem or token_range_error(prompt_ids, params, self._vocab_size)
        if problem is None and self._in_flight >= (
            self.limits.max_num_seqs + self.limits.max_queued_requests
        ):
            problem = queue_full_error()
        sampling = None
        if problem is None:
            try:
                sampling = self._sampling(params, len(prompt_ids))
            except Exception as error:
                problem = _refusal(error, params)
                if problem is None:
                    raise
        if sampling is None:  # refused
            yield EngineEvent(kind="error", error=problem)
            return
        self._in_flight += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], self._in_flight)
        prompt_only = params.max_tokens == 0
        # Prompt log-probabilities, gathered until the first delta or done carries them out.
        prompt_positions: list[Mapping[int, Logprob] | None] | None = (
            None if params.prompt_logprobs is None else []
        )
        ended = False  # vLLM is done with the request: nothing to abort
        generated = 0
        try:
            # vLLM takes the request before "accepted" is said: what it still refuses there is an
            # error with its status rather than a 200 ending in one, and the prompt is on its way
            # to the engine core while the gateway answers "accepted".
            try:
                collector = await self._llm.add_request(
                    request_id, {"prompt_token_ids": prompt_ids}, sampling
                )
            except Exception as error:
                info = _refusal(error, params)
                if info is None:
                    raise
                ended = True  # vLLM did not keep it
                yield EngineEvent(kind="error", error=info)
                return
            yield EngineEvent(kind="accepted", prompt_tokens=len(prompt_ids))
            try:
                while True:
                    # What AsyncLLM.generate does: drain without a task switch where it can.
                    output = collector.get_nowait() or await collector.get()
                    if prompt_positions is not None and output.prompt_logprobs:
                        prompt_positions.extend(output.prompt_logprobs)
                    completion = output.outputs[0]
                    ids = [] if prompt_only else list(completion.token_ids)
                    text = "" if prompt_only else completion.text
                    if prompt_positions is not None and (ids or text or output.finished):
                        entries = _prompt_entries(
                            prompt_positions, prompt_ids, params.prompt_logprobs or 0
                        )
                        yield EngineEvent(kind="prompt", prompt_logprobs=entries)
                        prompt_positions = None
                    generated += len(ids)
                    self.counters["generated_tokens"] += len(ids)
                    if ids or text:
                        logprobs = None
                        if params.logprobs is not None:
                            positions = completion.logprobs or []
                            logprobs = [
                                _entry(p, t, params.logprobs)
                                for p, t in zip(positions, ids, strict=True)
                            ]
                        yield EngineEvent(
                            kind="delta",
                            text=text,
                            tokens=len(ids),
                            logprobs=logprobs,
                        )
                    if not output.finished:
                        continue
                    ended = True
                    if completion.finish_reason == "error":
                        yield EngineEvent(kind="error", error=_failure(params, generated))
                        return
                    self.counters["finished"] += 1
                    self.counters["prompt_tokens"] += len(prompt_ids)
                    reason = completion.finish_reason
                    yield EngineEvent(
                        kind="done",
                        finish_reason="length"
                        if prompt_only
                        else _FINISH_REASONS.get(reason or "stop", "stop"),
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=generated,
                    )
                    return
            except Exception as error:
                # Refused at add_request above, so unlikely here; vLLM has dropped the request.
                info = _refusal(error, params)
                if info is None:
                    raise
                ended = True
                yield EngineEvent(kind="error", error=info)
        finally:
            self._in_flight -= 1
            if not ended and self._llm is not None:
                await self._llm.abort(request_id)  # the caller left: free vLLM's slot too


def _refusal(error: Exception, params: SamplingParams) -> ErrorInfo | None:
    """The 400 for vLLM refusing the request's params; None for any other error."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineGenerateError

    if isinstance(error, EngineGenerateError) and isinstance(error.__cause__, ValueError):
        error = error.__cause__  # generate() wraps a plain ValueError from its input checks
    elif not isinstance(error, VLLMClientError | ValueError):
        return None
    message = str(error.args[0]) if error.args else str(error)
    name = getattr(error, "parameter", None)
    if name is not None:
        param: str | None = _PARAM_NAMES.get(name, name)
    elif params.structured is not None and _STRUCTURED_WORDS.search(message):
        param = "response_format"
    else:
        # The earliest of our field names in the message ("min_tokens must be <= max_tokens").
        found = [(message.find(f), f) for f in SamplingParams.model_fields if f in message]
        param = min(found)[1] if found else None
    return ErrorInfo(status=400, message=message, param=param)


def _failure(params: SamplingParams, generated: int) -> ErrorInfo:
    """vLLM finished the request with an error: with a grammar and nothing generated, the
    grammar failed to compile (checks passed, compilation did not): the schema's fault."""
    if params.structured is not None and generated == 0:
        return ErrorInfo(
            status=400,
            message="the JSON schema could not be compiled into a grammar",
            param="response_format",
        )
    return server_error("vLLM failed the request")


def _entry(position: Mapping[int, Logprob], token_id: int, top: int) -> TokenLogprob:
    """One position of vLLM's logprobs: the chosen token plus the top-`top` by rank (vLLM adds
    the chosen token when it is not among them, so a position holds `top` or `top` + 1)."""
    best = sorted(position.items(), key=lambda item: item[1].logprob, reverse=True)[:top]
    return TokenLogprob(
        token_id=token_id,
        logprob=position[token_id].logprob,
        # Tokens masked out (-inf) are left out, as the torch engine does: JSON has no infinity.
        top=[
            TopLogprob(token_id=i, logprob=p.logprob) for i, p in best if math.isfinite(p.logprob)
        ],
    )


def _prompt_entries(
    positions: Iterable[Mapping[int, Logprob] | None], prompt_ids: list[int], top: int
) -> list[TokenLogprob | None]:
    """One entry per prompt token; vLLM's first position is None (nothing predicts it)."""
    return [
        None if position is None else _entry(position, token_id, top)
        for position, token_id in zip(positions, prompt_ids, strict=False)
    ]
