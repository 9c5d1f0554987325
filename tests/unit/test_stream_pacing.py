"""Stream pacing (serve/engine/pacing.py), on a replica's event loop and at the source on the
engine thread: what waits, what never does, and that nothing is lost, reordered or left
running. The replica's event sources are plain async generators (the pacing is what is tested,
on events shaped like the engine's); the engine's is a real engine on a tiny model."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from slimserve.serve.config import DeploymentOptions
from slimserve.serve.engine.limits import EngineLimits
from slimserve.serve.engine.pacing import StepPacing, StreamPacer, paced_batches
from slimserve.serve.engine.torch_engine import TorchEngine
from slimserve.serve.engine.types import EngineEvent, ErrorInfo, SamplingParams, TokenLogprob

from .conftest import tiny_llama

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


def test_the_floor_spaces_a_lone_streams_messages_but_not_a_shared_budgets():
    pacer = StreamPacer(messages_per_second=100.0, max_interval_s=0.2, min_interval_s=0.02)
    pacer.open_streams = 1
    assert pacer.interval() == pytest.approx(0.02)  # the budget alone would say 10 ms
    pacer.open_streams = 8
    assert pacer.interval() == pytest.approx(0.08)
    pacer.open_streams = 32
    assert pacer.interval() == pytest.approx(0.2)


def test_the_deployments_intervals_make_its_pacer():
    deployment = DeploymentOptions(
        stream_messages_per_second=50, min_stream_interval_ms=30, max_stream_interval_ms=150
    )
    pacer = StreamPacer.for_deployment(deployment)
    assert (pacer.messages_per_second, pacer.min_interval_s, pacer.max_interval_s) == (
        50,
        pytest.approx(0.03),
        pytest.approx(0.15),
    )
    assert DeploymentOptions().min_stream_interval_ms == 20  # the default floor
    with pytest.raises(ValidationError, match=r"min_stream_interval_ms .* exceeds"):
        DeploymentOptions(min_stream_interval_ms=300, max_stream_interval_ms=200)


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


# ---- at the source: the engine thread's step pacing ---------------------------------------


def test_step_pacing_holds_deltas_within_the_interval_and_sends_them_when_due():
    pacing = StepPacing(StreamPacer(messages_per_second=100.0, max_interval_s=1.0))
    owner = object()
    assert pacing.admit(1, owner, _delta("a"), now=0.0) == [_delta("a")]  # first: at once
    assert pacing.pacer.interval() == pytest.approx(0.01)  # one stream open
    assert pacing.admit(1, owner, _delta("b", -1.0), now=0.004) == []
    assert pacing.admit(1, owner, _delta("c", -2.0), now=0.008) == []
    assert pacing.due(now=0.009) == []
    [(got_owner, merged)] = pacing.due(now=0.010)
    assert got_owner is owner and merged.text == "bc" and merged.tokens == 2
    assert [entry.logprob for entry in merged.logprobs] == [-1.0, -2.0]
    assert pacing.admit(1, owner, _delta("d"), now=0.015) == []  # 5 ms after that send
    assert pacing.admit(1, owner, _delta("e"), now=0.021) == [_merged("de")]
    assert pacing.open_owners() == [owner]


def _merged(text: str) -> EngineEvent:
    return EngineEvent(kind="delta", text=text, tokens=len(text))


def test_step_pacing_done_carries_the_held_deltas_and_closes_the_stream():
    pacing = StepPacing(NEVER_DUE)
    pacing.admit(7, "seq", _delta("a"), now=0.0)
    pacing.admit(7, "seq", _delta("b"), now=1.0)
    pacing.admit(7, "seq", _delta("c"), now=2.0)
    assert pacing.admit(7, "seq", DONE, now=3.0) == [_merged("bc"), DONE]
    assert pacing.open_owners() == [] and pacing.pacer.open_streams == 0
    error = EngineEvent(kind="error", error=ErrorInfo(status=500, message="boom"))
    assert pacing.admit(8, "other", error, now=4.0) == [error]  # before any delta: alone


def test_step_pacing_interval_is_the_open_streams_share_and_forget_drops():
    pacing = StepPacing(StreamPacer(messages_per_second=100.0, max_interval_s=0.05))
    for stream in range(3):
        pacing.admit(stream, stream, _delta("x"), now=0.0)
    assert pacing.pacer.interval() == pytest.approx(0.03)
    pacing.admit(0, 0, _delta("y"), now=0.02)
    pacing.forget(0)  # aborted: its held "y" is dropped, never sent
    assert pacing.due(now=10.0) == [] and pacing.pacer.interval() == pytest.approx(0.02)
    for stream in range(3, 12):
        pacing.admit(stream, stream, _delta("x"), now=0.0)
    assert pacing.pacer.interval() == 0.05  # capped


class _StepSink:
    """Records what the engine delivers, one list per step (paced or not, as asked)."""

    def __init__(self, paced: bool) -> None:
        self.paced = paced
        self.steps: list[list[EngineEvent]] = []

    def deliver(self, items):
        self.steps.append([event for _, event in items])
        return True


def test_the_engine_coalesces_only_its_paced_sinks_and_loses_no_token(tokenizer):
    engine = TorchEngine(
        tiny_llama(seed=0),
        tokenizer,
        EngineLimits(
            max_num_seqs=4, max_model_len=96, max_queued_requests=8, prefill_chunk_tokens=16
        ),
    )
    engine.pace_streams(NEVER_DUE)  # nothing due before the end: the most coalescing there is
    prompt = tokenizer("The lighthouse keeper", add_special_tokens=False).input_ids
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    sinks = {"paced": _StepSink(paced=True), "plain": _StepSink(paced=False)}
    for name, sink in sinks.items():
        assert not isinstance(engine.submit(name, prompt, params, sink, name), ErrorInfo)
    engine.start()
    try:
        deadline = time.monotonic() + 60
        while not all(s.steps and s.steps[-1][-1].kind == "done" for s in sinks.values()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        engine.shutdown()
    plain = [event for step in sinks["plain"].steps for event in step]
    assert [event.tokens for event in plain if event.kind == "delta"] == [1] * 10
    paced = [[(e.kind, e.tokens) for e in step] for step in sinks["paced"].steps]
    assert paced == [[("delta", 1)], [("delta", 9), ("done", 0)]]
    texts = {
        name: "".join(e.text for step in sink.steps for e in step if e.kind == "delta")
        for name, sink in sinks.items()
    }
    assert texts["paced"] == texts["plain"] != ""
