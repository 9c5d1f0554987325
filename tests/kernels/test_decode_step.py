"""The one-call decode step (kernels/decode_step.py, cpu_decode_step.cpp) against the per-call
path of the same runner: the same kernels in the same order, so logits and caches must be bit
for bit the same, at every ISA level, for each projection layout the step reads, on a model whose
every width is ragged for the kernels' blocks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from pydantic import TypeAdapter
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from slimserve.compression import apply_compression
from slimserve.compression.specs import CompressionSpec
from slimserve.kernels import W8A8Linear, cpu_paths, native, quantize_int8_absmax
from slimserve.kernels.cpu_isa import Isa
from slimserve.kernels.decode_step import ProjectKind
from slimserve.models.llama_runner import LlamaRunner

VOCAB = 300


def ragged_llama(dtype: torch.dtype) -> LlamaForCausalLM:
    """Widths the kernels' blocks of 24 channels do not divide: 128 hidden, 8 heads of 16 over
    2 K/V heads (qkv 192 wide), 224 intermediate (gate|up 448). Inputs stay multiples of 32,
    as the 4-bit GEMV's groups need."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=224,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def _int8(model: nn.Module) -> None:
    apply_compression(model, [_spec({"method": "int8-weight-only"})])


def _sparse24(model: nn.Module) -> None:
    apply_compression(model, [_spec({"method": "magnitude", "sparsity": "2:4"})])


def _w8a8(model: nn.Module) -> None:
    """Every projection as W8A8 (absmax weights, no smoothing: the layout is what is tested)."""
    dtype = next(model.parameters()).dtype
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.named_children()):
                if isinstance(child, nn.Linear):
                    qweight, scale = quantize_int8_absmax(child.weight.detach().float())
                    setattr(owner, name, W8A8Linear.from_quantized(qweight, scale, None, dtype))


def _spec(raw: dict) -> CompressionSpec:
    return TypeAdapter(CompressionSpec).validate_python(raw)


def _w4(model: nn.Module) -> None:
    apply_compression(model, [_spec({"method": "rtn", "bits": 4, "group_size": 32})])


def _bf16_numbers(model: nn.Module) -> None:
    """Every weight rounded to a bf16 number, as a bf16 checkpoint served in fp32 has them."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.bfloat16())


def _sparse24_bf16_numbers(model: nn.Module) -> None:
    _bf16_numbers(model)
    _sparse24(model)


VARIANTS: dict[str, Callable[[nn.Module], None] | None] = {
    "dense": None,
    "dense-plain-bf16-layout": None,  # bf16: the plain layout, not the coded one (see the test)
    "dense-bf16-numbers": _bf16_numbers,
    "int8": _int8,
    "w8a8": _w8a8,
    "sparse24": _sparse24,
    "sparse24-bf16-numbers": _sparse24_bf16_numbers,
    "sparse24-plain-bf16-layout": _sparse24,
    "w4": _w4,
}
DTYPES = [torch.float32, torch.bfloat16]


def _runner(dtype: torch.dtype, variant: str, max_slots: int = 4) -> LlamaRunner:
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no AVX512_BF16 or AMX: bf16 layers are never packed for our step ops")
    model = ragged_llama(dtype)
    if VARIANTS[variant] is not None:
        VARIANTS[variant](model)
    return LlamaRunner(model, max_slots=max_slots, max_len=64, pack_dense=True)


def _bf16_gemm_here() -> bool:
    kernels = native.kernels()
    return kernels is not None and kernels.bf16_gemm_available


def test_the_default_variants_take_the_one_call_step(each_isa: Isa):
    """What the default config serves (full and int8, in the dtype `auto` picks) runs every
    layer in one call at each level: fp32 at avx2, bf16 where the CPU has AVX-512 BF16."""
    dtypes = [torch.float32] if each_isa == Isa.AVX2 else []
    if each_isa == Isa.AVX512 and _bf16_gemm_here():
        dtypes.append(torch.bfloat16)
    for dtype in dtypes:
        for variant in ("dense", "int8"):
            runner = _runner(dtype, variant)
            assert runner.native_step is not None, (variant, dtype)
    if not dtypes:
        pytest.skip("no AVX-512 BF16 here: the avx512 level computes dense fp32 on oneDNN")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_the_one_call_step_is_bit_identical_to_the_per_call_path(
    each_isa: Isa, dtype: torch.dtype, variant: str, monkeypatch: pytest.MonkeyPatch
):
    """Steps of one sequence, of all four at ragged positions, and of three: each runs once in
    one call and once per call from the same cache; logits and every cached key and value
    must be equal bit for bit."""
    # The one-call step runs our 4-bit GEMV at every row count; per call at the avx512 level
    # torch's int4pack takes 2-64 rows (faster there per call). Same kernels on both sides here.
    monkeypatch.setitem(
        cpu_paths.NATIVE_W4_ROWS_BESIDE_INT4PACK, Isa.AVX512, cpu_paths.LOWBIT_INT4PACK_MAX_M
    )
    if variant.endswith("plain-bf16-layout"):
        monkeypatch.setattr(native, "BF16_CODED_MAX_SHARE", 0.0)
    runner = _runner(dtype, variant)
    step = runner.native_step
    if step is None:
        pytest.skip(f"{variant} in {dtype} at {each_isa.label} keeps the per-call path")
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 30, 1, 17]
    with torch.inference_mode():
        for slot, length in enumerate(lengths):
            runner.prefill(slot, torch.randint(3, VOCAB, (length,), generator=gen).tolist(), 0,
                           want_logits=False)  # fmt: skip
        for batch in (1, 1, 4, 3, 4):
            tokens = torch.randint(3, VOCAB, (batch,), generator=gen).tolist()
            positions = lengths[:batch]
            before = runner.k_cache.clone(), runner.v_cache.clone()
            ours = runner.step(tokens, positions)[0]
            ours_cache = runner.k_cache.clone(), runner.v_cache.clone()
            runner.k_cache.copy_(before[0])
            runner.v_cache.copy_(before[1])
            runner.native_step = None
            theirs = runner.step(tokens, positions)[0]
            runner.native_step = step
            assert torch.equal(ours, theirs), (batch, positions)
            assert torch.equal(ours_cache[0], runner.k_cache)
            assert torch.equal(ours_cache[1], runner.v_cache)
            lengths[:batch] = [n + 1 for n in positions]


def test_a_position_past_the_cache_is_refused(each_isa: Isa):
    runner = _runner(torch.float32 if each_isa == Isa.AVX2 else torch.bfloat16, "int8")
    if runner.native_step is None:
        pytest.skip("no one-call step here")
    with torch.inference_mode(), pytest.raises(ValueError, match="slim_decode_step refused"):
        runner.step([5], [64])


def test_a_projection_outside_our_layouts_keeps_the_per_call_path(each_isa: Isa):
    """3-bit group-wise weights have no layout the step reads: the runner decodes per call,
    and says so by having no one-call step."""
    model = ragged_llama(torch.float32)
    apply_compression(model, [_spec({"method": "rtn", "bits": 3, "group_size": 4})])
    runner = LlamaRunner(model, max_slots=2, max_len=32, pack_dense=True)
    assert runner.native_step is None
    with torch.inference_mode():
        runner.prefill(0, [5, 6, 7], 0, want_logits=False)
        assert runner.step([8], [3])[0].shape == (1, VOCAB)


def test_batches_past_a_kernels_rows_step_per_call(each_isa: Isa, monkeypatch):
    """A step is one call only up to the rows every projection's kernel takes (W8A8 beside
    oneDNN's copy: its GEMM's 32 rows): past them the same runner steps per call."""
    runner = _runner(torch.float32, "w8a8", max_slots=6)
    if runner.native_step is None:
        pytest.skip("no one-call step here")
    runner.native_step.max_rows = 2
    calls = []
    run = runner.native_step.run
    monkeypatch.setattr(runner.native_step, "run", lambda *a: calls.append(1) or run(*a))
    with torch.inference_mode():
        for slot in range(3):
            runner.prefill(slot, [5, 6, 7], 0, want_logits=False)
        runner.step([8, 9], [3, 3])
        assert len(calls) == 1
        runner.step([8, 9, 10], [4, 4, 3])
        assert len(calls) == 1


def test_projection_kinds_name_the_layouts_the_engine_packs(each_isa: Isa):
    """Each packed module says which GEMM reads it; at avx2 the dense and int8 layers are the
    fp32 GEMM's panels, in bf16 where the weights are bf16 numbers."""
    if each_isa != Isa.AVX2:
        pytest.skip("the avx512 kinds depend on AVX-512 BF16; the bit-identity test covers them")
    dense = _runner(torch.float32, "dense").native_step
    bf16_numbers = _runner(torch.float32, "dense-bf16-numbers").native_step
    int8 = _runner(torch.float32, "int8").native_step
    assert {layer.qkv.kind for layer in dense.layers} == {ProjectKind.F32_GEMM}
    assert {layer.down.kind for layer in bf16_numbers.layers} == {ProjectKind.F32_GEMM_BF16_WEIGHTS}
    sparse = _runner(torch.float32, "sparse24-bf16-numbers").native_step
    assert {layer.down.kind for layer in sparse.layers} == {ProjectKind.SPARSE24_BF16_VALUES}
    assert {layer.down.kind for layer in int8.layers} == {ProjectKind.W8A16_PANELS}


def test_bf16_layers_step_on_the_coded_layout(each_isa: Isa, monkeypatch):
    """A checkpoint's bf16 weights (dense, and 2:4 kept values) take the coded layout (3/4 of
    the bytes, the same bits: the bit-identity test above runs both); the plain one where the
    coded would not save enough."""
    if each_isa != Isa.AVX512 or not _bf16_gemm_here():
        pytest.skip("the bf16 GEMM needs AVX-512 BF16 at the avx512 level")
    coded = _runner(torch.bfloat16, "dense").native_step
    assert {layer.gate_up.kind for layer in coded.layers} == {ProjectKind.BF16_CODED_GEMM}
    sparse = _runner(torch.bfloat16, "sparse24").native_step
    assert {layer.down.kind for layer in sparse.layers} == {ProjectKind.SPARSE24_CODED}
    monkeypatch.setattr(native, "BF16_CODED_MAX_SHARE", 0.0)
    plain = _runner(torch.bfloat16, "dense").native_step
    assert {layer.gate_up.kind for layer in plain.layers} == {ProjectKind.BF16_GEMM}
    sparse = _runner(torch.bfloat16, "sparse24").native_step
    assert {layer.down.kind for layer in sparse.layers} == {ProjectKind.SPARSE24}


def test_rows_the_plan_was_not_built_for_are_refused(each_isa: Isa):
    runner = _runner(torch.float32 if each_isa == Isa.AVX2 else torch.bfloat16, "int8")
    step = runner.native_step
    if step is None:
        pytest.skip("no one-call step here")
    positions = torch.tensor([3])
    with pytest.raises(ValueError, match="rows"):
        step.run(torch.zeros(1, step.hidden + 1, dtype=step.dtype), positions)
    with pytest.raises(ValueError, match="rows"):
        step.run(torch.zeros(step.max_rows + 1, step.hidden, dtype=step.dtype), positions)
    with pytest.raises(ValueError, match="positions"):
        step.run(torch.zeros(2, step.hidden, dtype=step.dtype), positions)
