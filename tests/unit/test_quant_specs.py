"""Quantization specs: bad values fail at config load, naming the field."""

import pytest
from pydantic import TypeAdapter, ValidationError
from transformers import LlamaConfig

from slimserve.compression.methods.awq import AWQSpec
from slimserve.compression.methods.gobo import GoboSpec
from slimserve.compression.methods.gptq import GPTQSpec
from slimserve.compression.methods.rtn import RTNSpec
from slimserve.compression.specs import CompressionSpec

SPEC = TypeAdapter(CompressionSpec)

# SmolLM2-135M's Linear shapes (hidden 576, intermediate 1536), two layers and a small vocab.
SMOLLM_LIKE = LlamaConfig(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=2,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=256,
)


def _error_locations(data: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        SPEC.validate_python(data)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"method": "gptq", "bits": 5}, "gptq.bits"),
        ({"method": "rtn", "bits": 8}, "rtn.bits"),
        ({"method": "awq", "group_size": 48}, "awq.group_size"),
        ({"method": "gptq", "group_size": 0}, "gptq.group_size"),
        ({"method": "gptq", "damp": 0}, "gptq.damp"),
        ({"method": "smoothquant-w8a8", "alpha": 1.5}, "smoothquant-w8a8.alpha"),
        ({"method": "smoothquant-w8a8", "smooth": ["qk"]}, "smoothquant-w8a8.smooth.0"),
        ({"method": "llm-int8", "threshold": -1}, "llm-int8.threshold"),
        ({"method": "gobo", "bits": 2}, "gobo.bits"),
        ({"method": "gobo", "sigma": 0}, "gobo.sigma"),
        ({"method": "gptq", "calibration": {"samples": 0}}, "gptq.calibration.samples"),
        ({"method": "awq", "calibration": {"source": "x.csv"}}, "awq.calibration.source"),
        ({"method": "awq", "calibration": {"source": "/no/such.txt"}}, "awq.calibration.source"),
        ({"method": "gptq", "bits": 4, "groupsize": 64}, "gptq.groupsize"),
    ],
)
def test_bad_field_is_named(data, field):
    # A union field (alpha: number or "auto") adds the member to the location, after the field.
    assert any(loc == field or loc.startswith(field + ".") for loc in _error_locations(data))


def test_unknown_method_is_rejected_by_name():
    with pytest.raises(ValidationError) as info:
        SPEC.validate_python({"method": "gptq-v9"})
    assert "gptq-v9" in str(info.value)


def test_defaults_are_modest_and_valid():
    spec = SPEC.validate_python({"method": "gptq"})
    assert isinstance(spec, GPTQSpec)
    assert (spec.bits, spec.group_size) == (4, 64)
    assert spec.calibration.samples * spec.calibration.seq_len <= 8192
    spec.check_model(SMOLLM_LIKE)


def test_group_size_that_does_not_divide_in_features_fails_at_model_check():
    spec = RTNSpec(method="rtn", group_size=128)
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the in-features \[576\]"):
        spec.check_model(SMOLLM_LIKE)
    AWQSpec(method="awq", group_size=32).check_model(SMOLLM_LIKE)


def test_model_check_ignores_skipped_linears():
    # Only down_proj (K=1536 = 3 x 512) is left: 512 divides it.
    keep_down = ["*q_proj", "*k_proj", "*v_proj", "*o_proj", "*gate_proj", "*up_proj"]
    GPTQSpec(method="gptq", group_size=512, skip=keep_down).check_model(SMOLLM_LIKE)
    with pytest.raises(ValueError, match="group_size"):
        GPTQSpec(method="gptq", group_size=512).check_model(SMOLLM_LIKE)


def test_gobo_int8_has_no_group_constraint():
    GoboSpec(method="gobo", bits=8, group_size=128).check_model(SMOLLM_LIKE)
    with pytest.raises(ValueError, match="group_size"):
        GoboSpec(method="gobo", bits=4, group_size=128).check_model(SMOLLM_LIKE)


def test_smoothquant_alpha_accepts_auto_and_numbers_only():
    assert SPEC.validate_python({"method": "smoothquant-w8a8", "alpha": "auto"}).alpha == "auto"
    assert SPEC.validate_python({"method": "smoothquant-w8a8", "alpha": 0.8}).alpha == 0.8
    locations = _error_locations({"method": "smoothquant-w8a8", "alpha": "best"})
    assert any(loc.startswith("smoothquant-w8a8.alpha") for loc in locations)
