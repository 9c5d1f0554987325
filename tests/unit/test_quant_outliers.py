"""LLM.int8() and GOBO: what is kept apart in 16-bit stays exact; the rest is int8 / low-bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimserve.compression.composite import inner_from_meta, inner_meta
from slimserve.compression.gobo import OutlierSparseLinear, apply_gobo, gobo_linear, outlier_mask
from slimserve.compression.grid import quantize_groups
from slimserve.compression.llm_int8 import MixedInt8Linear, apply_llm_int8
from slimserve.compression.methods.gobo import GoboSpec
from slimserve.compression.methods.llm_int8 import LLMInt8Spec
from slimserve.kernels import Int8Linear, LowBitLinear, W8A8Linear
from slimserve.models.llama_runner import LlamaRunner

from .conftest import tiny_llama

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add wake-up cost (large on a shared, busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rebuilt(module: nn.Module) -> nn.Module:
    """Through the artifact-cache protocol: meta -> empty module -> load_state_dict."""
    fresh = inner_from_meta(inner_meta(module))
    fresh.load_state_dict(module.state_dict())
    return fresh


@pytest.mark.parametrize("activations", ["int8", "16bit"])
def test_llm_int8_outlier_columns_are_exact(activations):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    outliers = torch.zeros(64, dtype=torch.bool)
    outliers[[3, 17, 40]] = True
    module = MixedInt8Linear.from_linear(linear, outliers, activations)
    inner_type = W8A8Linear if activations == "int8" else Int8Linear
    assert isinstance(module.inner, inner_type)
    x = torch.zeros(5, 64)
    x[:, outliers] = torch.randn(5, 3) * 100  # only outlier features active
    expected = F.linear(x, linear.weight.detach())
    torch.testing.assert_close(module(x), expected, rtol=1e-6, atol=1e-6)
    y = torch.randn(5, 64)
    torch.testing.assert_close(_rebuilt(module)(y), module(y))


def test_llm_int8_decomposition_beats_plain_w8a8_on_outlier_features():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    x[:, [2, 9]] *= 60.0  # two systematic outlier features
    expected = linear(x).detach()
    mixed = MixedInt8Linear.from_linear(linear, x.abs().amax(0) >= 6.0)
    plain = MixedInt8Linear.from_linear(linear, torch.zeros(64, dtype=torch.bool))
    assert mixed.outlier_index.tolist() == [2, 9]
    assert (mixed(x) - expected).pow(2).mean() < 0.1 * (plain(x) - expected).pow(2).mean()


def test_apply_llm_int8_finds_outliers_on_calibration_data():
    model = tiny_llama(vocab_size=256)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[:2] = 50.0  # gate/up inputs get outliers
    reference = copy.deepcopy(model)
    report = apply_llm_int8(model, LLMInt8Spec(method="llm-int8", threshold=6.0), calibration=IDS)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate_proj, MixedInt8Linear) and mlp.gate_proj.outlier_index.numel() >= 2
    assert report.detail["outlier_features_per_group"]["gate_up"] >= 4
    assert report.modules_replaced == 14
    with torch.no_grad():
        out, ref = model(IDS).logits, reference(IDS).logits
    assert (out - ref).pow(2).mean() < 1e-3 * ref.pow(2).mean()


def test_serving_packs_the_w8a8_inside_llm_int8_modules():
    probe = W8A8Linear.from_quantized(
        torch.ones(16, 64, dtype=torch.int8), torch.ones(16), None, torch.float32
    )
    if probe.pack_for_cpu() == 0:
        pytest.skip("neither oneDNN int8 nor the native int8 GEMM packs on this CPU")
    model = tiny_llama(vocab_size=256)
    with torch.no_grad():
        for layer in model.model.layers:  # outliers into q/k/v and gate/up
            layer.input_layernorm.weight[:2] = 50.0
            layer.post_attention_layernorm.weight[:2] = 50.0
    apply_llm_int8(model, LLMInt8Spec(method="llm-int8", threshold=6.0), calibration=IDS)
    inner = [m.inner for m in model.modules() if isinstance(m, MixedInt8Linear)]
    assert inner and all(isinstance(m, W8A8Linear) for m in inner)
    runner = LlamaRunner(model, max_slots=1, max_len=32, pack_dense=True)
    # Nested under MixedInt8Linear, each W8A8 still got its CPU copy (q/k/v and gate/up too,
    # which the runner cannot fuse).
    assert all(m.cpu_pack is not None or m.cpu_native_pack is not None for m in inner)
    assert runner.packed_weight_bytes >= sum(m.out_features * m.in_features for m in inner)


def _heavy_tailed(rows: int = 64, cols: int = 128) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.02
    picks = torch.randperm(rows * cols)[:40]
    w.view(-1)[picks] = torch.randn(40).sign() * 0.5  # a sparse tail, 25 sigma out
    return w


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_gobo_outlier_weights_are_exact_and_help(bits):
    w = _heavy_tailed()
    linear = nn.Linear(128, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(w)
    module, count = gobo_linear(linear, GoboSpec(method="gobo", bits=bits, group_size=32))
    assert isinstance(module, OutlierSparseLinear) and count == 40
    assert isinstance(module.inner, Int8Linear if bits == 8 else LowBitLinear)
    # The effective weight, read back one input feature at a time.
    effective = (module(torch.eye(128)) - linear.bias.detach()).t()
    mask = outlier_mask(w, 3.0)
    torch.testing.assert_close(effective[mask], w[mask], rtol=0, atol=1e-6)
    if bits < 8:  # same grid without GOBO: the tail stretches every group it lands in
        plain = quantize_groups(w, bits, 32).dequantize()
        assert (effective - w).pow(2).mean() < 0.5 * (plain - w).pow(2).mean()
    x = torch.randn(3, 128)
    torch.testing.assert_close(_rebuilt(module)(x), module(x))


def test_apply_gobo_counts_outliers_and_shrinks_the_model():
    model = tiny_llama(vocab_size=256)
    reference = copy.deepcopy(model)
    report = apply_gobo(model, GoboSpec(method="gobo", bits=4, group_size=32, sigma=3.0))
    assert report.modules_replaced == 14
    assert 0 < report.detail["outlier_fraction"] < 0.01  # ~0.27% beyond 3 sigma for a Gaussian
    assert report.bytes_after < report.bytes_before
    with torch.no_grad():
        out, ref = model(IDS).logits, reference(IDS).logits
    assert (out - ref).pow(2).mean() < 0.05 * ref.pow(2).mean()
