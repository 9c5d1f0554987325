"""The compressed-tensors export: what vLLM reads (loading it in vLLM is an integration test)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimserve.compression.int8 import set_submodule
from slimserve.kernels import Int8Linear, LowBitLinear, W8A8Linear, quantize_int8_absmax
from slimserve.serve.config import ConfigError, parse_config
from slimserve.serve.engine.vllm_export import ExportError, export_for_vllm

from .conftest import tiny_llama


def _swap(model, make):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            set_submodule(model, name, make(module))
    return model


def _w8a8(linear):
    q, scale = quantize_int8_absmax(linear.weight)
    return W8A8Linear.from_quantized(q, scale, linear.bias, torch.float32)


def _rtn4(linear, group=32):
    w = linear.weight.float()
    n, k = w.shape
    grouped = w.view(n, k // group, group)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    zero = torch.round(-low / scale).clamp(0, 15)
    codes = torch.clamp(torch.round(grouped / scale[..., None]) + zero[..., None], 0, 15)
    codes = codes.view(n, k).to(torch.uint8)
    return LowBitLinear.from_codes(codes, scale, zero, group, 4, linear.bias, torch.float32)


def test_w8a8_export_writes_int8_weights_and_the_scheme(tmp_path, tokenizer):
    model = _swap(tiny_llama(vocab_size=512), _w8a8)
    out = export_for_vllm(model, tokenizer, tmp_path / "w8a8")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    group = config["config_groups"]["group_w8a8"]
    assert group["input_activations"]["dynamic"] and group["weights"]["strategy"] == "channel"
    assert len(group["targets"]) == 2 * 7  # every projection of both layers
    tensors = load_file(out / "model.safetensors")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], q_proj.qweight)
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    assert "lm_head.weight" not in tensors  # tied to the embedding, written once
    assert (out / "tokenizer.json").is_file()


def test_w4a16_export_round_trips_through_compressed_tensors_unpacking(tmp_path, tokenizer):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    model = _swap(tiny_llama(vocab_size=512), _rtn4)
    out = export_for_vllm(model, tokenizer, tmp_path / "w4")
    tensors = load_file(out / "model.safetensors")
    module = model.model.layers[1].mlp.down_proj
    prefix = "model.layers.1.mlp.down_proj"
    shape = tuple(tensors[f"{prefix}.weight_shape"].tolist())
    signed = unpack_from_int32(tensors[f"{prefix}.weight_packed"], 4, torch.Size(shape))
    groups = tensors[f"{prefix}.weight_scale"].shape[1]
    zero_points = unpack_from_int32(
        tensors[f"{prefix}.weight_zero_point"], 4, torch.Size((shape[0], groups)), packed_dim=0
    )
    scales = tensors[f"{prefix}.weight_scale"].float()
    rebuilt = (signed.float() - zero_points.float().repeat_interleave(32, dim=1)) * (
        scales.repeat_interleave(32, dim=1)
    )
    eye = torch.eye(shape[1])
    expected = module(eye).t().float()  # the module's own dequantized weight
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)


def test_modules_vllm_cannot_run_are_refused_by_name(tmp_path, tokenizer):
    model = _swap(tiny_llama(vocab_size=512), Int8Linear.from_linear)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj: Int8Linear"):
        export_for_vllm(model, tokenizer, tmp_path / "int8")
    with pytest.raises(ExportError, match="no W8A8 or 4-bit"):
        export_for_vllm(tiny_llama(vocab_size=512), tokenizer, tmp_path / "plain")


@pytest.mark.parametrize(
    ("spec", "ok"),
    [
        ({"method": "rtn", "bits": 4, "group_size": 64}, True),
        ({"method": "gptq", "bits": 4, "group_size": 64}, True),
        ({"method": "smoothquant-w8a8", "include_embeddings": False}, True),
        ({"method": "smoothquant-w8a8"}, False),
        ({"method": "rtn", "bits": 3, "group_size": 64}, False),
        ({"method": "rtn", "bits": 4, "group_size": 64, "zero_point": "float"}, False),
        ({"method": "int8-weight-only"}, False),
    ],
)
def test_config_accepts_only_what_vllm_can_run(spec, ok):
    data = {"model": "m", "variants": {"v": {"engine": {"name": "vllm"}, "compression": [spec]}}}
    if ok:
        parse_config(data)
    else:
        with pytest.raises(ConfigError, match=r"variants\.v\.compression\.0"):
            parse_config(data)
