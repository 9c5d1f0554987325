"""Bookkeeping of one caller request, reported per variant: latency, tokens, FLOPs of work, the
canary's sample, and the text a shadow copy is compared with."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..engine.types import EngineEvent, GenerateRequest
from ..observability.mfu import RequestWork

if TYPE_CHECKING:
    from .gateway import GatewayCore


class RequestClock:
    def __init__(self, core: GatewayCore, variant: str, endpoint: str) -> None:
        self.core = core
        self.metrics = core.metrics
        self.variant = variant
        self.endpoint = endpoint  # the endpoint label of the request counter
        self.shadows = core.shadow.pick(variant)
        self.arrived = time.perf_counter()
        self.ttft: float | None = None
        # Per choice (a request with n > 1 has several): its work, its last token's time.
        self.work: dict[int, RequestWork] = {}
        self.last: dict[int, float] = {}
        self.parts: list[str] = []  # the first choice's text, for the shadow comparison
        self.finished = False
        core.in_flight += 1

    def accepted(self, choice: int, event: EngineEvent) -> None:
        self.work[choice] = RequestWork()
        self.work[choice].accepted(event.prompt_tokens)

    def tokens(self, choice: int, count: int, text: str = "") -> None:
        if self.shadows and choice == 0:
            self.parts.append(text)
        if count <= 0:
            return
        self.core.meter.add(self.variant, self.work[choice].tokens(count), count)
        stamp = time.perf_counter()
        last = self.last.get(choice)
        self.last[choice] = stamp
        if self.ttft is None:
            self.ttft = stamp - self.arrived
            self.metrics.ttft.labels(self.variant).observe(self.ttft)
        if last is None:
            return  # a choice's first tokens have no gap before them to measure
        gap = (stamp - last) / count
        for _ in range(count):
            self.metrics.inter_token.labels(self.variant).observe(gap)

    def done(self, event: EngineEvent) -> None:
        self.metrics.prompt_tokens.labels(self.variant).inc(event.prompt_tokens)
        self.metrics.generation_tokens.labels(self.variant).inc(event.completion_tokens)
        if event.queue_seconds is not None:
            self.metrics.queue_wait.labels(self.variant).observe(event.queue_seconds)

    def finish(self, status: str, request: GenerateRequest | None = None) -> None:
        """Once per request: the status counter, end-to-end latency, the canary's sample, the
        shadow copies (of the first choice's request)."""
        if self.finished:
            return
        self.finished = True
        self.core.in_flight -= 1
        self.metrics.requests.labels(self.variant, self.endpoint, status).inc()
        e2e = time.perf_counter() - self.arrived
        if status == "200":
            self.metrics.e2e.labels(self.variant).observe(e2e)
        self.core.canary.record(self.variant, self.ttft, e2e, int(status))
        if status == "200" and self.shadows and request is not None:
            self.core.shadow.submit(self.shadows, request, "".join(self.parts), self.core.in_flight)
