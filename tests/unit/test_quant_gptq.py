"""GPTQ: Hessian-aware error compensation beats round-to-nearest on the calibration inputs."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimserve.compression.calib_data import calibration_ids
from slimserve.compression.gptq import apply_gptq, gptq_quantize
from slimserve.compression.grid import quantize_groups
from slimserve.compression.lowbit import relative_output_error
from slimserve.compression.methods.gptq import GPTQSpec
from slimserve.compression.spec_base import CalibrationSpec
from slimserve.kernels import LowBitLinear

from .conftest import tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add wake-up cost (large on a shared, busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _correlated_inputs(tokens: int = 2048, width: int = 128) -> torch.Tensor:
    torch.manual_seed(0)
    latent = torch.randn(tokens, 16)  # inputs live near a 16-dim subspace, as activations do
    return latent @ torch.randn(16, width) + 0.05 * torch.randn(tokens, width)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn(bits, act_order):
    x = _correlated_inputs()
    hessian = x.t() @ x / x.shape[0]
    w = torch.randn(96, 128) * 0.05
    rtn = relative_output_error(w, quantize_groups(w, bits, 32).dequantize(), hessian)
    quant = gptq_quantize(w, hessian, bits, 32, act_order=act_order)
    gptq = relative_output_error(w, quant.dequantize(), hessian)
    assert gptq < 0.5 * rtn
    assert int(quant.codes.max()) < 2**bits


def test_gptq_tolerates_dead_inputs_and_small_blocks():
    x = _correlated_inputs(width=64)
    x[:, 5] = 0  # an input that is never active
    hessian = x.t() @ x / x.shape[0]
    w = torch.randn(32, 64)
    quant = gptq_quantize(w, hessian, 4, 16, block_size=8)  # block rounds up to whole groups
    assert torch.isfinite(quant.dequantize()).all()
    assert torch.isfinite(quant.scales).all()


def test_apply_gptq_on_a_tiny_llama():
    model = tiny_llama(vocab_size=256)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    report = apply_gptq(model, GPTQSpec(method="gptq", bits=4, group_size=32), calibration=ids)
    assert report.modules_replaced == 14
    assert all(isinstance(m, LowBitLinear) for m in model.model.layers[0].self_attn.children())
    assert report.bytes_after < report.bytes_before
    assert set(report.detail["relative_output_error"]) == {"qkv", "o", "gate_up", "down"}
    with torch.no_grad():
        out, ref = model(ids).logits, reference(ids).logits
    assert (out - ref).pow(2).mean() < 0.02 * ref.pow(2).mean()


def test_calibration_text_comes_from_the_model_directory(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = calibration_ids(model, CalibrationSpec(samples=3, seq_len=64))
    assert ids.shape == (3, 64) and ids.dtype == torch.long


@pytest.mark.parametrize(
    "options",
    [{"clip_grid": 20}, {"integer_zero": False}, {"act_order": True, "clip_grid": 10}],
)
def test_gptq_options_keep_beating_rtn(options):
    x = _correlated_inputs()
    hessian = x.t() @ x / x.shape[0]
    w = torch.randn(64, 128) * 0.05
    rtn = relative_output_error(w, quantize_groups(w, 3, 32).dequantize(), hessian)
    quant = gptq_quantize(w, hessian, 3, 32, **options)
    assert relative_output_error(w, quant.dequantize(), hessian) < 0.5 * rtn
