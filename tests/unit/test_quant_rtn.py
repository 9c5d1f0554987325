"""Group grids and round-to-nearest low-bit quantization through the real LowBitLinear."""

import copy

import pytest
import torch

from slimserve.compression.grid import dequantize, quantize_groups
from slimserve.compression.lowbit import lowbit_linear
from slimserve.compression.methods.rtn import RTNSpec
from slimserve.compression.report import resident_weight_bytes
from slimserve.kernels import LowBitLinear

from .conftest import tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add wake-up cost (large on a shared, busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("bits", [4, 3])
def test_group_rtn_error_is_within_half_a_step(bits):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.linspace(0.01, 2.0, 128)  # very different column scales
    quant = quantize_groups(w, bits, 32)
    assert quant.codes.dtype == torch.uint8 and int(quant.codes.max()) < 2**bits
    assert torch.equal(quant.zeros, quant.zeros.round())  # integer zero points
    step = quant.scales.repeat_interleave(32, dim=1)
    assert ((quant.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_smaller_groups_and_more_bits_are_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(64, 256)

    def err(bits, group):
        return (quantize_groups(w, bits, group).dequantize() - w).pow(2).mean()

    assert err(4, 32) < err(4, 128) < err(3, 128)


def test_lowbit_linear_computes_with_the_dequantized_weight():
    torch.manual_seed(0)
    w, bias, x = torch.randn(40, 64), torch.randn(40), torch.randn(5, 64)
    quant = quantize_groups(w, 4, 32)
    module = lowbit_linear(quant, bias, torch.float32)
    assert isinstance(module, LowBitLinear)
    weight = dequantize(quant.codes, quant.scales, quant.zeros, 32).double()
    expected = x.double() @ weight.t() + bias.double()
    # Where the native 4-bit GEMV serves (AVX2), activations meet the codes as int16 codes:
    # at most half a step (row absmax / 32767) per input, times the weights it meets.
    step = x.double().abs().amax(dim=1, keepdim=True) / 32767
    bound = step / 2 * weight.abs().sum(dim=1) + 1e-5 * (x.double().abs() @ weight.abs().t())
    assert ((module(x).double() - expected).abs() <= bound + 1e-5).all()


def test_apply_rtn_replaces_linears_and_shrinks_the_model():
    model = tiny_llama(vocab_size=256)
    reference = copy.deepcopy(model)
    report = RTNSpec(method="rtn", bits=4, group_size=32, skip=["*.0.mlp.*"]).apply(model)
    layers = model.model.layers
    assert isinstance(layers[1].mlp.down_proj, LowBitLinear)
    assert isinstance(layers[0].mlp.down_proj, torch.nn.Linear)  # skipped
    assert report.modules_replaced == 2 * 7 - 3
    assert report.bytes_after < report.bytes_before == resident_weight_bytes(reference)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        out, ref = model(ids).logits, reference(ids).logits
    assert (out - ref).pow(2).mean() < 0.05 * ref.pow(2).mean()


def test_float_zero_point_starts_the_grid_at_the_group_minimum():
    torch.manual_seed(0)
    w = torch.randn(64, 128) + 0.3
    exact_min = quantize_groups(w, 4, 32, integer_zero=False)
    rounded = quantize_groups(w, 4, 32)
    grouped = exact_min.dequantize().reshape(64, 4, 32)
    torch.testing.assert_close(grouped.amin(-1), w.reshape(64, 4, 32).amin(-1))
    exact_err, rounded_err = ((q.dequantize() - w).pow(2).mean() for q in (exact_min, rounded))
    assert exact_err < rounded_err


def test_a_weight_already_on_a_4bit_grid_is_recovered_with_float_zeros():
    # What a de-quantized GGUF Q4_1 checkpoint looks like: (code * step + min) per 32 weights.
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (32, 96)).float()
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every block spans its full range
    step, low = torch.rand(32, 3, 1) * 0.1 + 0.01, torch.randn(32, 3, 1) * 0.1
    w = (codes.reshape(32, 3, 32) * step + low).reshape(32, 96)
    recovered = quantize_groups(w, 4, 32, integer_zero=False).dequantize()
    torch.testing.assert_close(recovered, w, rtol=0, atol=1e-5)
    assert (quantize_groups(w, 4, 32).dequantize() - w).abs().max() > 1e-3


def test_apply_refuses_a_group_size_that_does_not_divide_before_any_work():
    model = tiny_llama(vocab_size=256)  # in-features 64 and 128
    with pytest.raises(ValueError, match="group_size 256 does not divide"):
        RTNSpec(method="rtn", group_size=256).apply(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
