"""What a replica needs from an engine, whichever one serves the variant.

`Engine` is the contract every engine keeps (torch in-process, torch in its own process, vLLM).
Scoring is a capability only some engines have, so it is a second protocol: callers check
`isinstance(engine, ScoringEngine)` and get a typed engine back, instead of probing names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import torch

from .types import EngineEvent, ReplyTo, SamplingParams


@runtime_checkable
class Engine(Protocol):
    # True when events reach whichever event loop asked; False when the engine is bound to
    # the loop that started it (vLLM's AsyncLLM), so callers must stay on that loop.
    serves_any_loop: bool

    def start(self) -> None:
        """Begin serving; a no-op for an engine already running once constructed."""
        ...

    def shutdown(self) -> None:
        """Stop serving and release the engine's threads or processes (blocks until done)."""
        ...

    def is_alive(self) -> bool:
        """False once the engine can no longer serve (a dead thread or child process)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for the variant's stats: at least running, waiting, kv_cache_bytes."""
        ...

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[EngineEvent]:
        """Yields accepted, then deltas, then done; or a single error event.

        Closing the stream before done aborts the request and frees its slot: that is how a
        caller that goes away cancels, so no request outlives its consumer.
        """
        ...


@runtime_checkable
class ScoringEngine(Engine, Protocol):
    """An engine that also scores token sequences teacher-forced (shadow KL, perplexity)."""

    async def score(self, token_ids: list[int]) -> torch.Tensor:
        """Next-token log-probabilities at every position: [len(token_ids), vocab]; row i is
        the distribution predicted after token_ids[: i + 1]."""
        ...

    async def target_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [len(token_ids) - 1]: the log-probability each next token got."""
        ...


@runtime_checkable
class ForwardingEngine(Engine, Protocol):
    """An engine that can send a request's events to the gateway replica itself
    (event_channel.py), so they skip the variant replica and Ray Serve's stream."""

    def forward(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, reply_to: ReplyTo
    ) -> AsyncIterator[EngineEvent]:
        """As generate, but the events go to `reply_to`; this yields "forwarded" once the
        request ended there. Events it could not send there come here as from generate."""
        ...
