"""Quantized models go through the artifact cache: a hit rebuilds the very same modules."""

import pytest
import torch
from pydantic import TypeAdapter

from slimserve.compression.artifact_cache import load_or_compress
from slimserve.compression.gobo import OutlierSparseLinear
from slimserve.compression.llm_int8 import MixedInt8Linear
from slimserve.compression.smoothing import InputScaled
from slimserve.compression.specs import CompressionSpec

SPECS = TypeAdapter(list[CompressionSpec])
CALIB = {"samples": 4, "seq_len": 64}
# One method per part of each layer, so every wrapper module type is in one artifact.
MIXED = [
    {
        "method": "awq",
        "group_size": 32,
        "fold": False,
        "skip": ["*.mlp.*"],
        "calibration": CALIB,
    },
    {"method": "llm-int8", "threshold": 2.0, "skip": ["*.down_proj"], "calibration": CALIB},
    {"method": "gobo", "bits": 3, "group_size": 32, "sigma": 2.5},
]
IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 77]])


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


def test_quantized_wrappers_round_trip_through_the_cache(tiny_model_dir, tmp_path):
    specs = SPECS.validate_python(MIXED)
    first, _, _, status = load_or_compress(str(tiny_model_dir), specs, "bfloat16", tmp_path)
    assert status == "miss"
    layer = first.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, InputScaled)
    assert isinstance(layer.mlp.gate_proj, MixedInt8Linear)
    assert isinstance(layer.mlp.down_proj, OutlierSparseLinear)
    second, _, _, status = load_or_compress(str(tiny_model_dir), specs, "bfloat16", tmp_path)
    assert status == "hit"
    assert torch.equal(_logits(first), _logits(second))
