"""A replica's stream pacing (serve/replica/pacing.py): what waits, what never does, and that
nothing is lost, reordered or left running. The event sources are plain async generators: the
pacing is what is tested, on events shaped like the engine's."""

from __future__ import annotations

import asyncio

import pytest

from slimserve.serve.engine.types import EngineEvent, TokenLogprob
from slimserve.serve.replica.pacing import StreamPacer, paced_batches

NEVER_DUE = StreamPacer(messages_per_second=1e-6, max_interval_s=3600.0)


def _delta(text: str, logprob: float | None = None) -> EngineEvent:
    logprobs = None if logprob is None else [TokenLogprob(token_id=1, logprob=logprob)]
    return EngineEvent(kind="delta", text=text, tokens=1, logprobs=logprobs)


ACCEPTED = EngineEvent(kind="accepted", prompt_tokens=3)
DONE = EngineEvent(kind="done", finish_reason="length", completion_tokens=3)


async def _source(events: list[EngineEvent], closed: list[bool] | None = None):
    try:
        for event in events:
            yield event
    finally:
        if closed is not None:
            closed.append(True)


async def _collect(events, pacer: StreamPacer) -> list[list[EngineEvent]]:
    return [batch async for batch in paced_batches(events, pacer)]


def test_interval_is_the_streams_share_of_the_budget_capped():
    pacer = StreamPacer(messages_per_second=200.0, max_interval_s=0.1)
    assert pacer.interval() == 0.0
    pacer.open_streams = 8
    assert pacer.interval() == pytest.approx(0.04)
    pacer.open_streams = 32
    assert pacer.interval() == 0.1


def test_no_interval_sends_every_event_on_its_own():
    events = [ACCEPTED, _delta("a"), _delta("b"), _delta("c"), DONE]
    pacer = StreamPacer(messages_per_second=1.0, max_interval_s=0.0)
    batches = asyncio.run(_collect(_source(events), pacer))
    assert batches == [[event] for event in events]
    assert pacer.open_streams == 0


def test_first_delta_goes_at_once_and_held_deltas_ride_with_done_merged():
    events = [ACCEPTED, _delta("a", -0.5), _delta("b", -1.0), _delta("c", -2.0), DONE]
    batches = asyncio.run(_collect(_source(events), NEVER_DUE))
    assert [[e.kind for e in batch] for batch in batches] == [
        ["accepted"],
        ["delta"],
        ["delta", "done"],
    ]
    assert batches[1][0].text == "a"
    merged = batches[2][0]
    assert (merged.text, merged.tokens) == ("bc", 2)
    assert [entry.logprob for entry in merged.logprobs] == [-1.0, -2.0]
    assert batches[2][1] == DONE


def test_an_error_is_never_held():
    failure = EngineEvent(kind="error")
    batches = asyncio.run(
        _collect(_source([ACCEPTED, _delta("a"), _delta("b"), failure]), NEVER_DUE)
    )
    assert [[e.kind for e in batch] for batch in batches] == [
        ["accepted"],
        ["delta"],
        ["delta", "error"],
    ]


def test_held_deltas_go_out_when_due_without_a_newer_event():
    """The source sends nothing more until it has seen its second delta arrive: only the
    interval running out can send it."""

    async def run() -> list[list[EngineEvent]]:
        seen_second = asyncio.Event()

        async def source():
            yield ACCEPTED
            yield _delta("a")
            yield _delta("b")
            await seen_second.wait()
            yield DONE

        pacer = StreamPacer(messages_per_second=20.0, max_interval_s=0.05)
        batches = []
        async with asyncio.timeout(60):
            async for batch in paced_batches(source(), pacer):
                batches.append(batch)
                if any(event.text == "b" for event in batch):
                    seen_second.set()
        return batches

    batches = asyncio.run(run())
    assert [[e.kind for e in batch] for batch in batches] == [
        ["accepted"],
        ["delta"],
        ["delta"],
        ["done"],
    ]


def test_a_caller_leaving_closes_the_engines_stream_and_frees_its_share():
    async def run(pacer: StreamPacer, closed: list[bool]) -> None:
        batches = paced_batches(_source([ACCEPTED, _delta("a"), _delta("b"), DONE], closed), pacer)
        assert [e.kind for e in await anext(batches)] == ["accepted"]
        assert pacer.open_streams == 1
        await batches.aclose()

    closed: list[bool] = []
    pacer = StreamPacer(messages_per_second=200.0, max_interval_s=0.1)
    asyncio.run(run(pacer, closed))
    assert closed == [True] and pacer.open_streams == 0


def test_a_caller_cancelled_while_deltas_are_held_stops_the_engines_stream():
    async def run(closed: list[bool]) -> None:
        blocked, waiting = asyncio.Event(), asyncio.Event()

        async def source():
            try:
                yield ACCEPTED
                yield _delta("a")
                yield _delta("b")
                waiting.set()  # "b" is held by now: it came before the wait
                await blocked.wait()  # never set: the caller is cancelled while waiting
                yield DONE
            finally:
                closed.append(True)

        async def consume() -> None:
            async for _ in paced_batches(source(), NEVER_DUE):
                pass

        task = asyncio.ensure_future(consume())
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    closed: list[bool] = []
    asyncio.run(run(closed))
    assert closed == [True]


def test_a_failing_engine_stream_raises_through():
    async def source():
        yield ACCEPTED
        raise RuntimeError("engine broke")

    with pytest.raises(RuntimeError, match="engine broke"):
        asyncio.run(_collect(source(), NEVER_DUE))
