"""Low-rank factorization: error falls with rank, whitening helps on real inputs, modules run."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimserve.compression.calib_data import calibration_override
from slimserve.compression.lowrank import LowRankLinear, choose_rank, factorize, low_rank_linear
from slimserve.compression.registry import apply_compression
from slimserve.compression.specs import CompressionSpec
from slimserve.models.llama_runner import LlamaRunner

SPECS = TypeAdapter(list[CompressionSpec])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def correlated_inputs(rows: int = 1024, features: int = 48) -> torch.Tensor:
    torch.manual_seed(0)
    scales = torch.logspace(1, -2, features)  # a few dominant directions, like LLM activations
    basis = torch.linalg.qr(torch.randn(features, features)).Q
    return (torch.randn(rows, features) * scales) @ basis


def output_error(weight, b, a, x) -> float:
    return float(((weight - b @ a) @ x.t()).pow(2).sum())


def test_error_decreases_with_rank_plain_and_activation_aware():
    torch.manual_seed(1)
    weight = torch.randn(40, 48)
    x = correlated_inputs()
    moment = x.t() @ x / x.shape[0]
    for second_moment in (None, moment):
        errors = []
        for rank in (2, 8, 16, 32, 40):
            b, a = factorize(weight, rank=rank, second_moment=second_moment)
            assert b.shape == (40, rank) and a.shape == (rank, 48)
            errors.append(output_error(weight, b, a, x))
        assert all(e1 > e2 for e1, e2 in itertools.pairwise(errors)), errors
        assert errors[-1] < 1e-3 * errors[0]  # full rank reconstructs


def test_activation_aware_beats_plain_svd_on_the_calibration_inputs():
    torch.manual_seed(2)
    weight = torch.randn(40, 48)
    x = correlated_inputs()
    moment = x.t() @ x / x.shape[0]
    for rank in (4, 12):
        plain = output_error(weight, *factorize(weight, rank=rank), x)
        aware = output_error(weight, *factorize(weight, rank=rank, second_moment=moment), x)
        assert aware < 0.5 * plain


def test_energy_picks_the_smallest_rank_reaching_it():
    singular = torch.tensor([3.0, 2.0, 1.0, 0.5])  # squares 9, 4, 1, 0.25 of 14.25
    assert choose_rank(singular, None, 0.6) == 1
    assert choose_rank(singular, None, 0.9) == 2
    assert choose_rank(singular, None, 1.0) == 4
    assert choose_rank(singular, 3, None) == 3


def test_low_rank_linear_round_trips_through_meta():
    linear = nn.Linear(48, 40, bias=True)
    b, a = factorize(linear.weight, rank=6)
    module = low_rank_linear(linear, b, a)
    shell = LowRankLinear.from_meta(module.meta())
    shell.load_state_dict(module.state_dict())
    x = torch.randn(3, 48)
    torch.testing.assert_close(shell(x), module(x))
    assert module.meta() == {
        "in_features": 48,
        "out_features": 40,
        "rank": 6,
        "has_bias": True,
        "dtype": "float32",
    }


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("aware", [True, False])
def test_low_rank_spec_replaces_the_mlp_and_the_model_runs(aware):
    model = tiny()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    specs = SPECS.validate_python([{"method": "low-rank", "rank": 16, "activation_aware": aware}])
    with calibration_override(ids):
        report = apply_compression(model, specs).methods[0]
    assert report.modules_replaced == 12 and report.detail["mean_rank"] == 16
    assert isinstance(model.model.layers[0].mlp.down_proj, LowRankLinear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # not targeted
    assert report.bytes_after < report.bytes_before
    with torch.inference_mode():
        hf = model(ids[:1, :10]).logits[0, -1].float()
        runner = LlamaRunner(model, max_slots=1, max_len=32)
        logits = runner.prefill(0, ids[0, :10].tolist(), 0, want_logits=True)
    torch.testing.assert_close(logits, hf, atol=1e-4, rtol=1e-4)


def test_a_rank_too_high_to_save_bytes_keeps_the_linear_dense():
    model = tiny()
    specs = SPECS.validate_python(
        [{"method": "low-rank", "energy": 1.0, "activation_aware": False}]
    )
    report = apply_compression(model, specs).methods[0]
    assert report.modules_replaced == 0 and len(report.detail["kept_dense"]) == 12
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
