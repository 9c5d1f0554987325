"""slimserve's own CPU ops for one decoding sequence (kernels/cpu_decode_attention.cpp): rotary
and cache writes bit-identical to the eager bf16 ops, attention against an fp64 reference at
several head layouts, head sizes and cache lengths, the limits checked before a call, and the
residual add + RMSNorm and SiLU(gate) * up rounded as the eager ops round."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import native

from .helpers import AVX512_VNNI, cpu_has, rel_error

pytestmark = pytest.mark.skipif(not cpu_has(*AVX512_VNNI), reason="this CPU has no AVX-512 VNNI")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _case(heads: int, kv_heads: int, dim: int, max_len: int, position: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn((heads + 2 * kv_heads) * dim, generator=gen) * 2).bfloat16()
    angles = torch.rand(dim // 2, generator=gen) * 6.28
    cos = torch.cat([angles.cos(), angles.cos()]).bfloat16()
    sin = torch.cat([angles.sin(), angles.sin()]).bfloat16()
    k_cache = torch.randn(kv_heads, max_len, dim, generator=gen).bfloat16()
    v_cache = torch.randn(kv_heads, max_len, dim, generator=gen).bfloat16()
    return qkv, cos, sin, k_cache, v_cache


# (heads, kv_heads, head_dim, position): the default model's layout at several cache lengths,
# no grouping, one K/V head for eight, head sizes 16-128.
LAYOUTS = [(9, 3, 64, 0), (9, 3, 64, 17), (9, 3, 64, 200), (4, 4, 128, 33), (8, 1, 32, 64)]
LAYOUTS.append((2, 2, 16, 5))


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "position"), LAYOUTS)
def test_matches_the_eager_ops_and_fp64_attention(heads, kv_heads, dim, position) -> None:
    kernels = native.kernels()
    assert kernels is not None
    max_len = position + 40
    qkv, cos, sin, k_cache, v_cache = _case(heads, kv_heads, dim, max_len, position, seed=position)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    scaling = dim**-0.5
    assert native.decode_attention_supported(qkv, k_cache, v_cache, heads)
    out = kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, position, heads, scaling)

    # What the runner's eager path computes: bf16 rotary, then the cache writes.
    qk = qkv[: (heads + kv_heads) * dim].view(heads + kv_heads, dim)
    qk = qk * cos + _rotate_half(qk) * sin
    q, k = qk[:heads], qk[heads:]
    v = qkv[(heads + kv_heads) * dim :].view(kv_heads, dim)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    expected_k[:, position], expected_v[:, position] = k, v
    assert torch.equal(k_cache, expected_k)  # bit for bit, and nothing else written
    assert torch.equal(v_cache, expected_v)

    keys = expected_k[:, : position + 1].double().repeat_interleave(heads // kv_heads, dim=0)
    values = expected_v[:, : position + 1].double().repeat_interleave(heads // kv_heads, dim=0)
    weights = (q.double().unsqueeze(1) @ keys.transpose(1, 2) * scaling).softmax(dim=-1)
    ref = (weights @ values).reshape(1, heads * dim)
    assert out.shape == (1, heads * dim) and out.dtype == torch.bfloat16
    for head in range(heads):  # per head: one head's error must not hide under another's scale
        cols = slice(head * dim, (head + 1) * dim)
        assert rel_error(out[:, cols], ref[:, cols]) < 1e-2, head


def test_large_scores_do_not_overflow_the_softmax() -> None:
    kernels = native.kernels()
    qkv, cos, sin, k_cache, v_cache = _case(4, 2, 64, 80, 50, seed=7)
    qkv *= 40  # scores in the thousands
    k_cache *= 40
    out = kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, 50, 4, 0.125)
    assert torch.isfinite(out.float()).all()


def test_limits_are_checked_before_the_call() -> None:
    qkv, _, _, k_cache, v_cache = _case(9, 3, 64, 20, 3, seed=1)
    assert native.decode_attention_supported(qkv, k_cache, v_cache, 9)
    assert not native.decode_attention_supported(qkv.float(), k_cache, v_cache, 9)
    assert not native.decode_attention_supported(qkv, k_cache.float(), v_cache, 9)
    assert not native.decode_attention_supported(qkv, k_cache.transpose(1, 2), v_cache, 9)
    assert not native.decode_attention_supported(qkv[:-64], k_cache, v_cache, 9)
    odd = torch.zeros((9 + 6) * 40, dtype=torch.bfloat16)
    short_k, short_v = k_cache[..., :40].contiguous(), v_cache[..., :40].contiguous()
    assert not native.decode_attention_supported(odd, short_k, short_v, 9)  # D % 16
    wide = torch.zeros(2, 4, 272, dtype=torch.bfloat16)  # D = 272 > the kernel's 256
    assert native.kernels().decode_attention_max_head_dim == 256
    assert not native.decode_attention_supported(torch.zeros(6 * 272).bfloat16(), wide, wide, 2)
    with pytest.raises(ValueError, match="refused"):
        cos = sin = torch.zeros(64, dtype=torch.bfloat16)
        native.kernels().decode_attention(qkv, cos, sin, k_cache, v_cache, 20, 9, 0.125)


@pytest.mark.parametrize("n", [576, 64, 1001])
def test_add_rms_norm_rounds_like_the_eager_ops(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(1, n, generator=gen) * 3).bfloat16()
    delta = torch.randn(1, n, generator=gen).bfloat16()
    weight = (torch.rand(n, generator=gen) + 0.5).bfloat16()
    summed = x + delta
    expected = weight * torch.nn.functional.rms_norm(summed.float(), (n,), None, 1e-5).bfloat16()
    out = native.kernels().add_rms_norm(x, delta, weight, 1e-5)
    assert torch.equal(x, summed)  # the residual, updated in place
    # Same roundings; only the order of the sum of squares may move a value by one bf16 step.
    assert (out == expected).float().mean() > 0.99
    torch.testing.assert_close(out, expected, rtol=8e-3, atol=0)
    again = native.kernels().add_rms_norm(x, None, weight, 1e-5)  # no residual: norm only
    assert torch.equal(x, summed) and torch.equal(again, out)


@pytest.mark.parametrize("n", [1536, 7])
def test_silu_mul_rounds_like_the_eager_ops(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    gate_up = (torch.randn(1, 2 * n, generator=gen) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = native.kernels().silu_mul(gate_up)
    assert out.shape == (1, n)
    assert (out == expected).float().mean() > 0.99
    torch.testing.assert_close(out, expected, rtol=8e-3, atol=1e-6)
