"""On the real SmolLM2-135M: int8 stays close to the full model, GPTQ beats round-to-nearest."""

import copy

import pytest
from pydantic import TypeAdapter

from slimserve.compression.evaluation import compare_to_reference, evaluation_ids
from slimserve.compression.registry import apply_compression
from slimserve.compression.specs import CompressionSpec
from slimserve.models.store import DEFAULT_MODEL_ALIAS, load_model_and_tokenizer

CALIBRATION = {"samples": 8, "seq_len": 128}  # small, to keep this test near a minute


@pytest.mark.slow
def test_int8_and_gptq_on_smollm2():
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL_ALIAS, "bfloat16")
    windows = evaluation_ids(tokenizer, max_tokens=1024).reshape(4, 256)
    quality = {}
    for label, spec in {
        "int8": {"method": "int8-weight-only"},
        "rtn": {"method": "rtn", "bits": 4, "group_size": 64},
        "gptq": {"method": "gptq", "bits": 4, "group_size": 64, "calibration": CALIBRATION},
    }.items():
        variant = copy.deepcopy(model)
        spec = TypeAdapter(CompressionSpec).validate_python(spec)
        report = apply_compression(variant, [spec])
        assert report.weight_bytes_after < report.weight_bytes_before
        quality[label] = compare_to_reference(variant, model, windows)
    assert quality["int8"]["kl"] < 0.02 and quality["int8"]["agreement"] > 0.9
    assert quality["gptq"]["kl"] < 0.8 * quality["rtn"]["kl"]
