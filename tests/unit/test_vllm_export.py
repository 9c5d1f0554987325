"""The compressed-tensors export: what vLLM reads (loading it in vLLM is an integration test)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimserve.compression.int8 import set_submodule
from slimserve.kernels import Int8Linear, LowBitLinear, W8A8Linear, cpu_isa, quantize_int8_absmax
from slimserve.kernels.cpu_isa import Isa
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
    # What W8A8Linear computes: per-channel symmetric int8 weights, dynamic per-token activations.
    weights, inputs = group["weights"], group["input_activations"]
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"]) == (8, "channel", True)
    assert (inputs["num_bits"], inputs["strategy"], inputs["symmetric"]) == (8, "token", True)
    assert inputs["dynamic"] is True and weights["dynamic"] is False
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
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_w4a16"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"]) == (4, "group", 32)
    assert weights["symmetric"] is False  # integer zero points travel with the weights
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
    if ok and cpu_isa.active() >= Isa.AVX512:
        parse_config(data)
    elif ok:  # below AVX-512 vLLM serves no compressed checkpoint: refused, saying why
        with pytest.raises(ConfigError, match=r"variants\.v: engine 'vllm' .* AVX-512 VNNI"):
            parse_config(data)
    else:
        with pytest.raises(ConfigError, match=r"variants\.v\.compression\.0"):
            parse_config(data)


def test_vllm_export_comes_from_the_artifact_cache_and_is_reused(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Compressor runs and exports are counted: a repeat build runs neither; a changed spec or
    compression code re-runs both; a changed exporter re-exports the cached artifact."""
    from slimserve.compression import artifact_cache
    from slimserve.serve.engine import factory, vllm_export

    monkeypatch.setenv("SLIMSERVE_CACHE", str(tmp_path))
    compressions, exports = [], []
    real_apply, real_export = artifact_cache.apply_compression, vllm_export.export_for_vllm
    identity = vllm_export.exporter_identity()

    def counted_apply(*args, **kwargs):
        compressions.append(args[1])
        return real_apply(*args, **kwargs)

    def counted_export(*args, **kwargs):
        exports.append(args[2])
        return real_export(*args, **kwargs)

    monkeypatch.setattr(artifact_cache, "apply_compression", counted_apply)
    monkeypatch.setattr(vllm_export, "export_for_vllm", counted_export)

    def build(group_size=64):
        spec = {"method": "rtn", "bits": 4, "group_size": group_size}
        # The export runs on any CPU; the config refuses compressed vLLM variants below
        # AVX-512, so the variant names the torch engine (the export reads only model, specs,
        # dtype).
        variant = {"engine": {"name": "torch", "dtype": "bfloat16"}, "compression": [spec]}
        cfg = parse_config({"model": str(tiny_model_dir), "variants": {"v": variant}})
        path, _, report, _, compress_s = factory._compressed_checkpoint(cfg, "v")
        config = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
        assert config["config_groups"]["group_w4a16"]["weights"]["group_size"] == group_size
        assert report.weight_bytes_after < report.weight_bytes_before
        return path, compress_s, (len(compressions), len(exports))

    first, compress_s, counts = build()
    assert counts == (1, 1) and compress_s > 0
    again, compress_s, counts = build()
    assert (again, compress_s, counts) == (first, 0.0, (1, 1))
    regrouped, _, counts = build(group_size=32)
    assert regrouped != first and counts == (2, 2)
    # Injected code changes: the hashes of source files that cannot be edited inside a test.
    monkeypatch.setattr(vllm_export, "exporter_identity", lambda: {**identity, "code": "edited"})
    re_exported, _, counts = build()
    assert re_exported not in (first, regrouped) and counts == (2, 3)  # artifact reused
    monkeypatch.setattr(artifact_cache, "_code_digest", lambda: "edited")
    recompressed, _, counts = build()
    assert recompressed not in (first, regrouped, re_exported) and counts == (3, 4)
    assert not list((tmp_path / "vllm-exports").glob(".tmp-*"))
