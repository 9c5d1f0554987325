"""SmoothQuant W8A8: smoothing moves activation outliers into the weights and pays off."""

import copy

import pytest
import torch

from slimserve.compression.arch import decoder_layers, input_groups
from slimserve.compression.methods.smoothquant_w8a8 import SmoothQuantSpec
from slimserve.compression.smoothing import apply_input_scale
from slimserve.compression.smoothquant import (
    apply_smoothquant,
    search_alpha,
    smoothing_scale,
    w8a8_error,
)
from slimserve.kernels import Int8Embedding, W8A8Linear

from .conftest import tiny_llama

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add wake-up cost (large on a shared, busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _outlier_model():
    """A tiny Llama whose norms emit a few huge channels, as real LLMs' do."""
    model = tiny_llama(vocab_size=256)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 40.0
            layer.post_attention_layernorm.weight[5:7] = 40.0
    return model


def test_smoothquant_scales_fold_without_changing_the_float_model():
    model = _outlier_model()
    before = _logits(model)
    typical_max = {"qkv": 40.0, "o": 1.0, "gate_up": 40.0, "down": 1.0}
    for index, layer in enumerate(decoder_layers(model)):
        for group in input_groups(layer, f"model.layers.{index}", []):
            absmax = torch.rand(group.in_features) * typical_max[group.name] + 0.1
            weights = [linear.weight for _, linear in group.linears]
            apply_input_scale(group, smoothing_scale(absmax, weights, 0.5, group))
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def test_smoothing_lowers_the_w8a8_error_on_activation_outliers():
    errors = {}
    for label, smooth in (("smoothed", ["qkv", "o", "gate_up", "down"]), ("plain", [])):
        model = _outlier_model()
        reference = copy.deepcopy(model)
        spec = SmoothQuantSpec(
            method="smoothquant-w8a8", alpha=0.5, smooth=smooth, include_embeddings=False
        )
        report = apply_smoothquant(model, spec, calibration=IDS)
        assert isinstance(model.model.layers[1].mlp.down_proj, W8A8Linear)
        assert report.detail["smoothed_groups"] == (8 if smooth else 0)
        ref = _logits(reference)
        errors[label] = float((_logits(model) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errors["smoothed"] < 0.5 * errors["plain"]


def test_smoothquant_with_embeddings_halves_the_bytes():
    model = tiny_llama(vocab_size=256)
    report = apply_smoothquant(model, SmoothQuantSpec(method="smoothquant-w8a8"), calibration=IDS)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert report.bytes_after < 0.3 * report.bytes_before  # fp32 -> int8
    assert report.modules_replaced == 14 + 2


def test_auto_alpha_picks_per_group_and_beats_no_smoothing():
    model = _outlier_model()
    reference = copy.deepcopy(model)
    spec = SmoothQuantSpec(method="smoothquant-w8a8", alpha="auto", include_embeddings=False)
    report = apply_smoothquant(model, spec, calibration=IDS)
    alphas = report.detail["mean_alpha"]
    assert set(alphas) == {"qkv", "o", "gate_up", "down"}
    assert alphas["qkv"] > 0 and alphas["gate_up"] > 0  # the outlier channels get smoothed
    ref = _logits(reference)
    error = float((_logits(model) - ref).pow(2).mean() / ref.pow(2).mean())
    assert error < 1e-3


def test_search_alpha_never_loses_to_a_grid_point():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, :2] *= 50
    weights = [torch.randn(32, 64) * 0.1, torch.randn(16, 64) * 0.1]
    model = tiny_llama(vocab_size=256)
    group = input_groups(model.model.layers[0], "l0", [])[2]  # gate_up: no GQA tying
    alpha, s = search_alpha(x, x.abs().amax(0), weights, group)
    stacked = torch.cat(weights)
    reference = x @ stacked.t()
    best = w8a8_error(x, stacked, s, reference)
    for other in (0.0, 0.5, 1.0):
        s_other = smoothing_scale(x.abs().amax(0), weights, other, group)
        assert best <= w8a8_error(x, stacked, s_other, reference)
    assert alpha > 0
