"""Engine "torch" in its own process: the same answers as in-process, slots freed when a caller
leaves, and clear failures when the child cannot load or dies (faults injected on purpose: a
truncated weights file, a SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest
import torch

from slimserve.serve.engine.engine_process import EngineProcess, EngineStartError
from slimserve.serve.engine.event_channel import EventInbox
from slimserve.serve.engine.factory import build_torch_engine
from slimserve.serve.engine.protocol import ScoringEngine
from slimserve.serve.engine.types import SamplingParams

from .online_helpers import online_config

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    return online_config(tiny_model_dir, variants={"full": {}}, routing={})


@pytest.fixture(scope="module")
def process_engine(config):
    engine = EngineProcess(config, "full", startup_timeout_s=300)
    yield engine
    engine.shutdown()


async def _run(engine, name, prompt, params=GREEDY):
    return [event async for event in engine.generate(name, prompt, params)]


def _text(events):
    return "".join(e.text for e in events if e.kind == "delta")


def test_the_engine_process_answers_like_the_in_process_engine(config, process_engine):
    local = build_torch_engine(config, "full").engine
    assert isinstance(process_engine, ScoringEngine) and isinstance(local, ScoringEngine)
    local.start()
    prompts = [[1, 5, 9, 200, 31], [7, 7, 7], [300, 2, 45, 8, 1, 90, 14]]
    try:

        async def both():
            remote = await asyncio.gather(
                *(_run(process_engine, f"p{i}", p) for i, p in enumerate(prompts))
            )
            here = await asyncio.gather(*(_run(local, f"l{i}", p) for i, p in enumerate(prompts)))
            window = list(range(3, 40))
            scores = (await process_engine.score(window), await local.score(window))
            targets = (
                await process_engine.target_logprobs(window),
                await local.target_logprobs(window),
            )
            return remote, here, scores, targets

        remote, here, scores, targets = asyncio.run(both())
    finally:
        local.shutdown()
    for theirs, ours in zip(remote, here, strict=True):
        assert theirs[0].kind == "accepted"
        assert theirs[-1].kind == "done" and theirs[-1].completion_tokens == 10
        assert _text(theirs) == _text(ours)
    assert scores[0].dtype == torch.float16  # over the pipe
    torch.testing.assert_close(scores[0].float(), scores[1], atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(targets[0], targets[1])
    stats = process_engine.stats()
    assert stats["engine_pid"] == process_engine.pid != os.getpid()
    # The kernels the child ran reach the replica's stats with the next periodic update.
    deadline = time.monotonic() + 10
    while not process_engine.stats()["kernels"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "dense" in process_engine.stats()["kernels"]


def test_a_caller_that_leaves_frees_its_slot(process_engine):
    before = process_engine.stats()["generated_tokens"]

    async def leave_early():
        params = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)
        async for event in process_engine.generate("leaver", [4, 5, 6], params):
            if event.kind == "delta":
                break

    asyncio.run(leave_early())
    time.sleep(1.5)  # the child reports its counters every 0.5 s once idle
    stats = process_engine.stats()
    assert stats["running"] == 0
    # Aborted after a few steps, not run to its 240 tokens.
    assert stats["generated_tokens"] - before < 120


def test_bad_requests_are_refused_by_the_child(process_engine):
    too_long = SamplingParams(temperature=0, max_tokens=10_000)
    events = asyncio.run(_run(process_engine, "long", [1, 2, 3], too_long))
    assert [e.kind for e in events] == ["error"]
    assert events[0].error.status == 400
    with pytest.raises(ValueError, match="can score"):
        asyncio.run(process_engine.score([]))


def test_a_child_that_cannot_load_reports_why(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # injected fault: a truncated checkpoint
    config = online_config(broken, variants={"full": {}}, routing={})
    with pytest.raises(EngineStartError, match="failed"):
        EngineProcess(config, "full", startup_timeout_s=300)


def test_a_killed_child_fails_requests_and_health(config):
    engine = EngineProcess(config, "full", startup_timeout_s=300)
    try:
        assert engine.is_alive()
        os.kill(engine.pid, signal.SIGKILL)  # injected fault
        deadline = time.monotonic() + 10
        while engine.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.is_alive()
        events = asyncio.run(_run(engine, "after", [1, 2, 3]))
        assert [e.kind for e in events] == ["error"]  # as a lost replica's: the gateway retries
        assert events[0].error.status == 503 and events[0].error.code == "variant_unavailable"
    finally:
        engine.shutdown()


# ---- events sent to the gateway's inbox by the engine process itself ---------------------------


async def _forward(engine, name, prompt, reply_to, params=GREEDY):
    return [event async for event in engine.forward(name, prompt, params, reply_to)]


async def _until_end(events: asyncio.Queue) -> list:
    received = []
    while not received or received[-1].kind not in ("done", "error"):
        received.append(await asyncio.wait_for(events.get(), 30))
    return received


def test_forwarded_events_reach_the_inbox_and_match_the_relayed_ones(process_engine):
    prompt = [1, 5, 9, 200, 31]

    async def scenario():
        inbox = EventInbox("node-a")
        try:
            reply_to, events = inbox.open()
            here = await _forward(process_engine, "direct", prompt, reply_to)
            return here, await _until_end(events), await _run(process_engine, "relay", prompt)
        finally:
            inbox.shutdown()

    here, direct, relayed = asyncio.run(scenario())
    assert [e.kind for e in here] == ["forwarded"]  # the replica only learns that it ended
    assert direct[0].kind == "accepted" and direct[-1].kind == "done"
    assert direct[-1].completion_tokens == 10
    assert _text(direct) == _text(relayed)


def test_a_refused_forwarded_request_says_why_in_the_inbox(process_engine):
    too_long = SamplingParams(temperature=0, max_tokens=10_000)

    async def scenario():
        inbox = EventInbox("node-a")
        try:
            reply_to, events = inbox.open()
            here = await _forward(process_engine, "long", [1, 2, 3], reply_to, too_long)
            return here, await _until_end(events)
        finally:
            inbox.shutdown()

    here, direct = asyncio.run(scenario())
    assert [e.kind for e in here] == ["forwarded"]
    assert [e.kind for e in direct] == ["error"] and direct[0].error.status == 400


def test_an_inbox_the_engine_cannot_reach_gets_nothing_and_the_replica_everything(
    process_engine,
):
    async def scenario():
        inbox = EventInbox("node-a")
        try:
            reply_to, events = inbox.open()
            elsewhere = reply_to.model_copy(update={"address": "\0slimserve-inbox-nobody"})
            return await _forward(process_engine, "relayed", [4, 5, 6], elsewhere), events
        finally:
            inbox.shutdown()

    here, events = asyncio.run(scenario())
    assert here[0].kind == "accepted" and here[-1].kind == "done"
    assert here[-1].completion_tokens == 10 and events.empty()


def test_a_gateway_gone_mid_stream_ends_the_request_and_frees_its_slot(process_engine):
    before = process_engine.stats()["generated_tokens"]
    params = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)

    async def scenario():
        inbox = EventInbox("node-a")
        reply_to, events = inbox.open()
        replica_side = asyncio.ensure_future(
            _forward(process_engine, "orphan", [4, 5, 6], reply_to, params)
        )
        while (await asyncio.wait_for(events.get(), 30)).kind != "delta":
            pass
        inbox.shutdown()  # injected fault: the gateway replica goes away
        return await asyncio.wait_for(replica_side, 30)

    here = asyncio.run(scenario())
    assert [e.kind for e in here] == ["error"]
    assert "gateway replica" in here[0].error.message
    time.sleep(1.5)  # the child reports its counters every 0.5 s once idle
    stats = process_engine.stats()
    assert stats["running"] == 0
    assert stats["generated_tokens"] - before < 120


def test_the_engine_forgets_the_inboxes_of_gateways_that_went_away(process_engine):
    """Each gateway replica that Ray restarts opens a new inbox: the engine process must not
    keep a dead connection for every one it ever sent to."""
    import psutil

    child = psutil.Process(process_engine.pid)

    async def one_gateway():
        inbox = EventInbox("node-a")
        try:
            reply_to, events = inbox.open()
            await _forward(process_engine, "g", [1, 5, 9, 200, 31], reply_to)
            await _until_end(events)
        finally:
            inbox.shutdown()

    asyncio.run(one_gateway())
    asyncio.run(one_gateway())
    settled = child.num_fds()
    for _ in range(4):
        asyncio.run(one_gateway())
    assert child.num_fds() <= settled
