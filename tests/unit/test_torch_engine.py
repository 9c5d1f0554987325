import asyncio

import pytest
import torch

from slimserve.serve.engine.limits import EngineLimits
from slimserve.serve.engine.protocol import ScoringEngine
from slimserve.serve.engine.torch_engine import TorchEngine
from slimserve.serve.engine.types import SamplingParams

from .conftest import tiny_llama


@pytest.fixture
def engine(tokenizer):
    engine = TorchEngine(
        tiny_llama(seed=0),
        tokenizer,
        EngineLimits(
            max_num_seqs=4, max_model_len=96, max_queued_requests=8, prefill_chunk_tokens=16
        ),
    )
    engine.start()
    yield engine
    engine.shutdown()


async def _collect(engine, name, prompt_ids, params):
    events = [e async for e in engine.generate(name, prompt_ids, params)]
    return events


def _prompt(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_concurrent_requests_share_batches_and_match_hf_generate(engine, tokenizer):
    texts = ["Once upon a time", "The capital of France is a city that", "def main():", "Hi"]
    prompts = [_prompt(tokenizer, t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def run_all():
        return await asyncio.gather(
            *(_collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts))
        )

    results = asyncio.run(run_all())
    model = tiny_llama(seed=0)  # the same weights; the engine's copy belongs to its runner
    for prompt, events in zip(prompts, results, strict=True):
        assert events[0].kind == "accepted"
        assert events[0].prompt_tokens == len(prompt)
        done = events[-1]
        assert done.kind == "done" and done.finish_reason == "length"
        assert done.completion_tokens == 12
        text = "".join(e.text for e in events if e.kind == "delta")
        with torch.inference_mode():
            expected = model.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12
            )[0, len(prompt) :]
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert engine.stats()["peak_batch"] > 1  # they really decoded together
    assert isinstance(engine, ScoringEngine)


def test_waiting_requests_join_together_within_the_prefill_budget(tokenizer):
    """Four requests queued before the engine starts: prompts of 5 + 7 + 9 + 3 tokens against a
    budget of 16 per step. The first step prefills two whole and the third in part, the second
    finishes it and the fourth, then all four decode together; answers match HF generate."""
    engine = TorchEngine(
        tiny_llama(seed=0),
        tokenizer,
        EngineLimits(
            max_num_seqs=4, max_model_len=96, max_queued_requests=8, prefill_chunk_tokens=16
        ),
    )
    text = " one two three four five six seven eight nine ten"
    prompts = [_prompt(tokenizer, text)[:n] for n in (5, 7, 9, 3)]
    assert [len(p) for p in prompts] == [5, 7, 9, 3]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run_all():
        async def start_later():
            await asyncio.sleep(0.1)  # every request is queued by then
            engine.start()

        *results, _ = await asyncio.gather(
            *(_collect(engine, f"r{i}", p, params) for i, p in enumerate(prompts)), start_later()
        )
        return results

    try:
        results = asyncio.run(run_all())
        stats = engine.stats()
    finally:
        engine.shutdown()
    # 2 prefill steps (the first two requests decode in the second), then 5 decode steps
    assert stats["steps"] == 7
    assert stats["prompt_tokens"] == 24 and stats["peak_batch"] == 4
    model = tiny_llama(seed=0)
    for prompt, events in zip(prompts, results, strict=True):
        assert events[-1].completion_tokens == 6
        with torch.inference_mode():
            expected = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6
            )[0, len(prompt) :]
        text = "".join(e.text for e in events if e.kind == "delta")
        assert text == tokenizer.decode(expected, skip_special_tokens=True)


def test_long_prompt_is_prefilled_in_chunks(engine, tokenizer):
    prompt = _prompt(tokenizer, "word " * 60)
    assert len(prompt) > 16 * 2
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    events = asyncio.run(_collect(engine, "long", prompt, params))
    assert events[-1].kind == "done"
    assert engine.stats()["steps"] >= len(prompt) // 16


def test_stop_string_and_context_limit(engine, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=200)
    events = asyncio.run(_collect(engine, "big", _prompt(tokenizer, "hello"), params))
    assert events[0].kind == "error"
    assert events[0].error.status == 400 and events[0].error.code == "context_length_exceeded"

    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full_text = "".join(
        e.text for e in asyncio.run(_collect(engine, "a", _prompt(tokenizer, "x y"), free))
    )
    stop = full_text[5:8]
    assert stop.strip(), "the random model must produce some text to cut"
    stopped = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    events = asyncio.run(_collect(engine, "b", _prompt(tokenizer, "x y"), stopped))
    assert events[-1].finish_reason == "stop"
    text = "".join(e.text for e in events)
    assert stop not in text and full_text.startswith(text)


def test_abandoned_request_frees_its_slot(engine, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)

    async def leave_early():
        stream = engine.generate("gone", _prompt(tokenizer, "abc"), params)
        async for event in stream:
            if event.kind == "delta":
                break
        await stream.aclose()
        for _ in range(100):
            if engine.stats()["running"] == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(leave_early())


def test_full_queue_is_refused_with_503(tokenizer):
    engine = TorchEngine(
        tiny_llama(),
        tokenizer,
        EngineLimits(
            max_num_seqs=1, max_model_len=64, max_queued_requests=0, prefill_chunk_tokens=16
        ),
    )  # not started: nothing leaves the queue
    params = SamplingParams(temperature=0, max_tokens=2)
    events = asyncio.run(_collect(engine, "r", [5, 6, 7], params))
    assert events[0].kind == "error" and events[0].error.status == 503


def _engine_with_prefix_slots(tokenizer, slots: int, tokens: int = 256) -> TorchEngine:
    return TorchEngine(
        tiny_llama(seed=0),
        tokenizer,
        EngineLimits(
            max_num_seqs=2,
            max_model_len=96,
            max_queued_requests=8,
            prefill_chunk_tokens=16,
            prefix_cache_slots=slots,
            prefix_cache_tokens=tokens,
        ),
    )


def test_a_shared_prompt_prefix_is_copied_not_recomputed_and_answers_stay_the_same(tokenizer):
    shared = _prompt(tokenizer, "You are a careful assistant. Answer briefly and politely.")
    prompts = [shared + _prompt(tokenizer, tail) for tail in (" Hi!", " What is 2+2?", " Bye.")]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    answers = {}
    # (slots, positions kept per prompt): none, whole prompts, only their first 9 positions
    for slots, tokens in ((0, 256), (2, 256), (2, 9)):
        engine = _engine_with_prefix_slots(tokenizer, slots, tokens)
        engine.start()
        try:
            texts = []
            for i, prompt in enumerate(prompts):  # one at a time: each can reuse the last
                events = asyncio.run(_collect(engine, f"p{i}", prompt, params))
                texts.append("".join(e.text for e in events if e.kind == "delta"))
            answers[slots, tokens] = (texts, engine.stats())
        finally:
            engine.shutdown()
    none, whole, short = answers[0, 256], answers[2, 256], answers[2, 9]
    assert whole[0] == none[0] and short[0] == none[0]
    assert none[1]["prefix_cached_tokens"] == 0
    # The second and third prompts found the shared part (at least) in the cache ...
    assert whole[1]["prefix_cached_tokens"] >= 2 * len(shared)
    assert short[1]["prefix_cached_tokens"] == 2 * 9  # ... or its first 9 positions
    # ... and ran only the rest through the model.
    for _, stats in (whole, short):
        assert stats["prompt_tokens"] == sum(map(len, prompts)) - stats["prefix_cached_tokens"]
