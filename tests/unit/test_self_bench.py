"""The startup self-benchmark: perplexity through the engine's score() equals the model's own,
throughput is measured at each batch size, and the deferred (serving-loop) path fills it in."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimserve.compression.calibration import load_text, token_windows
from slimserve.serve.config import SelfBenchOptions
from slimserve.serve.engine.limits import EngineLimits
from slimserve.serve.engine.protocol import Engine, ScoringEngine
from slimserve.serve.engine.types import EngineEvent
from slimserve.serve.engine.vllm_engine import VllmEngine
from slimserve.serve.replica.scoring import score_reference
from slimserve.serve.replica.self_bench import decode_rate, run_self_bench
from slimserve.serve.replica.server import VariantServer

from .online_helpers import FAST_SELF_BENCH, online_config


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    config = online_config(tiny_model_dir, variants={"full": {}}, routing={})
    server = VariantServer("full", config.model_dump(mode="json"))
    yield server
    server.engine.shutdown()


def test_self_bench_runs_at_startup_and_reports_both_phases(server):
    result = server.bench.self_bench
    assert result is not None and not result.unavailable
    assert result.perplexity_tokens == FAST_SELF_BENCH["perplexity_windows"] * 63
    assert (
        set(result.prefill_tokens_per_second) == set(result.decode_tokens_per_second) == {"1", "4"}
    )
    assert all(rate > 0 for rate in result.decode_tokens_per_second.values())
    stats = asyncio.run(server.stats())
    assert stats["self_bench"]["perplexity"] == result.perplexity
    assert stats["peak"]["flops_per_second"] > 0 and stats["flops"]["layers"] == 2


def test_perplexity_through_score_matches_the_model_itself(server, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    windows = token_windows(tokenizer, load_text("pydoc", "evaluation"), 64, 2)
    with torch.inference_mode():
        losses = [model(w.unsqueeze(0), labels=w.unsqueeze(0)).loss.float() for w in windows]
    expected = math.exp(torch.stack(losses).mean().item())
    assert server.bench.self_bench.perplexity == pytest.approx(expected, rel=0.02)


def test_a_pending_self_bench_runs_on_the_serving_loop(server):
    # the path engine "vllm" takes: benchmarked on the loop that serves it, on the first stats
    saved = server.bench.self_bench
    server.bench.self_bench, server.bench.self_bench_pending = None, True
    try:
        stats = asyncio.run(server.stats())
        assert stats["self_bench"]["decode_tokens_per_second"]["1"] > 0
        assert not server.bench.self_bench_pending
    finally:
        server.bench.self_bench, server.bench.self_bench_pending = saved, False
        server._bench_task = None


class _OneDeltaEngine:
    """Fault injected on purpose: an engine that hands each request's tokens over as one delta
    (what a fast engine does to a caller that lags behind)."""

    async def generate(self, name, prompt, params):
        await asyncio.sleep(0.05)
        yield EngineEvent(kind="delta", text="x" * params.max_tokens, tokens=params.max_tokens)
        yield EngineEvent(kind="done", completion_tokens=params.max_tokens)


def test_decode_rate_of_coalesced_deltas_is_not_zero():
    rate = asyncio.run(decode_rate(_OneDeltaEngine(), [[1, 2, 3]] * 2, tokens=31))
    assert 2 * 32 / 0.2 < rate < 2 * 32 / 0.04  # whole requests of ~50 ms, in parallel


class _StreamOnlyEngine(_OneDeltaEngine):
    """An engine that generates but does not score, as engine "vllm"."""

    serves_any_loop = True

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def is_alive(self) -> bool:
        return True

    def stats(self) -> dict:
        return {}


def test_every_engine_declares_whether_it_scores(server):
    assert isinstance(server.engine, ScoringEngine)
    vllm = VllmEngine("unused", "bfloat16", EngineLimits(1, 16, 1, 16))  # never started
    assert isinstance(vllm, Engine) and not isinstance(vllm, ScoringEngine)


def test_an_engine_that_does_not_score_is_benchmarked_for_speed_only(server):
    engine = _StreamOnlyEngine()
    assert isinstance(engine, Engine) and not isinstance(engine, ScoringEngine)
    options = SelfBenchOptions(**{**FAST_SELF_BENCH, "batch_sizes": [1]})
    result = asyncio.run(run_self_bench(engine, server.tokenizer, options, 128, 4))
    assert result.perplexity is None and result.perplexity_tokens == 0
    assert result.unavailable == ["perplexity: this engine does not score"]
    assert result.decode_tokens_per_second["1"] > 0
    with pytest.raises(NotImplementedError, match="does not score"):
        asyncio.run(score_reference(engine, [1, 2, 3], [4, 5], limit=16))
