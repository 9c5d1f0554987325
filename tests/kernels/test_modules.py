"""Module API: construction, validation, correctness against fp64, artifact round trip."""

from __future__ import annotations

import json

import pytest
import torch

from slimserve.kernels import (
    COMPRESSED_MODULES,
    Int8Embedding,
    Int8Linear,
    LowBitLinear,
    SparseLinear,
    W8A8Linear,
    cpu_paths,
    native,
    quantize_int8_absmax,
)
from slimserve.kernels.base import CompressedLinear, pack_model_for_cpu
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.reference import quantize_per_token_int8

from .helpers import cpu_has, lowbit_weight_fp64, random_24, random_lowbit, rel_error

# bf16 rounds the 16-bit output and activations: ~2**-8 relative per element, plus the stored
# scales/zeros rounded to the compute dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lowbit_linear_matches_fp64(bits: int, dtype: torch.dtype) -> None:
    n, k, g = 40, 128, 32
    codes, scales, zeros = random_lowbit(n, k, bits, g)
    bias = torch.randn(n)
    module = LowBitLinear.from_codes(codes, scales, zeros, g, bits, bias, dtype)
    x = _x(2 * 3, k, dtype).reshape(2, 3, k)
    # The reference uses the scales/zeros as stored (rounded to the compute dtype).
    w = lowbit_weight_fp64(codes, module.scales, module.zeros, g)
    ref = x.double() @ w.t() + module.bias.double()
    out = module(x)
    assert out.shape == (2, 3, n) and out.dtype == dtype
    tol = TOL[dtype]
    flat = x.reshape(-1, k)
    if native.w4a16_gemv_supported(flat, module.qweight, module.scales, module.zeros, g):
        # The native 4-bit GEMV (AVX2) meets int16 activation codes: half a step (row absmax /
        # 32767) per input, ~1e-4 of the output scale, far below the 4-bit weights' own error.
        tol = max(tol, 2e-4)
    assert rel_error(out, ref) < tol


def test_lowbit_packed_size_is_bits_per_weight() -> None:
    n, k = 16, 64
    for bits in (4, 3):
        codes, scales, zeros = random_lowbit(n, k, bits, 32)
        module = LowBitLinear.from_codes(codes, scales, zeros, 32, bits, None, torch.bfloat16)
        packed = module.qweight.numel() + (
            0 if module.qweight_hi is None else module.qweight_hi.numel()
        )
        assert packed * 8 == n * k * bits


def test_lowbit_rejects_bad_input() -> None:
    codes, scales, zeros = random_lowbit(8, 96, 4, 32)
    with pytest.raises(ValueError, match="group_size"):
        LowBitLinear.from_codes(codes, scales[:, :2], zeros[:, :2], 64, 4, None, torch.bfloat16)
    with pytest.raises(ValueError, match="bits"):
        LowBitLinear.from_codes(codes, scales, zeros, 32, 5, None, torch.bfloat16)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        LowBitLinear.from_codes(codes + 8, scales, zeros, 32, 3, None, torch.bfloat16)
    with pytest.raises(ValueError, match="scales"):
        LowBitLinear.from_codes(codes, scales.t(), zeros, 32, 4, None, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8a8_linear_matches_fp64(dtype: torch.dtype) -> None:
    n, k = 48, 160
    weight = torch.randn(n, k)
    qweight, wscale = quantize_int8_absmax(weight)
    module = W8A8Linear.from_quantized(qweight, wscale, torch.randn(n), dtype)
    x = _x(7, k, dtype)
    xq, xs = quantize_per_token_int8(x)
    ref = (xq.double() @ qweight.double().t()) * xs.double()[:, None] * wscale.double()
    ref = ref + module.bias.double()
    out = module(x)
    assert out.dtype == dtype
    assert rel_error(out, ref) < TOL[dtype]
    # And the whole W8A8 error against the unquantized product stays at int8 level.
    assert rel_error(out, x.double() @ weight.double().t() + module.bias.double()) < 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(48, 160), (33, 100), (5, 3)])
def test_w8a8_packed_for_cpu_gives_the_same_output(dtype: torch.dtype, n: int, k: int) -> None:
    qweight, wscale = quantize_int8_absmax(torch.randn(n, k))
    module = W8A8Linear.from_quantized(qweight, wscale, torch.randn(n), dtype)
    inputs = [_x(m, k, dtype, seed=m) for m in (1, 3, 17, 40)]
    before = [module(x) for x in inputs]
    native_cpu = cpu_has("avx2", "fma", "f16c")
    exact_onednn = cpu_paths.int8_gemms_exact()
    # oneDNN's copy (where its int8 sums are exact, with VNNI); where the native kernels run,
    # also our GEMM's (16-row blocks).
    own = -(-n // 16) * 16 * -(-k // 4) * 4 if native_cpu else 0
    assert module.pack_for_cpu() == (n * k if exact_onednn else 0) + own
    # The plain weight is dropped, unless it is kept for the exact reference.
    assert module.qweight.numel() == (0 if exact_onednn else n * k)
    for x, expected in zip(inputs, before, strict=True):
        kept = x.clone()
        out = module(x)
        torch.testing.assert_close(x, kept, rtol=0, atol=0)  # the input is not quantized in place
        # Same int32 sums and scales; only the fp32 rounding of the two rescales may differ.
        assert rel_error(out, expected.double()) < {torch.float32: 1e-6}.get(dtype, 8e-3)
    # Our GEMM (1-32 rows) and quantizer around oneDNN's (40) where the native kernels run;
    # without VNNI our GEMM at every row count, or the exact reference.
    if exact_onednn:
        expected = ["cpu-native-gemm", "cpu-onednn-packed-native-quantize"]
        expected = expected if native_cpu else ["cpu-onednn-packed"]
    else:
        expected = ["cpu-native-gemm"] if native_cpu else ["reference"]
    for backend in expected:
        assert backend in chosen_backends()["w8a8"]


@pytest.mark.skipif(
    not cpu_paths.int8_gemms_exact(),
    reason="no VNNI on this CPU (or ONEDNN_MAX_CPU_ISA below it): oneDNN's int8 GEMMs saturate",
)
def test_w8a8_without_onednn_int8_stays_on_int_mm(monkeypatch) -> None:
    # Injected on purpose: a torch build without oneDNN's int8 ops.
    monkeypatch.setattr(cpu_paths, "onednn_int8_supported", lambda: False)
    qweight, wscale = quantize_int8_absmax(torch.randn(24, 64))
    module = W8A8Linear.from_quantized(qweight, wscale, None, torch.bfloat16)
    x = _x(5, 64, torch.bfloat16)
    before = module(x)
    assert module.pack_for_cpu() == 0
    assert module.cpu_pack is None and torch.equal(module.qweight, qweight)
    torch.testing.assert_close(module(x), before, rtol=0, atol=0)


def test_pack_model_for_cpu_reaches_nested_modules() -> None:
    qweight, wscale = quantize_int8_absmax(torch.randn(24, 64))
    nested = W8A8Linear.from_quantized(qweight, wscale, None, torch.bfloat16)
    wrapper = torch.nn.Module()
    wrapper.inner = nested  # as LLM.int8's mixed module holds its int8 part
    int8 = Int8Linear(qweight, wscale.to(torch.bfloat16), None, torch.bfloat16)
    model = torch.nn.Sequential(wrapper, int8)
    expected = W8A8Linear.from_quantized(qweight, wscale, None, torch.bfloat16).pack_for_cpu()
    expected += Int8Linear(qweight, wscale, None, torch.bfloat16).pack_for_cpu()
    assert pack_model_for_cpu(model) == expected
    assert (nested.cpu_pack is not None or nested.cpu_native_pack is not None) == (expected > 0)


def test_every_compressed_linear_shares_the_base() -> None:
    linears = [cls for cls in COMPRESSED_MODULES if cls is not Int8Embedding]
    assert all(issubclass(cls, CompressedLinear) for cls in linears)


def test_w8a8_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="int8"):
        W8A8Linear.from_quantized(torch.zeros(4, 8), torch.ones(4), None, torch.bfloat16)
    with pytest.raises(ValueError, match="weight_scale"):
        W8A8Linear.from_quantized(
            torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), None, torch.bfloat16
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_linear_matches_fp64(dtype: torch.dtype) -> None:
    n, k = 36, 136
    weight = random_24(n, k)
    module = SparseLinear.from_dense(weight, None, dtype)
    assert module.values.shape == (n, k // 2)
    x = _x(5, k, dtype)
    ref = x.double() @ weight.to(dtype).double().t()
    out = module(x)
    assert out.dtype == dtype
    assert rel_error(out, ref) < TOL[dtype]


def test_sparse_rejects_bad_input() -> None:
    dense = torch.randn(8, 16)
    with pytest.raises(ValueError, match="not 2:4"):
        SparseLinear.from_dense(dense, None, torch.bfloat16)
    with pytest.raises(ValueError, match="divisible by 4"):
        SparseLinear.from_dense(torch.zeros(8, 18), None, torch.bfloat16)


def _modules() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    codes4, s4, z4 = random_lowbit(24, 64, 4, 32)
    codes3, s3, z3 = random_lowbit(24, 64, 3, 16, seed=3)
    q, s = quantize_int8_absmax(torch.randn(24, 64))
    return [
        LowBitLinear.from_codes(codes4, s4, z4, 32, 4, torch.randn(24), torch.bfloat16),
        LowBitLinear.from_codes(codes3, s3, z3, 16, 3, None, torch.float16),
        W8A8Linear.from_quantized(q, s, torch.randn(24), torch.bfloat16),
        SparseLinear.from_dense(random_24(24, 64), torch.randn(24), torch.float32),
        Int8Linear(q, s.to(torch.bfloat16), torch.randn(24), torch.bfloat16),
        Int8Embedding(q, s.to(torch.bfloat16)),
    ]


@pytest.mark.parametrize("module", _modules(), ids=lambda m: type(m).__name__)
def test_artifact_round_trip(module: torch.nn.Module) -> None:
    meta = json.loads(json.dumps(module.meta()))  # must survive JSON
    state = {name: t.clone() for name, t in module.state_dict().items()}
    assert state, "packed state must live in registered buffers"
    fresh = type(module).from_meta(meta)
    assert fresh.meta() == module.meta()
    for name, t in fresh.state_dict().items():
        assert t.shape == state[name].shape and t.dtype == state[name].dtype, name
    fresh.load_state_dict(state, strict=True)
    if isinstance(module, Int8Embedding):
        x = torch.tensor([[0, 5, 23], [7, 7, 1]])
    else:
        x = torch.randn(3, module.in_features).to(
            module.bias.dtype if module.bias is not None else module.scales.dtype
        )
    torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)


def test_every_compressed_module_has_the_protocol() -> None:
    for cls in COMPRESSED_MODULES:
        assert callable(getattr(cls, "meta", None)) and callable(getattr(cls, "from_meta", None))
    assert {type(m) for m in _modules()} == set(COMPRESSED_MODULES)


def test_from_meta_rejects_incomplete_meta() -> None:
    with pytest.raises(ValueError, match="missing"):
        LowBitLinear.from_meta({"in_features": 64, "out_features": 8})
    with pytest.raises(ValueError, match="dtype"):
        W8A8Linear.from_meta(
            {"in_features": 64, "out_features": 8, "has_bias": False, "dtype": "int3"}
        )


def test_round_trip_through_a_parent_module_rebuilds_derived_state() -> None:
    """The artifact cache loads whole models: the CPU int4pack copy must follow the new weights."""
    codes, scales, zeros = random_lowbit(32, 128, 4, 64)
    source = torch.nn.Sequential(
        LowBitLinear.from_codes(codes, scales, zeros, 64, 4, None, torch.bfloat16)
    )
    target = torch.nn.Sequential(LowBitLinear.from_meta(source[0].meta()))
    assert "0.cpu_qweight" not in source.state_dict()  # derived, never saved
    target.load_state_dict(source.state_dict())
    assert target[0].cpu_qweight is not None
    assert torch.equal(target[0].cpu_qweight, source[0].cpu_qweight)
    x = torch.randn(2, 128).to(torch.bfloat16)
    assert torch.equal(target(x), source(x))


def test_device_or_dtype_moves_rebuild_the_cpu_copy() -> None:
    codes, scales, zeros = random_lowbit(32, 128, 4, 64)
    module = LowBitLinear.from_codes(codes, scales, zeros, 64, 4, None, torch.bfloat16)
    before = module.cpu_qweight
    module.to("cpu")
    assert module.cpu_qweight is not None and torch.equal(module.cpu_qweight, before)
