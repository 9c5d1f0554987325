"""The choices of one request: one engine request per prompt per `n` (or `best_of`), opened
together on the chosen variant, their events merged, each one's answer accumulated."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from ..engine.limits import server_error
from ..engine.types import EngineEvent, GenerateRequest, TokenLogprob
from .backends import VariantBackend
from .clock import RequestClock
from .errors import OpenAIError
from .failures import queue_timeout
from .protocol import Usage, new_id


@dataclass
class Choice:
    """One engine request and what it has answered so far."""

    index: int  # among the request's choices, in OpenAI's order: prompt-major, then n
    prompt_index: int
    request: GenerateRequest
    events: AsyncGenerator[EngineEvent, None] | None = None
    started: EngineEvent | None = None  # its first event after "accepted", not yet consumed
    prompt_tokens: int = 0
    prompt: EngineEvent | None = None  # the echoed prompt, when asked
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def cumulative_logprob(self) -> float:
        """How likely the variant found this answer (best_of ranks by it)."""
        return math.fsum(entry.logprob for entry in self.logprobs)

    def record(self, event: EngineEvent) -> None:
        if event.kind == "prompt":
            self.prompt = event
        elif event.kind == "delta":
            self.parts.append(event.text)
            self.logprobs.extend(event.logprobs or ())
            self.completion_tokens += event.tokens
        elif event.kind == "done":
            self.finish_reason = event.finish_reason


def usage(choices: list[Choice]) -> Usage:
    """Each prompt counted once, however many choices it has; every generated token counted."""
    prompts = {c.prompt_index: c.prompt_tokens for c in choices}
    return Usage.of(sum(prompts.values()), sum(c.completion_tokens for c in choices))


async def _open(choice: Choice, backend: VariantBackend) -> EngineEvent:
    """ "accepted", once the request has started (its first event after that is kept for the
    answer), or the error that refused or failed it before any work was sent back."""
    choice.events = backend.generate(choice.request)
    first = await anext(choice.events)
    if first.kind != "accepted":
        return first
    choice.started = await anext(choice.events, None)
    if choice.started is None:
        return EngineEvent(kind="error", error=server_error("the variant ended a request early"))
    return choice.started if choice.started.kind == "error" else first


async def open_choices(
    choices: list[Choice], backend: VariantBackend, clock: RequestClock, timeout: float
) -> None:
    """Send every choice's request and wait until each has started; raise the first refusal
    or failure (closing the others) so that the caller is answered 4xx/5xx before any 200.
    Choices that have not started within `timeout` seconds (queued behind others) are
    dropped, their queued work with them, and the caller answered 503."""
    try:
        async with asyncio.timeout(timeout):
            firsts = await _open_all(choices, backend)
    except TimeoutError:
        await close_choices(choices)
        raise OpenAIError(queue_timeout(clock.variant, timeout)) from None
    failure = next((f for f in firsts if isinstance(f, BaseException)), None)
    refusal = next((f for f in firsts if isinstance(f, EngineEvent) and f.kind == "error"), None)
    if failure is not None or refusal is not None:
        await close_choices(choices)
        if failure is not None:
            raise failure
        raise OpenAIError(refusal.error)
    for choice, first in zip(choices, firsts, strict=True):
        choice.prompt_tokens = first.prompt_tokens
        clock.accepted(choice.index, first)


async def _open_all(
    choices: list[Choice], backend: VariantBackend
) -> list[EngineEvent | BaseException]:
    """Each choice's first event, or what it raised. One choice (the common case) is opened in
    this task: a task per choice costs loop passes before the first token reaches the client."""
    if len(choices) == 1:
        try:
            return [await _open(choices[0], backend)]
        except Exception as error:
            return [error]
    return await asyncio.gather(*(_open(c, backend) for c in choices), return_exceptions=True)


async def close_choices(choices: list[Choice]) -> None:
    for choice in choices:
        if choice.events is not None:
            await choice.events.aclose()


async def _events(choice: Choice) -> AsyncIterator[EngineEvent]:
    """The choice's events from its first one after "accepted"."""
    if choice.started is not None:
        started, choice.started = choice.started, None
        yield started
    async for event in choice.events:
        yield event


async def merged_events(choices: list[Choice]) -> AsyncIterator[tuple[Choice, EngineEvent]]:
    """Every choice's events up to its done or error, as they arrive."""
    if len(choices) == 1:  # the common case, without a task per choice
        async for event in _events(choices[0]):
            yield choices[0], event
        return
    queue: asyncio.Queue[tuple[Choice, EngineEvent | BaseException | None]] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for event in _events(choice):
                await queue.put((choice, event))
        except Exception as error:  # re-raised on the consumer's side
            await queue.put((choice, error))
        finally:
            await queue.put((choice, None))

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    try:
        open_count = len(choices)
        while open_count:
            choice, item = await queue.get()
            if item is None:
                open_count -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def track(clock: RequestClock, choice: Choice, event: EngineEvent) -> None:
    """Record an event on its choice and on the request's clock."""
    choice.record(event)
    if event.kind == "delta":
        clock.tokens(choice.index, event.tokens, event.text)
    elif event.kind == "done":
        clock.done(event)


async def collect(choices: list[Choice], clock: RequestClock) -> None:
    """Every choice's whole answer; an OpenAIError if any of them fails."""
    try:
        async for choice, event in merged_events(choices):
            if event.kind == "error":
                raise OpenAIError(event.error)
            track(clock, choice, event)
    finally:
        await close_choices(choices)
    unfinished = [c.index for c in choices if c.finish_reason is None]
    if unfinished:
        raise OpenAIError.of(500, f"the variant ended choice {unfinished[0]} without finishing")


def fan_out(requests: list[GenerateRequest], count: int) -> list[Choice]:
    """`count` choices per engine request, in OpenAI's order (prompt-major). A seeded request's
    copies are seeded seed, seed + 1, ...: reproducible, yet not all the same answer."""
    choices: list[Choice] = []
    for prompt_index, base in enumerate(requests):
        for copy in range(count):
            seed = base.sampling.seed
            sampling = base.sampling.model_copy(
                update={"seed": None if seed is None else seed + copy}
            )
            request = base.model_copy(update={"request_id": new_id("req"), "sampling": sampling})
            choices.append(Choice(len(choices), prompt_index, request))
    return choices
