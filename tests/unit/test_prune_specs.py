"""Pruning / low-rank specs: bad values fail at config load with the field named."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError
from transformers import LlamaConfig

from slimserve.compression.methods.low_rank import LowRankSpec
from slimserve.compression.methods.prune_ffn import FFNPruneSpec
from slimserve.compression.methods.prune_heads import HeadPruneSpec
from slimserve.compression.methods.prune_layers import LayerPruneSpec
from slimserve.compression.methods.sparsity import parse_nm
from slimserve.compression.methods.wanda import WandaSpec
from slimserve.compression.specs import CompressionSpec
from slimserve.serve.config import ConfigError, parse_config

SPECS = TypeAdapter(list[CompressionSpec])


def tiny_config(**overrides) -> LlamaConfig:
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaConfig(**{**fields, **overrides})


def config_error(compression: list[dict]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"model": "m", "variants": {"v": {"compression": compression}}})
    return str(caught.value)


def test_every_method_parses_from_config():
    specs = SPECS.validate_python(
        [
            {"method": "magnitude", "sparsity": 0.5, "scope": "global"},
            {"method": "wanda", "sparsity": "2:4"},
            {"method": "sparsegpt", "sparsity": 0.5, "calibration": {"samples": 8}},
            {"method": "prune-heads", "keep_kv_heads": 2},
            {"method": "prune-ffn", "keep_fraction": 0.75},
            {"method": "prune-layers", "remove": 4, "importance": "perplexity"},
            {"method": "low-rank", "energy": 0.9, "activation_aware": False},
        ]
    )
    assert [spec.method for spec in specs] == [
        "magnitude",
        "wanda",
        "sparsegpt",
        "prune-heads",
        "prune-ffn",
        "prune-layers",
        "low-rank",
    ]
    assert specs[1].nm == (2, 4) and specs[1].target_sparsity == 0.5
    assert specs[2].calibration.samples == 8 and specs[2].calibration.seq_len == 256


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"method": "wanda", "sparsity": 1.0}, "sparsity", "[0, 1)"),
        ({"method": "magnitude", "sparsity": -0.1}, "sparsity", "[0, 1)"),
        ({"method": "wanda", "sparsity": "2-4"}, "sparsity", "N:M"),
        ({"method": "sparsegpt", "sparsity": "4:2"}, "sparsity", "0 < N < M"),
        ({"method": "magnitude", "sparsity": "2:4", "scope": "global"}, "magnitude", "global"),
        ({"method": "low-rank", "rank": 0}, "rank", "greater than 0"),
        ({"method": "low-rank"}, "low-rank", "exactly one of rank or energy"),
        ({"method": "low-rank", "rank": 8, "energy": 0.5}, "low-rank", "exactly one"),
        ({"method": "prune-layers", "remove": 0}, "remove", "greater than or equal to 1"),
        ({"method": "prune-heads"}, "prune-heads", "keep_kv_heads"),
        ({"method": "prune-ffn", "keep_fraction": 1.0}, "keep_fraction", "less than 1"),
        ({"method": "prune-ffn", "keep_fraction": 0.5, "skip": ["x"]}, "skip", "not supported"),
        ({"method": "wanda", "sparsity": 0.5, "calibration": {"samples": 0}}, "samples", "greater"),
        ({"method": "wanda", "sparsity": 0.5, "typo": 1}, "typo", "Extra inputs"),
    ],
)
def test_bad_fields_fail_at_config_load_naming_the_field(spec, field, words):
    message = config_error([spec])
    assert field in message and words.split()[0] in message


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8)
    for bad in ("2:2", "0:4", "a:b", "2:128"):
        with pytest.raises(ValueError):
            parse_nm(bad)


def test_check_model_rejects_2_4_on_a_dimension_not_divisible_by_4():
    odd = tiny_config(hidden_size=66, num_attention_heads=3, num_key_value_heads=3)
    spec = WandaSpec(method="wanda", sparsity="2:4")
    with pytest.raises(ValueError, match=r"sparsity '2:4'.*66 input features"):
        spec.check_model(odd)
    spec.check_model(tiny_config())  # 64 and 128 divide by 4
    # Skipping every Linear that reads the 66-wide hidden state leaves only down_proj (K=128).
    skipping = WandaSpec(method="wanda", sparsity="2:4", skip=["*attn*", "*gate*", "*up_proj"])
    skipping.check_model(odd)
    WandaSpec(method="wanda", sparsity=0.5).check_model(odd)  # unstructured: any shape


def test_check_model_limits_structured_counts():
    config = tiny_config()
    with pytest.raises(ValueError, match="remove=3 is too large"):
        LayerPruneSpec(method="prune-layers", remove=3).check_model(config)
    LayerPruneSpec(method="prune-layers", remove=2).check_model(config)
    LayerPruneSpec(method="prune-layers", remove=4, keep_first=0, keep_last=0).check_model(config)
    with pytest.raises(ValueError, match="keep_kv_heads=2 must be below"):
        HeadPruneSpec(method="prune-heads", keep_kv_heads=2).check_model(config)
    with pytest.raises(ValueError, match="keep_heads_per_group=3 exceeds"):
        HeadPruneSpec(method="prune-heads", keep_heads_per_group=3).check_model(config)
    with pytest.raises(ValueError, match="keeps all"):
        FFNPruneSpec(method="prune-ffn", keep_fraction=0.9).check_model(config)
    with pytest.raises(ValueError, match="rank=64 must be below"):
        LowRankSpec(method="low-rank", rank=64).check_model(config)
    with pytest.raises(ValueError, match="match no Linear"):
        LowRankSpec(method="low-rank", rank=4, targets=["*nothing*"]).check_model(config)
    with pytest.raises(ValidationError):
        FFNPruneSpec(method="prune-ffn", keep_fraction=0.5, multiple_of=0)
