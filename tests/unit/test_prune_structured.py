"""Structured pruning (heads, FFN channels, layers): smaller tensors, consistent config, runs."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import TypeAdapter
from transformers import LlamaConfig, LlamaForCausalLM

from slimserve.compression.calib_data import calibration_override
from slimserve.compression.registry import apply_compression
from slimserve.compression.specs import CompressionSpec
from slimserve.models.llama_runner import LlamaRunner

SPECS = TypeAdapter(list[CompressionSpec])
HEAD_DIM = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 256, (6, 40), generator=torch.Generator().manual_seed(2))


def compress(model, calib, **spec):
    parsed = SPECS.validate_python([spec])
    parsed[0].check_model(model.config)
    with calibration_override(calib):
        return apply_compression(model, parsed).methods[0]


def assert_runs(model, ids):
    """HF forward (with and without its KV cache) and the serving runner agree."""
    with torch.inference_mode():
        hf = model(ids[None]).logits[0].float()
        runner = LlamaRunner(model, max_slots=2, max_len=64)
        last = runner.prefill(0, ids[:-1].tolist(), 0, want_logits=True)
        step = runner.decode([int(ids[-1])], [len(ids) - 1])
        generated = model.generate(
            ids[None], max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=True
        )
    torch.testing.assert_close(last, hf[-2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[0], hf[-1], atol=1e-4, rtol=1e-4)
    assert generated.shape == (1, len(ids) + 4)


def silence_heads(model, heads: list[int]) -> None:
    """Zero o_proj columns of these heads in every layer: their contribution is nil."""
    with torch.no_grad():
        for layer in model.model.layers:
            for head in heads:
                layer.self_attn.o_proj.weight[:, head * HEAD_DIM : (head + 1) * HEAD_DIM] = 0


def test_removing_a_kv_group_drops_the_silent_one(calib):
    model = tiny()
    silence_heads(model, [0, 1])  # group 0 = query heads 0, 1 with KV head 0
    original = copy.deepcopy(model)
    report = compress(model, calib, method="prune-heads", keep_kv_heads=1)
    attn, before = model.model.layers[0].self_attn, original.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * HEAD_DIM, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (HEAD_DIM, 64)
    assert attn.o_proj.weight.shape == (64, 2 * HEAD_DIM)
    # The kept group is group 1: KV head 1 and query heads 2, 3.
    assert torch.equal(attn.k_proj.weight, before.k_proj.weight[HEAD_DIM:])
    assert torch.equal(attn.q_proj.weight, before.q_proj.weight[2 * HEAD_DIM :])
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, HEAD_DIM)
    assert report.detail["removed_heads"]["0"] == [0, 1]
    assert report.bytes_after < report.bytes_before
    assert_runs(model, calib[0, :12])


def test_removing_query_heads_inside_groups_keeps_them_grouped(calib):
    model = tiny()
    silence_heads(model, [1, 2])  # one silent head in each group
    original = copy.deepcopy(model)
    compress(model, calib, method="prune-heads", keep_heads_per_group=1)
    attn, before = model.model.layers[2].self_attn, original.model.layers[2].self_attn
    kept_rows = torch.cat([before.q_proj.weight[:HEAD_DIM], before.q_proj.weight[48:]])
    assert torch.equal(attn.q_proj.weight, kept_rows)  # heads 0 and 3
    assert torch.equal(attn.k_proj.weight, before.k_proj.weight)  # both KV heads stay
    assert attn.num_key_value_groups == 1
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert_runs(model, calib[0, :12])


def test_ffn_pruning_shrinks_and_drops_dead_channels(calib):
    model = tiny()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :64] *= 1e-4  # channels 0..63 barely matter
    report = compress(model, calib, method="prune-ffn", keep_fraction=0.5, multiple_of=16)
    for layer in model.model.layers:
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (64, 64)
        assert mlp.down_proj.weight.shape == (64, 64)
        assert mlp.down_proj.weight.abs().min(dim=0).values.max() > 0
        assert mlp.down_proj.weight.abs().amax(0).min() > 1e-3  # no damped channel kept
    assert model.config.intermediate_size == 64
    assert report.detail["intermediate_size"] == "128 -> 64"
    assert_runs(model, calib[0, :12])


def make_identity(model, index: int) -> None:
    """A block whose attention and MLP add nothing: output == input."""
    with torch.no_grad():
        model.model.layers[index].self_attn.o_proj.weight.zero_()
        model.model.layers[index].mlp.down_proj.weight.zero_()


def test_angular_layer_pruning_removes_the_blocks_that_do_least(calib):
    model = tiny(layers=6)
    make_identity(model, 2)
    make_identity(model, 4)
    blocks = list(model.model.layers)
    report = compress(model, calib, method="prune-layers", remove=2)
    assert report.detail["removed_layers"] == [2, 4]
    assert report.detail["importance"]["2"] == pytest.approx(0.0, abs=1e-3)
    assert model.config.num_hidden_layers == len(model.model.layers) == 4
    kept = [blocks[i] for i in (0, 1, 3, 5)]
    assert all(a is b for a, b in zip(model.model.layers, kept, strict=True))
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert_runs(model, calib[0, :12])


@torch.inference_mode()
def calibration_perplexity(model, ids) -> float:
    return float(torch.exp(model(ids, labels=ids, use_cache=False).loss))


def test_perplexity_layer_pruning_scores_each_block_by_its_removal(calib):
    model = tiny(layers=5)
    make_identity(model, 2)
    full = calibration_perplexity(model, calib)
    without_3 = copy.deepcopy(model)
    del without_3.model.layers[3]
    without_3.config.num_hidden_layers = 4
    expected_3 = calibration_perplexity(without_3, calib)
    report = compress(model, calib, method="prune-layers", remove=1, importance="perplexity")
    scores = report.detail["importance"]
    assert scores["2"] == pytest.approx(full, rel=1e-4)  # an identity block costs nothing
    assert scores["3"] == pytest.approx(expected_3, rel=1e-4)
    assert report.detail["removed_layers"] == [min((1, 2, 3), key=lambda i: scores[str(i)])]
    assert_runs(model, calib[0, :12])


def test_layer_pruning_protects_first_and_last(calib):
    model = tiny(layers=4)
    make_identity(model, 0)
    make_identity(model, 3)
    report = compress(model, calib, method="prune-layers", remove=1)
    assert report.detail["removed_layers"][0] in (1, 2)


def test_structured_methods_compose_and_still_run(calib):
    model = tiny(layers=5)
    specs = SPECS.validate_python(
        [
            {"method": "prune-layers", "remove": 1},
            {"method": "prune-heads", "keep_kv_heads": 1},
            {"method": "prune-ffn", "keep_fraction": 0.5, "multiple_of": 32},
            {"method": "wanda", "sparsity": "2:4"},
        ]
    )
    before = sum(p.numel() for p in model.parameters())
    with calibration_override(calib):
        apply_compression(model, specs)
    assert model.config.num_hidden_layers == 4 and model.config.intermediate_size == 64
    assert sum(p.numel() for p in model.parameters()) < before
    assert_runs(model, calib[0, :12])


def test_head_importance_equals_each_heads_output_energy():
    from slimserve.compression.structured import HeadImportance

    o_proj = torch.nn.Linear(4 * HEAD_DIM, 64, bias=False)
    x = torch.randn(50, 4 * HEAD_DIM)
    importance = HeadImportance(o_proj, 4, HEAD_DIM)
    importance.add(x[:20])
    importance.add(x[20:])
    w = o_proj.weight.detach()
    cols = [slice(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in range(4)]
    direct = [float((x[:, c] @ w[:, c].t()).pow(2).sum()) for c in cols]
    torch.testing.assert_close(importance.scores, torch.tensor(direct), rtol=1e-4, atol=1e-4)
