"""The native kernels' own thread pool (kernels/cpu_threads.{h,cpp}): every matmul kernel and the
decode attention give the same bits whether a call runs on 1, 2 or 3 threads (each output
channel, or each sequence, is computed whole by one thread, so the split must not change a sum),
at ragged channel counts that leave threads uneven or empty shares; the pool keeps working in a
forked child; bad counts are refused."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator

import pytest
import torch

from slimserve.kernels import native
from slimserve.kernels.packing import compress_24, pack_24_blocks, pack_int4

from .helpers import random_24

pytestmark = pytest.mark.usefixtures("each_isa")

# (rows, N, K): N=1 leaves every thread but one without work; 37 splits unevenly; 1000 and the
# wide one split across many 16-channel blocks.
SHAPES = [(1, 1, 64), (3, 37, 96), (8, 1000, 576), (2, 3072, 64)]
THREADS = (1, 2, 3)


@pytest.fixture
def kernels() -> Iterator[native.NativeKernels]:
    loaded = native.kernels()
    assert loaded is not None
    yield loaded
    loaded.set_threads(1)


def _same_at_every_count(kernels: native.NativeKernels, call: Callable[[], torch.Tensor]) -> None:
    results = []
    for threads in THREADS:
        kernels.set_threads(threads)
        assert kernels.threads == threads
        results.append(call())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=0)


def _x(rows: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, k, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_w8a16_is_thread_count_independent(kernels, rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n)
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen).bfloat16()
    x = _x(rows, k, torch.bfloat16, seed=k)
    _same_at_every_count(kernels, lambda: kernels.w8a16_gemv(x, weight, scale))


@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_w8a8_is_thread_count_independent(kernels, rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + 1)
    packed = kernels.w8a8_pack(torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8))
    scale = torch.rand(n, generator=gen)
    x = _x(rows, k, torch.float32, seed=k + 1)
    _same_at_every_count(kernels, lambda: kernels.w8a8_gemm(x, packed, scale))


@pytest.mark.parametrize(("rows", "n", "k"), SHAPES)
def test_f32_gemm_is_thread_count_independent(kernels, rows: int, n: int, k: int) -> None:
    rows = min(rows, kernels.f32_gemm_max_rows)
    gen = torch.Generator().manual_seed(n + 2)
    packed = kernels.f32_pack(torch.randn(n, k, generator=gen))
    bias = torch.randn(n, generator=gen)
    x = _x(rows, k, torch.float32, seed=k + 2)
    _same_at_every_count(kernels, lambda: kernels.f32_gemm(x, packed, n, bias))


@pytest.mark.parametrize(("rows", "n", "k"), [*SHAPES, (77, 40, 130)])
def test_bf16_gemm_is_thread_count_independent(kernels, rows: int, n: int, k: int) -> None:
    if not kernels.bf16_gemm_available:
        pytest.skip("no AVX-512 BF16 at this ISA level")
    gen = torch.Generator().manual_seed(n + 3)
    weight = torch.randn(n, k, generator=gen).bfloat16()
    x = _x(rows, k, torch.bfloat16, seed=k + 3)
    for packed in (kernels.bf16_pack(weight, coded=False), kernels.bf16_coded_pack(weight)):
        _same_at_every_count(kernels, lambda p=packed: kernels.bf16_gemm(x, p, n, None))


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 40, 64), (9, 1000, 576)])
def test_sparse24_bf16_is_thread_count_independent(kernels, rows: int, n: int, k: int) -> None:
    """The 2:4 bf16 blocks and their coded layout."""
    if not kernels.bf16_gemm_available:
        pytest.skip("no AVX-512 BF16 at this ISA level")
    values, meta = compress_24(random_24(n, k, seed=n + 5).bfloat16())
    blocks, codes = pack_24_blocks(values, meta, k, native.SPARSE24_BLOCKS[torch.bfloat16])
    coded = kernels.sparse24_coded_pack(blocks, codes, n, k, always=True)
    x = _x(rows, k, torch.bfloat16, seed=k + 5)
    _same_at_every_count(kernels, lambda: kernels.sparse24_gemm(x, blocks, codes, n))
    _same_at_every_count(kernels, lambda: kernels.sparse24_gemm(x, coded, None, n))


@pytest.mark.parametrize(("rows", "n", "k"), [(1, 1, 64), (3, 37, 128), (8, 1000, 576)])
def test_w4a16_is_thread_count_independent(kernels, rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + 4)
    qweight = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    scales = (torch.rand(n, k // 32, generator=gen) * 0.02).bfloat16()
    zeros = (torch.rand(n, k // 32, generator=gen) * 15).bfloat16()
    x = _x(rows, k, torch.bfloat16, seed=k + 4)
    _same_at_every_count(kernels, lambda: kernels.w4a16_gemv(x, qweight, scales, zeros, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 3, 9])
def test_decode_attention_is_thread_count_independent(kernels, batch: int, dtype) -> None:
    """Sequences at ragged positions shared out across threads: the same outputs and the same
    cached keys and values at every count."""
    heads, kv_heads, dim, max_len = 6, 2, 32, 40
    gen = torch.Generator().manual_seed(batch)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    cos = torch.randn(max_len, dim, generator=gen).to(dtype)
    sin = torch.randn(max_len, dim, generator=gen).to(dtype)
    caches = torch.randn(2, batch, kv_heads, max_len, dim, generator=gen).to(dtype)
    positions = torch.tensor([(7 * b + 3) % max_len for b in range(batch)])

    def attend() -> torch.Tensor:
        k_cache, v_cache = caches[0].clone(), caches[1].clone()
        out = kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, positions, heads, 0.25)
        return torch.cat([out.flatten(), k_cache.flatten(), v_cache.flatten()])

    _same_at_every_count(kernels, attend)


def _child_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, queue) -> None:
    loaded = native.kernels()
    assert loaded is not None and loaded.threads == 2  # inherited through the fork
    queue.put(loaded.w8a16_gemv(x, weight, scale).tolist())  # plain data across the pipe


def test_a_forked_child_makes_its_own_workers(kernels) -> None:
    """Threads do not survive fork(): the child's first parallel call must make new workers,
    not wait for the parent's."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randint(-127, 128, (1000, 64), generator=gen, dtype=torch.int8)
    scale = torch.rand(1000, generator=gen)
    x = _x(2, 64, torch.float32, seed=5)
    kernels.set_threads(2)
    expected = kernels.w8a16_gemv(x, weight, scale)  # the parent's workers exist now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_gemv, args=(x, weight, scale, queue))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert result == expected.tolist()


def test_thread_counts_below_one_are_refused(kernels) -> None:
    with pytest.raises(ValueError, match="kernel threads must be >= 1"):
        kernels.set_threads(0)
