import copy

import psutil
import pytest
import torch

from slimserve.kernels import cpu_paths
from slimserve.kernels.base import pack_model_for_cpu
from slimserve.models.llama_runner import LlamaRunner, PrefillChunk

from .conftest import tiny_llama


def _hf_last_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float()


def test_prefill_and_chunked_prefill_match_hf():
    model = tiny_llama(vocab_size=300)
    reference_model = copy.deepcopy(model)  # the runner takes the model over
    ids = torch.randint(3, 300, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    runner = LlamaRunner(model, max_slots=3, max_len=64, pack_dense=True)
    with torch.inference_mode():
        whole = runner.prefill(0, ids, 0, want_logits=True)
        runner.prefill(1, ids[:10], 0, want_logits=False)
        runner.prefill(1, ids[10:25], 10, want_logits=False)
        chunked = runner.prefill(1, ids[25:], 25, want_logits=True)
    reference = _hf_last_logits(reference_model, ids)
    torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-4)


# 1-2 sequences take the fused-attention path, 3 the batched matmuls; 2 needs the mask.
@pytest.mark.parametrize("prompt_lengths", [(7,), (5, 19), (5, 19, 11)])
def test_batched_decode_at_different_positions_matches_hf(prompt_lengths):
    model = tiny_llama(vocab_size=300)
    reference_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in prompt_lengths]
    runner = LlamaRunner(model, max_slots=4, max_len=64, pack_dense=True)
    sequences = [list(p) for p in prompts]
    with torch.inference_mode():
        for slot, prompt in enumerate(prompts):
            runner.prefill(slot, prompt, 0, want_logits=True)
        for _ in range(6):
            next_ids = [int(torch.randint(3, 300, (1,), generator=gen)) for _ in sequences]
            logits = runner.decode(next_ids, [len(s) for s in sequences])
            for seq, token in zip(sequences, next_ids, strict=True):
                seq.append(token)
            for row, seq in enumerate(sequences):
                torch.testing.assert_close(
                    logits[row], _hf_last_logits(reference_model, seq), rtol=1e-4, atol=1e-4
                )


def test_the_kv_cache_takes_memory_only_where_it_is_written():
    """Sized for every slot at full length, the cache reads as zeros, as torch.zeros' did, but
    the memory behind it comes from the OS as it is first written."""
    process = psutil.Process()
    before = process.memory_info().rss
    runner = LlamaRunner(tiny_llama(vocab_size=300), max_slots=16, max_len=65536)
    assert runner.kv_cache_bytes >= 512 << 20
    assert process.memory_info().rss - before < runner.kv_cache_bytes // 8
    with torch.inference_mode():
        runner.prefill(3, [5, 6, 7], 0, want_logits=True)
    assert runner.k_cache[:, 3, :, :3].any() and runner.v_cache[:, 3, :, :3].any()
    assert not runner.k_cache[:, 3, :, 3:].any() and not runner.k_cache[:, :3].any()


def test_without_packing_the_model_is_left_intact():
    model = tiny_llama(vocab_size=300)
    runner = LlamaRunner(model, max_slots=1, max_len=16)
    assert runner.packed_weight_bytes == 0
    ids = [5, 6, 7]
    with torch.inference_mode():
        logits = runner.prefill(0, ids, 0, want_logits=True)
    torch.testing.assert_close(logits, _hf_last_logits(model, ids), rtol=1e-4, atol=1e-4)


def test_dense_projections_are_fused_and_packed():
    model = tiny_llama(vocab_size=300)
    runner = LlamaRunner(model, max_slots=1, max_len=16, pack_dense=True)
    assert all(plan.qkv is not None and plan.gate_up is not None for plan in runner.layers)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    assert runner.packed_weight_bytes > 0.9 * dense_bytes


def test_move_slot_carries_the_cache():
    model = tiny_llama(vocab_size=300)
    reference_model = copy.deepcopy(model)
    ids = list(range(3, 20))
    runner = LlamaRunner(model, max_slots=3, max_len=32, pack_dense=True)
    with torch.inference_mode():
        runner.prefill(2, ids, 0, want_logits=False)
        runner.move_slot(2, 0, len(ids))
        moved = runner.decode([7], [len(ids)])[0]
    expected = _hf_last_logits(reference_model, [*ids, 7])
    torch.testing.assert_close(moved, expected, rtol=1e-4, atol=1e-4)


def test_a_prefix_kept_in_the_store_answers_as_if_recomputed():
    """A prompt's first positions copied into the short store and back into another slot,
    then the rest of the prompt prefilled there: the logits of a run that computed it all."""
    model = tiny_llama(vocab_size=300)
    reference_model = copy.deepcopy(model)
    ids = list(range(3, 40))
    runner = LlamaRunner(
        model, max_slots=2, max_len=64, pack_dense=True, store_slots=3, store_len=24
    )
    with torch.inference_mode():
        runner.prefill(1, ids, 0, want_logits=False)
        runner.move_slot(1, 2 + 2, 24)  # into the store's third entry
        runner.k_cache.zero_()  # nothing of the first run is left in the batch's slots
        runner.v_cache.zero_()
        runner.move_slot(2 + 2, 0, 24)
        logits = runner.prefill(0, ids[24:], 24, want_logits=True)
    expected = _hf_last_logits(reference_model, ids)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError):  # more than a store entry holds: refused, not cut
        runner.move_slot(1, 2, 25)


def _to_w8a8(model) -> None:
    from slimserve.kernels import W8A8Linear, quantize_int8_absmax

    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.named_children()):
                if isinstance(child, torch.nn.Linear):
                    qweight, scale = quantize_int8_absmax(child.weight.detach())
                    w8a8 = W8A8Linear.from_quantized(qweight, scale, None, torch.float32)
                    setattr(owner, name, w8a8)


def _to_int8_weight_only(model) -> None:
    from slimserve.compression import apply_compression
    from slimserve.compression.specs import Int8WeightOnlySpec

    apply_compression(model, [Int8WeightOnlySpec(method="int8-weight-only")])


@pytest.mark.parametrize("compress", [_to_int8_weight_only, _to_w8a8])
def test_compressed_projections_fuse_without_changing_logits(compress):
    model = tiny_llama(vocab_size=300)
    compress(model)
    separate = copy.deepcopy(model)
    pack_model_for_cpu(separate)  # the same kernels, one projection at a time
    ids = [5, 9, 11, 40, 7]
    fused_runner = LlamaRunner(model, max_slots=1, max_len=16, pack_dense=True)
    plain_runner = LlamaRunner(separate, max_slots=1, max_len=16)
    assert all(plan.qkv is not None for plan in fused_runner.layers)
    assert all(plan.qkv is None for plan in plain_runner.layers)
    with torch.inference_mode():
        fused = fused_runner.prefill(0, ids, 0, want_logits=True)
        plain = plain_runner.prefill(0, ids, 0, want_logits=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    if compress is _to_w8a8 and cpu_paths.int8_gemms_exact():
        # W8A8 weights now live in oneDNN's int8 layout (and our GEMM's) only
        assert fused_runner.layers[0].qkv.cpu_pack is not None
        assert fused_runner.layers[0].down.qweight.numel() == 0
    elif compress is _to_w8a8:  # no VNNI: never oneDNN's saturating GEMM
        assert fused_runner.layers[0].qkv.cpu_pack is None


def test_one_step_decodes_and_prefills_a_chunk_like_separate_passes():
    """Decodes at ragged positions and a prompt chunk (not its first) share one pass; every
    row still matches the model's own forward over that sequence."""
    model = tiny_llama(vocab_size=300)
    reference_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (7, 23, 12)]
    joining = torch.randint(3, 300, (29,), generator=gen).tolist()
    runner = LlamaRunner(model, max_slots=5, max_len=64, pack_dense=True)
    with torch.inference_mode():
        for slot, prompt in enumerate(prompts):
            runner.prefill(slot, prompt, 0, want_logits=False)
        runner.prefill(3, joining[:10], 0, want_logits=False)
        next_ids = [11, 250, 42]
        decoded, [chunk_rows] = runner.step(
            next_ids,
            [len(p) for p in prompts],
            [PrefillChunk(slot=3, token_ids=joining[10:], start=10, logits="all")],
        )
        for row, (prompt, token) in enumerate(zip(prompts, next_ids, strict=True)):
            expected = _hf_last_logits(reference_model, [*prompt, token])
            torch.testing.assert_close(decoded[row], expected, rtol=1e-4, atol=1e-4)
        with torch.inference_mode():
            every = reference_model(torch.tensor([joining])).logits[0, 10:].float()
        torch.testing.assert_close(chunk_rows, every, rtol=1e-4, atol=1e-4)
        # The joining sequence then decodes next to the others from its cache.
        last = runner.decode([5, 6, 7, 8], [len(p) + 1 for p in prompts] + [len(joining)])
    expected = _hf_last_logits(reference_model, [*joining, 8])
    torch.testing.assert_close(last[3], expected, rtol=1e-4, atol=1e-4)


def test_one_step_prefills_several_prompts_next_to_the_decodes():
    """Two decodes and three prompts in one pass: one prompt whole (its last row's logits), one
    continuing from its cache (every row's), one only begun (none). Each matches the model's
    own forward over its sequence, and the begun one finishes correctly afterwards."""
    model = tiny_llama(vocab_size=300)
    reference_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    running = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (6, 17)]
    whole, resumed, begun = (
        torch.randint(3, 300, (n,), generator=gen).tolist() for n in (9, 21, 30)
    )
    runner = LlamaRunner(model, max_slots=6, max_len=64, pack_dense=True)
    with torch.inference_mode():
        for slot, prompt in enumerate(running):
            runner.prefill(slot, prompt, 0, want_logits=False)
        runner.prefill(3, resumed[:8], 0, want_logits=False)
        decoded, (whole_last, resumed_rows, begun_none) = runner.step(
            [40, 41],
            [len(p) for p in running],
            [
                PrefillChunk(2, whole, 0, "last"),
                PrefillChunk(3, resumed[8:], 8, "all"),
                PrefillChunk(4, begun[:12], 0, "none"),
            ],
        )
        finished = runner.prefill(4, begun[12:], 12, want_logits=True)
        every = reference_model(torch.tensor([resumed])).logits[0, 8:].float()
    for row, (prompt, token) in enumerate(zip(running, [40, 41], strict=True)):
        expected = _hf_last_logits(reference_model, [*prompt, token])
        torch.testing.assert_close(decoded[row], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        whole_last, _hf_last_logits(reference_model, whole), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(resumed_rows, every, rtol=1e-4, atol=1e-4)
    assert begun_none is None
    torch.testing.assert_close(
        finished, _hf_last_logits(reference_model, begun), rtol=1e-4, atol=1e-4
    )


def test_two_chunks_may_not_share_a_slot():
    runner = LlamaRunner(tiny_llama(vocab_size=300), max_slots=4, max_len=32, pack_dense=True)
    chunks = [PrefillChunk(slot=2, token_ids=[1, 2], start=0), PrefillChunk(2, [3], 0)]
    with torch.inference_mode(), pytest.raises(ValueError, match="share a slot"):
        runner.step([5], [0], chunks)


def test_a_chunk_may_not_land_on_a_decoding_slot():
    runner = LlamaRunner(tiny_llama(vocab_size=300), max_slots=3, max_len=32, pack_dense=True)
    with torch.inference_mode(), pytest.raises(ValueError, match="overlaps"):
        runner.step([5, 6], [0, 0], [PrefillChunk(slot=1, token_ids=[1, 2], start=0)])


NATIVE_STEP_DTYPES = [
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            reason="no AVX512_BF16 or AMX (or ONEDNN_MAX_CPU_ISA below them): oneDNN does not "
            "prepack bf16 layers, so the native bf16 step never runs",
        ),
    ),
    torch.float32,  # what the avx2 level computes in
]
# Largest difference from the eager path relative to the output's largest value: bf16 roundings
# that the order of a sum moves by a step; fp32 sums and the exp polynomial.
NATIVE_STEP_TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", NATIVE_STEP_DTYPES)
def test_native_steps_match_the_eager_path_with_the_same_cache(dtype: torch.dtype):
    """The native norms, SiLU * up and per-sequence attention against the eager path of the
    same runner code (switched off on a copy), over steps that decode one sequence alone, three
    at different lengths, and three while a fourth prompt's chunks join (a fifth prompt whole
    beside one of them)."""
    model = tiny_llama(vocab_size=300, dtype=dtype)
    eager_model = copy.deepcopy(model)
    fast = LlamaRunner(model, max_slots=5, max_len=96, pack_dense=True)
    eager = LlamaRunner(eager_model, max_slots=5, max_len=96, pack_dense=True)
    assert fast.native_decode
    eager.native_decode = False
    eager.native_step = None
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (9, 23, 4, 30, 7)]
    worst = 0.0

    def compare(ours, theirs):
        nonlocal worst
        worst = max(worst, float((ours - theirs).abs().max() / theirs.abs().max()))

    with torch.inference_mode():
        for runner in (fast, eager):
            for slot in range(3):
                runner.prefill(slot, prompts[slot], 0, want_logits=False)
        lengths = [len(p) for p in prompts[:3]]
        for step in range(20):
            batch = 1 if step < 6 else 3  # one sequence alone first
            tokens = torch.randint(3, 300, (batch,), generator=gen).tolist()
            positions = lengths[:batch]
            chunks = []
            if step in (10, 11, 12):  # the fourth prompt joins in chunks of 10
                start = 10 * (step - 10)
                ids = prompts[3][start : start + 10]
                chunks = [PrefillChunk(3, ids, start, "last" if step == 12 else "all")]
            if step == 11:  # a fifth, whole, beside it
                chunks.append(PrefillChunk(4, prompts[4], 0, "last"))
            ours = fast.step(tokens, positions, chunks)
            theirs = eager.step(tokens, positions, chunks)
            compare(ours[0], theirs[0])
            for our_rows, their_rows in zip(ours[1], theirs[1], strict=True):
                compare(our_rows, their_rows)
            lengths[:batch] = [n + 1 for n in positions]
    assert worst < NATIVE_STEP_TOLERANCE[dtype]
    # bf16: the first layer's new keys and values come from the same rounded norm of the
    # embeddings, bit for bit (in fp32 the norm's sum order shows in the last bit).
    for slot, length in enumerate([*lengths, len(prompts[3]), len(prompts[4])]):
        for ours, theirs in ((fast.k_cache, eager.k_cache), (fast.v_cache, eager.v_cache)):
            if dtype == torch.bfloat16:
                assert torch.equal(ours[0, slot, :, :length], theirs[0, slot, :, :length])
            else:
                torch.testing.assert_close(
                    ours[0, slot, :, :length], theirs[0, slot, :, :length], rtol=1e-6, atol=1e-6
                )
    bound = NATIVE_STEP_TOLERANCE[dtype]
    torch.testing.assert_close(fast.k_cache, eager.k_cache, rtol=bound, atol=bound)
