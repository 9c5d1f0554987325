"""torch's CPU kernels behind the dispatch: results against fp64 references, the shape limits the
dispatch checks, and the choice by batch size."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from slimserve.kernels import (
    Int8Linear,
    LowBitLinear,
    SparseLinear,
    W8A8Linear,
    cpu_paths,
    int8_weight_matmul,
    lowbit_weight_matmul,
    native,
    quantize_int8_absmax,
    quantize_per_token_int8,
    w8a8_matmul,
)
from slimserve.kernels.dispatch import chosen_backends
from slimserve.kernels.int8 import select_w8a16_backend
from slimserve.kernels.lowbit import select_lowbit_backend
from slimserve.kernels.sparse24 import select_sparse24_backend
from slimserve.kernels.w8a8 import select_w8a8_backend

from .helpers import lowbit_weight_fp64, random_24, random_lowbit, rel_error


def native_gemv_rows() -> int:
    """Rows slimserve's own W8A16 GEMV takes at the active level (2 at avx512, 32 at avx2)."""
    loaded = native.serving_kernels()
    return 0 if loaded is None else loaded.w8a16_max_rows


def expected_w8a16(rows: int, k: int) -> str:
    if rows <= native_gemv_rows():
        return "cpu-native-gemv"
    if k % 16 == 0 and rows <= cpu_paths.W8A16_INT8PACK_MAX_M:
        return "cpu-int8pack"
    return "cpu-dequant-matmul"


# oneDNN's int8 GEMMs saturate 16-bit pair sums without VNNI: slimserve never calls them there
# (test_native_build.py shows both the saturation and the exact paths that replace them).
needs_exact_onednn_int8 = pytest.mark.skipif(
    not cpu_paths.int8_gemms_exact(),
    reason="no VNNI on this CPU (or ONEDNN_MAX_CPU_ISA below it): oneDNN's int8 GEMMs saturate",
)

BOUND = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k"), [(40, 128), (50, 576), (7, 1536)])
def test_int8pack_matches_fp64(dtype: torch.dtype, n: int, k: int) -> None:
    qweight, scale = quantize_int8_absmax(torch.randn(n, k))
    scale = scale.to(dtype)
    ref_w = qweight.double() * scale.double()[:, None]
    for m in (1, 7, cpu_paths.W8A16_INT8PACK_MAX_M):
        x = _x(m, k, dtype, seed=m)
        assert cpu_paths.int8pack_supported(x, k)
        out = cpu_paths.int8pack_matmul(x, qweight, scale)
        assert rel_error(out, x.double() @ ref_w.t()) < BOUND[dtype]
        out = cpu_paths.int8_dequant_matmul(x, qweight, scale)
        assert rel_error(out, x.double() @ ref_w.t()) < BOUND[dtype]


@needs_exact_onednn_int8
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k"), [(40, 128), (50, 576), (7, 1536), (33, 100), (5, 3)])
def test_onednn_int8_matches_the_exact_w8a8_product(dtype: torch.dtype, n: int, k: int) -> None:
    qweight, wscale = quantize_int8_absmax(torch.randn(n, k))
    packed, zero_points = cpu_paths.onednn_int8_prepack(qweight)
    for m in (1, 3, 17, 40):
        x = _x(m, k, dtype, seed=m) * 3
        xq, xs = quantize_per_token_int8(x)
        codes, scale = cpu_paths.quantize_per_token_uint8(x)
        assert torch.equal(codes.int(), xq.int() + 128)
        torch.testing.assert_close(scale[:, 0], xs, rtol=0, atol=0)
        ref = (xq.double() @ qweight.double().t()) * xs.double()[:, None] * wscale.double()
        out = cpu_paths.onednn_int8_matmul(x, packed, wscale, zero_points)
        assert out.dtype == dtype
        assert rel_error(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k", "g"), [(48, 128, 32), (64, 576, 64), (16, 256, 128)])
def test_int4pack_matches_fp64(bits: int, dtype: torch.dtype, n: int, k: int, g: int) -> None:
    codes, scales, zeros = random_lowbit(n, k, bits, g, seed=k + bits)
    module = LowBitLinear.from_codes(codes, scales, zeros, g, bits, None, dtype)
    assert module.cpu_qweight is not None, "shape is int4pack-compatible: the copy must exist"
    ref_w = lowbit_weight_fp64(codes, module.scales, module.zeros, g)
    for m in (1, 7, cpu_paths.LOWBIT_INT4PACK_MAX_M):
        x = _x(m, k, dtype, seed=m)
        out = cpu_paths.int4pack_matmul(x, module.cpu_qweight, g, module.cpu_scales_zeros)
        # zf = (8 - z) * s is rounded to the activation dtype: one more rounding than the reference.
        assert rel_error(out, x.double() @ ref_w.t()) < 1.5 * BOUND[dtype]


@needs_exact_onednn_int8
@pytest.mark.parametrize(("m", "k"), [(1, 72), (7, 576), (33, 100), (128, 256)])
def test_int_mm_is_exact(m: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m + k)
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (40, k), generator=gen, dtype=torch.int8)
    assert torch.equal(cpu_paths.int_mm(a, b), (a.long() @ b.long().t()).int())


def test_fast_path_limits_are_checked_not_caught() -> None:
    x = _x(1, 72, torch.bfloat16)
    assert not cpu_paths.int8pack_supported(x, 72)  # would read out of bounds
    assert cpu_paths.int8pack_supported(_x(1, 80, torch.bfloat16), 80)
    assert not cpu_paths.int8pack_supported(_x(1, 80, torch.bfloat16).to(torch.float64), 80)
    assert not cpu_paths.int4pack_supported(50, 128, 32)  # N % 16
    assert not cpu_paths.int4pack_supported(48, 128, 16)  # group size
    assert not cpu_paths.int4pack_supported(48, 96, 64)  # K % group
    assert cpu_paths.int4pack_supported(1536, 576, 64)


def test_unsupported_lowbit_shape_has_no_cpu_copy_and_uses_the_reference() -> None:
    codes, scales, zeros = random_lowbit(24, 64, 4, 16)
    module = LowBitLinear.from_codes(codes, scales, zeros, 16, 4, None, torch.bfloat16)
    assert module.cpu_qweight is None
    x = _x(3, 64, torch.bfloat16)
    assert select_lowbit_backend(x, None) == "reference"
    ref = x.double() @ lowbit_weight_fp64(codes, module.scales, module.zeros, 16).t()
    assert rel_error(module(x), ref) < BOUND[torch.bfloat16]


def test_dispatch_chooses_by_batch_size_on_cpu() -> None:
    k = 576
    qweight, scale = quantize_int8_absmax(torch.randn(48, k))
    scale = scale.to(torch.bfloat16)
    for rows in (1, 2, 3, 8, cpu_paths.W8A16_INT8PACK_MAX_M, 32, 33):
        for dtype in (torch.bfloat16, torch.float32):
            x = _x(rows, k, dtype)
            assert select_w8a16_backend(x, qweight, scale) == expected_w8a16(rows, k), (rows, dtype)
    q72, s72 = quantize_int8_absmax(torch.randn(48, 72))
    for rows in (1, 9):  # K % 16 != 0: no int8pack
        x = _x(rows, 72, torch.bfloat16)
        assert select_w8a16_backend(x, q72, s72) == expected_w8a16(rows, 72)

    codes, scales, zeros = random_lowbit(64, k, 4, 64)
    module = LowBitLinear.from_codes(codes, scales, zeros, 64, 4, None, torch.bfloat16)
    pack = (module.cpu_qweight, module.cpu_scales_zeros)
    m_max = cpu_paths.LOWBIT_INT4PACK_MAX_M
    assert select_lowbit_backend(_x(m_max, k, torch.bfloat16), pack) == "cpu-int4pack"
    assert select_lowbit_backend(_x(m_max + 1, k, torch.bfloat16), pack) == "reference"
    # the copy is in the compute dtype: other activation dtypes must not reach it
    assert select_lowbit_backend(_x(1, k, torch.float16), pack) == "reference"

    exact_int8 = "cpu-int-mm" if cpu_paths.int8_gemms_exact() else "reference"
    assert select_w8a8_backend(_x(64, k, torch.bfloat16)) == exact_int8
    assert select_sparse24_backend(_x(1, k, torch.bfloat16)) == "reference"


def test_ops_record_the_backend_they_ran() -> None:
    k = 128
    qweight, scale = quantize_int8_absmax(torch.randn(32, k))
    int8_weight_matmul(_x(1, k, torch.bfloat16), qweight, scale.to(torch.bfloat16))
    int8_weight_matmul(_x(1, k, torch.float32), qweight, scale)
    w8a8_matmul(_x(2, k, torch.bfloat16), qweight, scale)
    codes, scales, zeros = random_lowbit(32, k, 3, 32)
    module = LowBitLinear.from_codes(codes, scales, zeros, 32, 3, None, torch.bfloat16)
    module(_x(1, k, torch.bfloat16))
    backends = chosen_backends()
    assert expected_w8a16(1, k) in backends["w8a16"]
    assert ("cpu-int-mm" if cpu_paths.int8_gemms_exact() else "reference") in backends["w8a8"]
    assert "cpu-int4pack" in backends["w3a16"]


@pytest.mark.parametrize("m", [1, cpu_paths.LOWBIT_INT4PACK_MAX_M + 3])
def test_every_module_matches_fp64_through_the_dispatch(m: int) -> None:
    """Below and above the batch thresholds, the module outputs stay on the fp64 reference."""
    dtype, n, k = torch.bfloat16, 64, 576
    x = _x(m, k, dtype, seed=m)
    weight = torch.randn(n, k)
    qweight, scale = quantize_int8_absmax(weight)
    int8 = Int8Linear(qweight, scale.to(dtype), None, dtype)
    ref = x.double() @ (qweight.double() * int8.scale.double()[:, None]).t()
    assert rel_error(int8(x), ref) < BOUND[dtype]

    w8a8 = W8A8Linear.from_quantized(qweight, scale, None, dtype)
    xq, xs = quantize_per_token_int8(x)
    ref = (xq.double() @ qweight.double().t()) * xs.double()[:, None] * scale.double()
    assert rel_error(w8a8(x), ref) < BOUND[dtype]

    codes, scales, zeros = random_lowbit(n, k, 4, 64)
    low = LowBitLinear.from_codes(codes, scales, zeros, 64, 4, None, dtype)
    ref = x.double() @ lowbit_weight_fp64(codes, low.scales, low.zeros, 64).t()
    assert rel_error(low(x), ref) < 1.5 * BOUND[dtype]
    out = lowbit_weight_matmul(
        x, low.qweight, low.scales, low.zeros, bits=4, group_size=64
    )  # no CPU copy passed: the reference path
    assert rel_error(out, ref) < BOUND[dtype]

    w24 = random_24(n, k)
    sparse = SparseLinear.from_dense(w24, None, dtype)
    assert rel_error(sparse(x), x.double() @ w24.to(dtype).double().t()) < BOUND[dtype]


_PROBE = textwrap.dedent(
    """
    import torch
    from slimserve.kernels import cpu_paths

    def at_page_end(src):
        # The tensor ends exactly where its own large (mmap'd) allocation ends, so a kernel that
        # reads past the end touches an unmapped page and crashes instead of reading garbage.
        flat = torch.empty(src.numel() + (1 << 20), dtype=src.dtype)
        out = flat[-src.numel():].view(src.shape)
        out.copy_(src)
        return out

    ran = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for k in (8, 24, 72, 100, 64, 576):
            for m in (1, 7):
                x = at_page_end(torch.randn(m, k).to(dtype))
                w = at_page_end(torch.randint(-127, 128, (50, k), dtype=torch.int8))
                s = at_page_end(torch.rand(50).to(dtype))
                if cpu_paths.int8pack_supported(x, k):
                    for _ in range(5):
                        cpu_paths.int8pack_matmul(x, w, s)
                    ran += 1
                xq = at_page_end(torch.randint(-127, 128, (m, k), dtype=torch.int8))
                cpu_paths.int_mm(xq, w)
                for g in (32, 64, 128):
                    if not cpu_paths.int4pack_supported(48, k, g):
                        continue
                    codes = torch.randint(0, 16, (48, k))
                    scales = torch.rand(48, k // g)
                    packed, sz = cpu_paths.int4pack_prepare(codes, scales, scales, dtype)
                    cpu_paths.int4pack_matmul(x, packed, g, at_page_end(sz))
                    ran += 1
    print("ran", ran)
    """
)


def test_cpu_fast_paths_stay_in_bounds_for_every_accepted_shape() -> None:
    """torch._weight_int8pack_mm (bf16, K % 16 != 0) reads past its inputs; the dispatch check
    must keep such shapes away. Run in a child process: the failure mode is a crash."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert int(proc.stdout.split()[-1]) > 0


def test_chunked_references_match_fp64_past_one_chunk() -> None:
    """The references expand the weight in row chunks; cover a weight larger than one chunk."""
    from slimserve.kernels.reference import CHUNK_BYTES

    k = 64
    n = CHUNK_BYTES // (2 * k) + 37
    x = _x(3, k, torch.bfloat16)
    qweight, scale = quantize_int8_absmax(torch.randn(n, k))
    scale = scale.to(torch.bfloat16)
    ref = x.double() @ (qweight.double() * scale.double()[:, None]).t()
    assert rel_error(cpu_paths.int8_dequant_matmul(x, qweight, scale), ref) < 1.6e-2
    w24 = random_24(n, k)
    sparse = SparseLinear.from_dense(w24, None, torch.bfloat16)
    ref = x.double() @ w24.to(torch.bfloat16).double().t()
    assert rel_error(sparse(x), ref) < 1.6e-2
    codes, scales, zeros = random_lowbit(n, k, 4, 32)
    low = LowBitLinear.from_codes(codes, scales, zeros, 32, 4, None, torch.bfloat16)
    out = lowbit_weight_matmul(x, low.qweight, low.scales, low.zeros, bits=4, group_size=32)
    ref = x.double() @ lowbit_weight_fp64(codes, low.scales, low.zeros, 32).t()
    assert rel_error(out, ref) < 1.6e-2
