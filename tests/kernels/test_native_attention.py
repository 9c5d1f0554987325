"""slimserve's own CPU ops for a decode step (kernels/cpu_decode_attention.cpp), in bf16 and fp32:
rotary and cache writes bit-identical to the eager ops, each sequence's attention against an
fp64 reference at several head layouts, head sizes and ragged cache lengths, the limits checked
before a call, and the residual add + RMSNorm and SiLU(gate) * up per row, rounded as the eager
ops round."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import native

from .helpers import rel_error

pytestmark = pytest.mark.usefixtures("each_isa")

DTYPES = [torch.bfloat16, torch.float32]
# Attention against fp64: bf16 inputs and output; fp32 sums and the exp polynomial (~2e-7).
ATTENTION_BOUND = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
# One eager op's rounding, relative.
OP_RTOL = {torch.bfloat16: 8e-3, torch.float32: 1e-5}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _case(
    heads: int,
    kv_heads: int,
    dim: int,
    max_len: int,
    batch: int,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
):
    """Rows of q | k | v for `batch` sequences, cos / sin tables, caches with one spare slot."""
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen) * 2).to(dtype)
    angles = torch.rand(max_len, dim // 2, generator=gen) * 6.28
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype)
    k_cache = torch.randn(batch + 1, kv_heads, max_len, dim, generator=gen).to(dtype)
    v_cache = torch.randn(batch + 1, kv_heads, max_len, dim, generator=gen).to(dtype)
    return qkv, cos, sin, k_cache, v_cache


# (heads, kv_heads, head_dim, position): the default model's layout at several cache lengths,
# no grouping, one K/V head for eight, head sizes 16-128.
LAYOUTS = [(9, 3, 64, 0), (9, 3, 64, 17), (9, 3, 64, 200), (4, 4, 128, 33), (8, 1, 32, 64)]
LAYOUTS.append((2, 2, 16, 5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "position"), LAYOUTS)
def test_matches_the_eager_ops_and_fp64_attention(heads, kv_heads, dim, position, dtype) -> None:
    """Three sequences at ragged positions (`position`, about half of it, 0): each one's cache
    writes bit for bit as the eager ops, its attention per head against fp64 over its own keys."""
    kernels = native.kernels()
    assert kernels is not None
    max_len = position + 40
    positions = torch.tensor([position, position // 2 + 1, 0])
    qkv, cos, sin, k_cache, v_cache = _case(heads, kv_heads, dim, max_len, 3, position, dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    scaling = dim**-0.5
    assert native.decode_attention_supported(qkv, cos, k_cache, v_cache, heads)
    out = kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, positions, heads, scaling)
    assert out.shape == (3, heads * dim) and out.dtype == dtype

    # What the runner's eager path computes: rotary in the model's dtype, then the cache writes.
    qk = qkv[:, : (heads + kv_heads) * dim].view(3, heads + kv_heads, dim)
    qk = qk * cos[positions].unsqueeze(1) + _rotate_half(qk) * sin[positions].unsqueeze(1)
    v = qkv[:, (heads + kv_heads) * dim :].view(3, kv_heads, dim)
    for slot, at in enumerate(positions.tolist()):
        expected_k[slot, :, at], expected_v[slot, :, at] = qk[slot, heads:], v[slot]
    assert torch.equal(k_cache, expected_k)  # bit for bit, and nothing else written
    assert torch.equal(v_cache, expected_v)

    for slot, at in enumerate(positions.tolist()):
        group = heads // kv_heads
        keys = expected_k[slot, :, : at + 1].double().repeat_interleave(group, dim=0)
        values = expected_v[slot, :, : at + 1].double().repeat_interleave(group, dim=0)
        q = qk[slot, :heads].double().unsqueeze(1)
        weights = (q @ keys.transpose(1, 2) * scaling).softmax(dim=-1)
        ref = (weights @ values).reshape(heads * dim)
        for head in range(heads):  # per head: one head's error must not hide under another's
            cols = slice(head * dim, (head + 1) * dim)
            assert rel_error(out[slot, cols], ref[cols]) < ATTENTION_BOUND[dtype], (slot, head)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_sequence_reads_the_same_alone_or_in_a_batch(dtype: torch.dtype) -> None:
    """Each sequence attends its own slot only: alone (batch 1) its output is bit-identical."""
    kernels = native.kernels()
    qkv, cos, sin, k_cache, v_cache = _case(9, 3, 64, 90, 4, seed=3, dtype=dtype)
    positions = torch.tensor([80, 3, 41, 62])
    batched = kernels.decode_attention(
        qkv, cos, sin, k_cache.clone(), v_cache.clone(), positions, 9, 0.125
    )
    alone = kernels.decode_attention(qkv[:1], cos, sin, k_cache, v_cache, positions[:1], 9, 0.125)
    assert torch.equal(batched[:1], alone)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_scores_do_not_overflow_the_softmax(dtype: torch.dtype) -> None:
    kernels = native.kernels()
    qkv, cos, sin, k_cache, v_cache = _case(4, 2, 64, 80, 2, seed=7, dtype=dtype)
    qkv *= 40  # scores in the thousands
    k_cache *= 40
    positions = torch.tensor([50, 79])
    out = kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, positions, 4, 0.125)
    assert torch.isfinite(out.float()).all()


def test_limits_are_checked_before_the_call() -> None:
    qkv, cos, sin, k_cache, v_cache = _case(9, 3, 64, 20, 2, seed=1)
    supported = native.decode_attention_supported
    assert supported(qkv, cos, k_cache, v_cache, 9)
    assert supported(qkv.float(), cos.float(), k_cache.float(), v_cache.float(), 9)
    assert not supported(qkv.float(), cos, k_cache, v_cache, 9)  # one dtype for all
    assert not supported(qkv, cos, k_cache.float(), v_cache, 9)
    assert not supported(qkv.half(), cos.half(), k_cache.half(), v_cache.half(), 9)
    assert not supported(qkv, cos, k_cache.transpose(2, 3), v_cache, 9)
    assert not supported(qkv[:, :-64], cos, k_cache, v_cache, 9)
    assert not supported(qkv.t().contiguous().t(), cos, k_cache, v_cache, 9)  # column stride
    assert not supported(qkv, cos[:10], k_cache, v_cache, 9)  # a table shorter than the cache
    assert not supported(qkv.repeat(2, 1), cos, k_cache, v_cache, 9)  # more rows than slots
    odd = torch.zeros(1, (9 + 6) * 40, dtype=torch.bfloat16)
    short_k, short_v = k_cache[..., :40].contiguous(), v_cache[..., :40].contiguous()
    assert not supported(odd, cos[:, :40].contiguous(), short_k, short_v, 9)  # D % 16
    wide = torch.zeros(1, 2, 4, 272, dtype=torch.bfloat16)  # D = 272 > the kernel's 256
    assert native.kernels().decode_attention_max_head_dim == 256
    wide_cos = torch.zeros(4, 272, dtype=torch.bfloat16)
    assert not supported(torch.zeros(1, 6 * 272).bfloat16(), wide_cos, wide, wide, 2)
    with pytest.raises(ValueError, match="refused"):  # a position past the cache
        native.kernels().decode_attention(
            qkv, cos, sin, k_cache, v_cache, torch.tensor([3, 20]), 9, 0.125
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 576), (3, 64), (5, 1001)])
def test_add_rms_norm_rounds_like_the_eager_ops(rows: int, n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(rows, n, generator=gen) * 3).to(dtype)
    x[-1] *= 40  # rows of different scales are normalized each on its own
    delta = torch.randn(rows, n, generator=gen).to(dtype)
    weight = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    summed = x + delta
    expected = weight * torch.nn.functional.rms_norm(summed.float(), (n,), None, 1e-5).to(dtype)
    out = native.kernels().add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, summed)  # the residual, updated in place
    # Same roundings; only the order of the sum of squares may move a value by one step.
    assert (out == expected).float().mean() > 0.99 or dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=OP_RTOL[dtype], atol=0)
    again = native.kernels().add_rms_norm(x, None, weight, 1e-5)  # no residual: norm only
    assert torch.equal(x, summed) and torch.equal(again, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n"), [(1, 1536), (4, 7), (3, 100)])
def test_silu_mul_rounds_like_the_eager_ops(rows: int, n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n)
    gate_up = (torch.randn(rows, 2 * n, generator=gen) * 4).to(dtype)
    gate_up[0, :5] = torch.tensor([-100.0, -88.0, 100.0, 0.0, -0.0])  # exp near overflow, zeros
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = native.kernels().silu_mul(gate_up)
    assert out.shape == (rows, n)
    assert (out == expected).float().mean() > 0.99 or dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=OP_RTOL[dtype], atol=1e-6)
