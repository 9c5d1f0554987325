"""slimserve's own bf16 GEMM (kernels/cpu_bf16_gemm.cpp): against fp64 at decode and prompt row
counts, ragged N (lone last 16-channel blocks) and odd K, with and without bias, within the bf16
rounding of the output that oneDNN's path also has; the packed module serving every row count
from it where the CPU has AVX-512 BF16, and oneDNN's copy elsewhere."""

from __future__ import annotations

import pytest
import torch

from slimserve.kernels import cpu_isa, native
from slimserve.kernels.dense_cpu import PACK_BATCH_HINT, PackedLinear, can_pack
from slimserve.kernels.dispatch import chosen_backends

from .helpers import AVX512_VNNI, cpu_has, rel_error

BF16_CPU = cpu_has(*AVX512_VNNI, "avx512_bf16") and cpu_isa.active() == cpu_isa.Isa.AVX512
needs_bf16 = pytest.mark.skipif(not BF16_CPU, reason="no AVX-512 BF16 at this ISA level")

# (rows, N, K): the default model's lm_head at 1 row, a prompt chunk, lone last blocks, odd K,
# tiny.
SHAPES = [
    (1, 49152, 576),
    (32, 1000, 576),
    (300, 96, 64),
    (9, 33, 3),
    (3, 7, 101),
    (17, 16, 64),
    (8, 50, 130),
]


def _case(rows: int, n: int, k: int, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    b = (torch.randn(n, generator=gen) * 3).bfloat16() if bias else None
    x = (torch.randn(rows, k, generator=gen) * torch.logspace(-1, 1, rows).unsqueeze(1)).bfloat16()
    return weight, b, x


def _onednn(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_matches_fp64_as_closely_as_onednn(rows: int, n: int, k: int, bias: bool) -> None:
    weight, b, x = _case(rows, n, k, bias, seed=rows * n + k)
    theirs = _onednn(weight, b, x)
    module = PackedLinear(weight, b)
    packed = module.native_packed
    padded = -(-n // 16) * 16 * -(-k // 2) * 2  # 16-channel blocks, pairs of inputs
    if packed.dtype == torch.bfloat16:  # the plain layout
        assert packed.numel() == padded
    else:  # the coded one, where it saves bytes (test_native_bf16_coded.py)
        assert packed.dtype == torch.uint8
        assert packed.numel() <= native.BF16_CODED_MAX_SHARE * 2 * padded
    assert module.packed is None  # one copy of the weights: ours
    ours = module(x)
    assert module.backend in chosen_backends()["dense"]
    assert module.backend.startswith("cpu-native-bf16-gemm")
    assert ours.shape == (rows, n) and ours.dtype == torch.bfloat16
    ref = x.double() @ weight.double().t() + (b.double() if bias else 0)
    for row in range(rows):  # each row at its own scale
        # fp32 sums in another order than oneDNN's, then one bf16 rounding: both paths' error
        # is that rounding (2^-9 relative), never more than twice oneDNN's.
        ours_error = rel_error(ours[row], ref[row])
        assert ours_error < 4e-3, row
        assert ours_error <= 2 * rel_error(theirs[row], ref[row]) + 1e-6, row


@needs_bf16
def test_the_module_takes_any_leading_shape_and_strided_rows() -> None:
    weight, _, x = _case(12, 64, 64, False, seed=1)
    module = PackedLinear(weight, None)
    flat = module(x)
    torch.testing.assert_close(module(x.reshape(3, 4, 64)), flat.reshape(3, 4, 64), rtol=0, atol=0)
    wide = torch.cat([x, x], dim=1)[:, :64]  # rows 128 elements apart
    torch.testing.assert_close(module(wide), flat, rtol=0, atol=0)
    with pytest.raises(TypeError, match="takes bf16 inputs"):
        module(x.float())  # never misread as bf16
    assert module.with_native_gemm(weight) == 0  # bf16 already has only our copy
    with pytest.raises(ValueError, match="not this module"):
        module.with_native_gemm(weight[:10])
    fp32 = PackedLinear(weight.float(), None)
    assert fp32.backend == "cpu-onednn-packed"
    assert fp32.with_native_gemm(weight.half()) == 0  # bf16 and fp32 only


@pytest.mark.skipif(not cpu_has("avx2", "fma", "f16c"), reason="this CPU has no AVX2 + FMA + F16C")
def test_the_avx2_build_never_serves_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without BF16 instructions oneDNN's matmul keeps every dense projection (and engine.dtype auto
    computes in fp32 there anyway)."""
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx2")
    cpu_isa.active.cache_clear()
    try:
        assert not native.kernels().bf16_gemm_available
        weight, _, _ = _case(4, 64, 64, False, seed=2)
        if can_pack(weight):  # oneDNN packs bf16 only where it has bf16 kernels
            module = PackedLinear(weight, None)
            assert module.backend == "cpu-onednn-packed" and module.native_packed is None
            assert module.with_native_gemm(weight) == 0
    finally:
        monkeypatch.undo()
        cpu_isa.active.cache_clear()
