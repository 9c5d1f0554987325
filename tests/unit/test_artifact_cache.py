"""Artifact cache: miss then hit with identical logits; corrupt or mismatched artifacts rebuilt."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import pytest
import torch
from pydantic import TypeAdapter

from slimserve.compression import artifact_cache
from slimserve.compression.artifact_cache import (
    artifact_identity,
    artifact_key,
    compression_key,
    load_or_compress,
)
from slimserve.compression.lowrank import LowRankLinear
from slimserve.compression.specs import CompressionSpec
from slimserve.kernels import Int8Embedding, Int8Linear, SparseLinear

SPECS = TypeAdapter(list[CompressionSpec])
CALIB = {"samples": 4, "seq_len": 64}
# Structured + low-rank + 2:4 + int8 at once: config changes, resized modules, shells whose
# children were replaced, and the tied int8 embedding / lm_head all go through the manifest.
MIXED = [
    {"method": "prune-heads", "keep_kv_heads": 1, "calibration": CALIB},
    {"method": "prune-ffn", "keep_fraction": 0.5, "multiple_of": 32, "calibration": CALIB},
    {"method": "low-rank", "rank": 8, "targets": ["*.down_proj"], "calibration": CALIB},
    {"method": "wanda", "sparsity": "2:4", "skip": ["*.mlp.*"], "calibration": CALIB},
    {"method": "int8-weight-only"},
]
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 77]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


def run(model_dir, cache_dir, specs=MIXED, dtype="bfloat16"):
    return load_or_compress(str(model_dir), SPECS.validate_python(specs), dtype, cache_dir)


def artifact_dirs(cache_dir):
    return [p for p in cache_dir.iterdir() if p.is_dir()]


def test_miss_then_hit_gives_the_same_model(tiny_model_dir, tmp_path):
    first, tokenizer, report, status = run(tiny_model_dir, tmp_path)
    assert status == "miss"
    second, _, cached_report, status = run(tiny_model_dir, tmp_path)
    assert status == "hit"
    assert torch.equal(logits(first), logits(second))
    assert cached_report == report
    assert second.config.num_key_value_heads == 1 and second.config.intermediate_size == 64
    layer = second.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, SparseLinear)
    assert isinstance(layer.mlp.down_proj, LowRankLinear)
    assert isinstance(layer.mlp.down_proj.down, Int8Linear)
    assert isinstance(layer.mlp.gate_proj, Int8Linear)
    assert isinstance(second.model.embed_tokens, Int8Embedding)
    assert second.model.embed_tokens.qweight.data_ptr() == second.lm_head.qweight.data_ptr()
    assert tokenizer("hello").input_ids
    manifest = json.loads((artifact_dirs(tmp_path)[0] / "manifest.json").read_text())
    assert manifest["config_changes"]["num_attention_heads"] == 2
    assert manifest["modules"]["model.layers.0.mlp.down_proj"]["meta"]["rank"] == 8
    assert ["lm_head.qweight", "model.embed_tokens.qweight"] in manifest["tied"]


def test_corrupt_weights_are_detected_deleted_and_rebuilt(tiny_model_dir, tmp_path, caplog):
    specs = [{"method": "int8-weight-only"}]
    reference, *_ = run(tiny_model_dir, tmp_path, specs)
    weights = artifact_dirs(tmp_path)[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="slimserve.compression.artifact_cache"):
        rebuilt, _, _, status = run(tiny_model_dir, tmp_path, specs)
    assert status == "rebuilt"
    assert "sha256" in caplog.text
    assert torch.equal(logits(rebuilt), logits(reference))
    assert run(tiny_model_dir, tmp_path, specs)[3] == "hit"


def test_unreadable_or_mismatched_manifest_is_rebuilt(tiny_model_dir, tmp_path, caplog):
    specs = [{"method": "magnitude", "sparsity": 0.5}]
    run(tiny_model_dir, tmp_path, specs)
    manifest_path = artifact_dirs(tmp_path)[0] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["versions"]["torch"] = "0.0.1"
    manifest_path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="slimserve.compression.artifact_cache"):
        assert run(tiny_model_dir, tmp_path, specs)[3] == "rebuilt"
    assert "versions differs" in caplog.text
    (artifact_dirs(tmp_path)[0] / "manifest.json").write_text("{not json")
    assert run(tiny_model_dir, tmp_path, specs)[3] == "rebuilt"
    (artifact_dirs(tmp_path)[0] / "model.safetensors").unlink()
    assert run(tiny_model_dir, tmp_path, specs)[3] == "rebuilt"
    assert run(tiny_model_dir, tmp_path, specs)[3] == "hit"


def test_key_changes_with_specs_dtype_model_and_versions(tiny_model_dir, tmp_path, monkeypatch):
    def key(specs, dtype="bfloat16", model_dir=tiny_model_dir):
        parsed = SPECS.validate_python(specs)
        return artifact_key(artifact_identity(str(model_dir), parsed, dtype, tmp_path))

    int8 = [{"method": "int8-weight-only"}]
    base = key(int8)
    assert key(int8) == base
    assert key([{"method": "int8-weight-only", "granularity": "per-tensor"}]) != base
    wanda = {"method": "wanda", "sparsity": 0.5}
    assert key([wanda]) != key([{**wanda, "sparsity": 0.4}])
    assert key(int8, dtype="float32") != base
    edited = tmp_path / "edited-model"
    shutil.copytree(tiny_model_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (edited / "config.json").write_text(json.dumps(config))
    assert key(int8, model_dir=edited) != base
    # An injected change, on purpose: an installed library cannot be upgraded inside a test, so
    # the version report pretends torch moved on. Nothing about the model is faked.
    versions = artifact_cache.library_versions()
    monkeypatch.setattr(artifact_cache, "library_versions", lambda: {**versions, "torch": "9"})
    assert key(int8) != base


def test_compression_key_names_the_artifact_and_follows_the_code(
    tiny_model_dir, tmp_path, monkeypatch
):
    specs = [{"method": "int8-weight-only"}]

    def key():
        return compression_key(
            str(tiny_model_dir), SPECS.validate_python(specs), "bfloat16", tmp_path
        )

    before = key()
    run(tiny_model_dir, tmp_path, specs)
    assert [p.name for p in artifact_dirs(tmp_path)] == [before[:32]]
    # An injected change, on purpose: the digest of slimserve's compression and kernel sources.
    monkeypatch.setattr(artifact_cache, "_code_digest", lambda: "edited")
    assert key() != before


def test_no_specs_loads_the_plain_model_and_writes_nothing(tiny_model_dir, tmp_path):
    _, _, report, status = run(tiny_model_dir, tmp_path, [])
    assert status == "miss" and report.methods == []
    assert not tmp_path.exists() or not artifact_dirs(tmp_path)


def test_racing_loaders_build_once(tiny_model_dir, tmp_path):
    specs = [{"method": "magnitude", "sparsity": "2:4", "pack": False}]
    statuses: list[str] = []
    results = []

    def load():
        model, _, _, status = run(tiny_model_dir, tmp_path, specs)
        statuses.append(status)
        results.append(logits(model))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == ["hit", "miss"]
    assert torch.equal(results[0], results[1])
    assert len(artifact_dirs(tmp_path)) == 1
    assert not list(tmp_path.glob(".tmp-*"))


def test_offline_compress_command_fills_the_cache(tiny_model_dir, tmp_path, capsys):
    import argparse

    from slimserve.serve.offline_cli import register_commands

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        f"model: {tiny_model_dir}\ncompression:\n  - {{method: magnitude, sparsity: 0.25}}\n"
    )
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command", required=True))
    cache = tmp_path / "cache"
    args = parser.parse_args(["compress", str(spec_file), "--output", str(cache)])
    assert args.func(args) == 0
    assert "cache miss" in capsys.readouterr().out
    specs = [{"method": "magnitude", "sparsity": 0.25}]
    assert run(tiny_model_dir, cache, specs)[3] == "hit"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_model_dir}\ncompression: [{{method: wanda, sparsity: 2}}]\n")
    with pytest.raises(ValueError, match=r"compression\.0\.wanda\.sparsity"):
        args = parser.parse_args(["compress", str(bad)])
        args.func(args)


@pytest.mark.slow
def test_real_model_int8_round_trip_compresses_once(tmp_path, monkeypatch):
    """SmolLM2-135M: the miss compresses, the hit loads the artifact without running a single
    compressor (counted, not timed: a verdict must not depend on this machine's speed), and
    both give the same logits."""
    from slimserve.compression import artifact_cache
    from slimserve.models.store import DEFAULT_MODEL_ALIAS

    compressions = []
    real_apply = artifact_cache.apply_compression

    def counted(*args, **kwargs):
        compressions.append(args[1])
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(artifact_cache, "apply_compression", counted)
    specs = [
        {"method": "prune-layers", "remove": 2, "calibration": {"samples": 4, "seq_len": 128}},
        {"method": "int8-weight-only"},
    ]
    outputs = []
    for expected, compressed_so_far in (("miss", 1), ("hit", 1)):
        model, _, report, status = run(DEFAULT_MODEL_ALIAS, tmp_path, specs)
        assert status == expected
        assert len(compressions) == compressed_so_far
        assert model.config.num_hidden_layers == 28
        outputs.append(logits(model))
    assert torch.equal(outputs[0], outputs[1])
    assert report.weight_bytes_after < report.weight_bytes_before / 1.9
    # The load itself is recorded (seconds in the report), without a bar on this machine.
    assert [m.method for m in report.methods] == ["prune-layers", "int8-weight-only"]
