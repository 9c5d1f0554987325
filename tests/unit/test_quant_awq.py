"""AWQ and scale folding: folded scales keep the float function; the searches beat RTN."""

import copy

import pytest
import torch

from slimserve.compression.arch import decoder_layers, input_groups
from slimserve.compression.awq import apply_awq, search_clip, search_scale
from slimserve.compression.grid import fake_quantize_groups
from slimserve.compression.lowbit import output_error
from slimserve.compression.methods.awq import AWQSpec
from slimserve.compression.smoothing import InputScaled, apply_input_scale
from slimserve.kernels import LowBitLinear

from .conftest import tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: threads only add wake-up cost (large on a shared, busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IDS = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_groups_of_a_llama_layer():
    model = tiny_llama(vocab_size=256)
    groups = {g.name: g for g in input_groups(model.model.layers[0], "model.layers.0", [])}
    assert list(groups) == ["qkv", "o", "gate_up", "down"]
    layer = model.model.layers[0]
    assert groups["qkv"].prev is layer.input_layernorm
    assert groups["o"].prev is layer.self_attn.v_proj and groups["o"].repeat == 2
    assert groups["gate_up"].prev is layer.post_attention_layernorm
    assert groups["down"].prev is layer.mlp.up_proj


@pytest.mark.parametrize("name", ["qkv", "o", "gate_up", "down"])
def test_folded_scale_leaves_the_float_function_unchanged(name):
    model = tiny_llama(vocab_size=256)
    before = _logits(model)
    torch.manual_seed(0)
    for index, layer in enumerate(decoder_layers(model)):
        for group in input_groups(layer, f"model.layers.{index}", []):
            if group.name == name:
                s = torch.rand(group.in_features) * 4 + 0.25
                if group.repeat > 1:  # one scale per v channel, shared by its query heads
                    s = s.reshape(-1, group.repeat, group.head_dim)[:, :1].expand(
                        -1, group.repeat, -1
                    )
                    s = s.reshape(-1)
                assert apply_input_scale(group, s)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def _salient_case():
    torch.manual_seed(0)
    x = torch.randn(4096, 128)
    x[:, :4] *= 30  # a few input channels carry large activations
    w = torch.randn(64, 128) * 0.05
    return w, x.abs().mean(0), x.t() @ x / x.shape[0]


def test_scale_search_beats_rtn_when_a_few_channels_are_salient():
    w, absmean, hessian = _salient_case()
    model = tiny_llama(vocab_size=256)
    group = input_groups(model.model.layers[0], "l0", [])[3]  # down: no GQA tying
    rtn = output_error(fake_quantize_groups(w, 3, 32) - w, hessian)
    s, alpha = search_scale(w, absmean, hessian, group, 3, 32, grid=20)
    awq = output_error(fake_quantize_groups(w * s, 3, 32) / s - w, hessian)
    assert alpha > 0 and awq < 0.8 * rtn


def test_clip_search_never_does_worse_than_no_clip():
    w, _, hessian = _salient_case()
    w[0, 0] = 2.0  # one weight that stretches its group's range
    clip = search_clip(w, hessian, 3, 32, grid=20, max_shrink=0.5)
    assert clip.shape == (64, 4) and bool((clip <= 1).all()) and bool((clip > 0.5).all())
    clipped = output_error(fake_quantize_groups(w, 3, 32, clip) - w, hessian)
    assert clipped <= output_error(fake_quantize_groups(w, 3, 32) - w, hessian)


@pytest.mark.parametrize("fold", [True, False])
def test_apply_awq_on_a_tiny_llama(fold):
    model = tiny_llama(vocab_size=256)
    reference = copy.deepcopy(model)
    spec = AWQSpec(method="awq", bits=4, group_size=32, fold=fold)
    report = apply_awq(model, spec, calibration=IDS)
    q_proj = model.model.layers[0].self_attn.q_proj
    if fold:
        assert isinstance(q_proj, LowBitLinear) and report.detail["groups_folded"] == 8
    else:
        assert isinstance(q_proj, InputScaled) and isinstance(q_proj.inner, LowBitLinear)
        assert report.detail["groups_kept_as_input_scale"] == 8
        rebuilt = InputScaled.from_meta(q_proj.meta())  # the artifact-cache protocol
        rebuilt.load_state_dict(q_proj.state_dict())
        x = torch.randn(3, 64)
        torch.testing.assert_close(rebuilt(x), q_proj(x))
    out, ref = _logits(model), _logits(reference)
    assert (out - ref).pow(2).mean() < 0.02 * ref.pow(2).mean()
