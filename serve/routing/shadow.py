"""Shadow copies: replay a fraction of one variant's requests on another, off the caller's path.

After a source request has finished (the caller already has its answer), a sampled copy of it
runs on the target as a fire-and-forget task. Copies are bounded (`shadow.max_concurrency` in
flight) and dropped when the gateway is busy (`shadow.max_gateway_in_flight` caller requests in
flight), and each one is counted as shadowed, dropped or failed. A finished copy is scored: both
variants score the prompt + the source's completion (teacher-forced), and routing.shadow_scores
turns the two into exact match, token agreement, next-token KL and reference perplexities.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any

from ..config import ShadowOptions, ShadowRule
from ..engine.types import GenerateRequest
from ..observability.flops import score_work
from ..observability.metrics import GatewayMetrics
from ..observability.mfu import RequestWork, WorkMeter
from .shadow_scores import ShadowScores, ShadowSummary, compare, summarize

log = logging.getLogger(__name__)


class ShadowFailed(RuntimeError):
    pass


class ShadowManager:
    def __init__(
        self,
        rules: list[ShadowRule],
        options: ShadowOptions,
        backends: Mapping[str, Any],
        metrics: GatewayMetrics,
        meter: WorkMeter,
        rng: random.Random | None = None,
    ) -> None:
        self.rules = list(rules)
        self.options = options
        self.backends = backends
        self.metrics = metrics
        self.meter = meter
        self._rng = rng or random.Random()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._results: dict[tuple[str, str], deque[ShadowScores]] = {}
        self._unscorable: set[str] = set()
        for rule in self.rules:
            self._touch(rule)

    def _touch(self, rule: ShadowRule) -> None:
        self._results.setdefault((rule.source, rule.target), deque(maxlen=self.options.window))
        for outcome in ("shadowed", "dropped", "failed"):
            self.metrics.shadow_requests.labels(rule.source, rule.target, outcome)

    def set_rules(self, rules: list[ShadowRule]) -> None:
        self.rules = list(rules)
        for rule in self.rules:
            self._touch(rule)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def pick(self, variant: str) -> list[ShadowRule]:
        """The rules whose draw says: copy this request of `variant`."""
        return [r for r in self.rules if r.source == variant and self._rng.random() < r.fraction]

    def submit(
        self,
        rules: list[ShadowRule],
        request: GenerateRequest,
        source_text: str,
        gateway_in_flight: int,
    ) -> None:
        for rule in rules:
            busy = gateway_in_flight > self.options.max_gateway_in_flight
            if busy or self._in_flight >= self.options.max_concurrency:
                self._count(rule, "dropped")
                continue
            self._in_flight += 1
            task = asyncio.create_task(self._run(rule, request, source_text))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _count(self, rule: ShadowRule, outcome: str) -> None:
        self.metrics.shadow_requests.labels(rule.source, rule.target, outcome).inc()

    async def _run(self, rule: ShadowRule, request: GenerateRequest, source_text: str) -> None:
        try:
            async with asyncio.timeout(self.options.timeout_seconds):
                target_text = await self._replay(rule.target, request)
                source_score, target_score = await asyncio.gather(
                    self._score(rule.source, request, source_text),
                    self._score(rule.target, request, source_text),
                )
                scores = await asyncio.to_thread(
                    compare, source_text, target_text, source_score, target_score
                )
        except Exception as error:
            log.warning("shadow copy %s -> %s failed: %r", rule.source, rule.target, error)
            self._count(rule, "failed")
        else:
            self.record(rule.source, rule.target, scores)
            self._count(rule, "shadowed")
        finally:
            self._in_flight -= 1

    async def _replay(self, variant: str, request: GenerateRequest) -> str:
        copy = request.model_copy(update={"request_id": f"shadow-{uuid.uuid4().hex}"})
        work = RequestWork()
        parts: list[str] = []
        events = self.backends[variant].generate(copy)
        try:
            async for event in events:
                if event.kind == "accepted":
                    work.accepted(event.prompt_tokens)
                elif event.kind == "delta":
                    self.meter.add(variant, work.tokens(event.tokens), event.tokens)
                    parts.append(event.text)
                elif event.kind == "error":
                    raise ShadowFailed(event.error.message)
                elif event.kind == "done":
                    return "".join(parts)
        finally:
            await events.aclose()
        raise ShadowFailed("the target ended the stream without finishing")

    async def _score(
        self, variant: str, request: GenerateRequest, reference: str
    ) -> dict[str, Any] | None:
        """Both sides' log-probs, or None where a variant cannot score (e.g. engine vllm)."""
        try:
            result = await self.backends[variant].score(
                request, reference, self.options.max_score_tokens
            )
        except Exception as error:
            if variant not in self._unscorable:
                self._unscorable.add(variant)
                log.warning("variant %s cannot score shadow copies: %r", variant, error)
            return None
        self.meter.add(variant, score_work(len(result["token_ids"])))
        return result

    def record(self, source: str, target: str, scores: ShadowScores) -> None:
        window = deque(maxlen=self.options.window)
        self._results.setdefault((source, target), window).append(scores)

    def summary(self, source: str, target: str) -> ShadowSummary | None:
        results = self._results.get((source, target))
        return summarize(results) if results else None

    def summaries(self) -> dict[tuple[str, str], ShadowSummary]:
        return {pair: summarize(results) for pair, results in self._results.items() if results}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
