"""MFU: FLOP counts from the modules that run, token work, the sliding window, the device peak,
and MFU measured by the in-process gateway under real traffic."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from pydantic import TypeAdapter
from transformers import LlamaConfig, LlamaForCausalLM

from slimserve.compression.calib_data import calibration_override
from slimserve.compression.registry import apply_compression
from slimserve.compression.specs import CompressionSpec
from slimserve.kernels import cpu_isa
from slimserve.models.llama_runner import LlamaRunner
from slimserve.serve.observability.flops import (
    TokenWork,
    count_model_flops,
    count_runner_flops,
    decode_work,
    prefill_work,
    score_work,
)
from slimserve.serve.observability.measurements import measurement_key, recall, remember
from slimserve.serve.observability.mfu import RequestWork, WorkMeter, utilization
from slimserve.serve.observability.peak import device_peak, gpu_peak_from_table, measure_peak

from .online_helpers import CHAT, chat, online_config, online_gateway, scrape, value

SPECS = TypeAdapter(list[CompressionSpec])
VOCAB = 256


def tiny(dtype=torch.float32, hidden: int = 64, heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


# per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64
LAYER_WEIGHTS = 4096 + 2048 + 2048 + 4096 + 3 * 8192


def compressed(specs: list[dict]) -> LlamaForCausalLM:
    model = tiny()
    with calibration_override(torch.randint(0, VOCAB, (4, 32))):
        apply_compression(model, SPECS.validate_python(specs))
    return model


def test_dense_flops_follow_the_architecture():
    flops = count_model_flops(tiny())
    assert flops.body_flops_per_token == 2 * 2 * LAYER_WEIGHTS
    assert flops.head_flops_per_token == 2 * 64 * VOCAB  # tied: the head is still a matmul
    assert flops.attention_flops_per_context_token == 4 * 2 * 4 * 16
    assert flops.flops_per_token_at(100) == flops.matmul_flops_per_token + 100 * 512


def test_runner_count_matches_the_model_after_fusing():
    model = tiny(torch.bfloat16)
    before = count_model_flops(model)
    runner = LlamaRunner(model, max_slots=2, max_len=64, pack_dense=True)
    assert count_runner_flops(runner) == before  # fused q|k|v, gate|up: same math


@pytest.mark.parametrize(
    ("specs", "expected_ratio"),
    [
        ([{"method": "int8-weight-only"}], 1.0),  # quantized: same FLOPs
        ([{"method": "magnitude", "sparsity": 0.5}], 1.0),  # zeros still multiplied
        ([{"method": "magnitude", "sparsity": "2:4"}], 1.0),  # no sparse kernel on CPU
        ([{"method": "prune-ffn", "keep_fraction": 0.5, "multiple_of": 32}], None),
        ([{"method": "prune-layers", "remove": 1, "keep_first": 0, "keep_last": 0}], 0.5),
        ([{"method": "low-rank", "rank": 8, "activation_aware": False}], None),
    ],
)
def test_compression_counts_what_it_really_removed(specs, expected_ratio):
    dense = count_model_flops(tiny())
    flops = count_model_flops(compressed(specs))
    ratio = flops.body_flops_per_token / dense.body_flops_per_token
    method = specs[0]["method"]
    if expected_ratio is not None:
        assert ratio == pytest.approx(expected_ratio)
    elif method == "prune-ffn":  # 64 of 128 channels in gate, up and down
        expected = 2 * 2 * (LAYER_WEIGHTS - 3 * 64 * 64)
        assert flops.body_flops_per_token == expected
    else:  # low-rank: every factored Linear costs rank x (in + out)
        assert ratio < 1.0
    if method == "prune-layers":
        assert flops.layers == 1
        assert (
            flops.attention_flops_per_context_token == dense.attention_flops_per_context_token / 2
        )


def test_token_work_of_prefill_decode_and_scoring():
    assert prefill_work(4) == TokenWork(4, 1, 1 + 2 + 3 + 4)
    # generated tokens 1..3 after a 4-token prompt: token 1 from the prefill, then two decodes
    # over tokens at positions 4 and 5 (attending to 5 and 6 positions)
    assert decode_work(4, 1, 3) == TokenWork(2, 2, 5 + 6)
    assert score_work(3) == TokenWork(3, 3, 6)
    work = RequestWork()
    work.accepted(4)
    total = TokenWork()
    for count in (1, 2, 1):  # coalesced deltas add up to the same work
        total += work.tokens(count)
    expected = prefill_work(4)
    expected += decode_work(4, 1, 4)
    assert total == expected


def test_window_drops_old_work_and_mfu_above_one_is_reported_not_clamped(caplog):
    now = [1000.0]
    meter = WorkMeter(window_seconds=3, clock=lambda: now[0])
    flops = count_model_flops(tiny())
    meter.add("a", TokenWork(10, 10, 0), generated=10)
    now[0] = 1001.5
    window = meter.window("a")
    assert window.work.body_tokens == 10 and window.seconds == pytest.approx(1.5)
    used = utilization(flops, window, peak_flops_per_second=1e12, replicas=2)
    expected = 10 * flops.matmul_flops_per_token / 1.5
    assert used.achieved_flops_per_second == pytest.approx(expected)
    assert used.mfu == pytest.approx(expected / 2e12)
    # A peak too small for the work done is a bug: exported as is and logged, never hidden.
    assert utilization(flops, window, 1.0, 1).mfu == pytest.approx(expected)
    assert "MFU" in caplog.text and "above 1" in caplog.text
    now[0] = 1010.0
    assert meter.window("a").work.body_tokens == 0


def test_peak_from_the_gpu_table_the_config_and_a_cpu_measurement():
    assert gpu_peak_from_table("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_from_table("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_from_table("NVIDIA L40S") == 362e12
    assert gpu_peak_from_table("Some Future GPU") is None
    assert device_peak(torch.bfloat16, 5e12, 0.1).source == "config"
    measured = device_peak(torch.float32, None, 0.05)
    if not torch.cuda.is_available():
        assert measured.source == f"measured-cpu:float32:{cpu_isa.active().label}"
        assert 1e8 < measured.flops_per_second < 1e14


def _mfu(client, variant: str) -> float:
    return value(scrape(client), "slimserve_variant_mfu_ratio", variant=variant)


def _drive(client, streams: int, seconds: float) -> int:
    body = chat("tiny:full", max_tokens=24, temperature=0, ignore_eos=True)
    deadline = time.monotonic() + seconds

    def loop() -> int:
        done = 0
        while time.monotonic() < deadline:
            assert client.post(CHAT, json=body).status_code == 200
            done += 1
        return done

    with ThreadPoolExecutor(streams) as pool:
        return sum(pool.map(lambda _: loop(), range(streams)))


def test_gateway_mfu_is_the_achieved_flops_over_the_measured_peak(tiny_model_dir):
    """How MFU moves with load is a speed, measured by loadtests/serving_cpu.py (its MFU column);
    here, what it is: zero when idle, else the achieved FLOP/s over the peak measured in the
    variant's dtype, the two exported beside it."""
    config = online_config(tiny_model_dir, mfu={"window_seconds": 2})
    with online_gateway(config) as (client, core):
        time.sleep(2.1)  # an idle window
        assert _mfu(client, "full") == 0.0
        _drive(client, streams=4, seconds=2.2)
        families = scrape(client)
        mfu = value(families, "slimserve_variant_mfu_ratio", variant="full")
        peak = value(families, "slimserve_variant_peak_flops_per_second", variant="full")
        achieved = value(families, "slimserve_variant_achieved_flops_per_second", variant="full")
        report = client.get("/v1/variants").json()["variants"]["full"]
        stats = core.last_stats["full"]  # what that report's probe answered
    # The peak is measured in the dtype the variant serves in: one measured in emulated bf16
    # under an fp32 model (AVX2) made MFU ~40x, not a fraction.
    assert stats["peak"]["source"] == f"measured-cpu:{stats['dtype']}:{cpu_isa.active().label}"
    assert peak > 0 and achieved > 0
    assert mfu == pytest.approx(achieved / peak)  # one replica
    live = report["live"]
    assert live["mfu"] > 0 and live["generated_tokens_per_second"] > 0
    assert live["cost_per_1k_tokens"]["observed"] > 0
    assert report["self_bench"]["decode_tokens_per_second"]["4"] > 0


def test_a_stored_peak_is_raised_by_fresh_trials_never_lowered(tmp_path, monkeypatch):
    """A peak taken on a busy machine must not stay low for good (MFU above 1 ever after)."""
    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path))
    inputs = {"dtype": str(torch.float32), "seconds": 0.05, "device": "cpu", "threads": 1}
    key = measurement_key("matmul-peak", inputs)
    remember(key, 1.0)  # far below any CPU: as if every trial had been preempted
    measure_peak.cache_clear()
    raised = measure_peak(torch.float32, 0.05, "cpu", 1)
    assert raised > 1.0 and recall(key) == raised
    remember(key, 1e18)  # far above any CPU: fresh trials cannot beat it, so it stays
    measure_peak.cache_clear()
    assert measure_peak(torch.float32, 0.05, "cpu", 1) == 1e18
    measure_peak.cache_clear()
