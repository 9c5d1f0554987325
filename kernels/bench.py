"""Micro-benchmarks: every compressed matmul against the dense 16-bit matmul, side by side.

    python -m slimserve.kernels.bench                  # the table (default model shapes + 4096^2)
    python -m slimserve.kernels.bench --thresholds     # batch-size crossovers for the CPU dispatch

Timings interleave the dense baseline and each compressed op in every round (the machine may be
shared), and report medians over rounds: the time, and the per-round dense/compressed ratio.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_paths, dense_cpu, native
from .dispatch import chosen_backends
from .int8 import Int8Linear, quantize_int8_absmax, select_w8a16_backend
from .lowbit import LowBitLinear, select_lowbit_backend
from .reference import lowbit_matmul_reference
from .sparse24 import SparseLinear, select_sparse24_backend
from .w8a8 import W8A8Linear, select_w8a8_backend

log = logging.getLogger("slimserve.kernels.bench")

# (N, K) of the default model (SmolLM2-135M: hidden 576, intermediate 1536, vocab 49152) + 4096^2.
MODEL_SHAPES = [(1536, 576), (576, 1536), (576, 576), (49152, 576), (4096, 4096)]
BATCH_SIZES = [1, 4, 8, 16, 32]
OPS = ("w8a16", "w8a16-packed", "w8a16-int8pack", "w4a16", "w3a16")
OPS += ("w8a8", "w8a8-packed", "w8a8-onednn", "sparse24", "sparse24-packed")
# Forced paths for side-by-side rows: torch's int8pack, oneDNN's packed int8 GEMM; and the 2:4
# weight packed for our CPU kernel, as the engine serves it.
CPU_ONLY_OPS = ("w8a16-int8pack", "w8a8-onednn", "sparse24-packed")
GROUP_SIZE = 64  # K=576 allows 32 or 64 with the CPU int4 kernel, not 128


class _Int8PackOnly(Int8Linear):
    """W8A16 always on torch's int8pack: the baseline our own GEMV replaced at 1-2 rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_paths.int8pack_matmul(x, self.qweight, self.scale)


@dataclass
class Row:
    op: str
    m: int
    n: int
    k: int
    backend: str
    seconds: float
    weight_bytes: int
    speedup: float  # dense 16-bit time / this time, median of per-round ratios

    def cells(self) -> list[str]:
        moved = self.weight_bytes + 2 * self.m * (self.n + self.k)
        return [
            self.op,
            f"{self.m}x{self.n}x{self.k}",
            self.backend,
            f"{self.seconds * 1e6:.1f}",
            f"{moved / self.seconds / 1e9:.1f}",
            f"{2 * self.m * self.n * self.k / self.seconds / 1e12:.3f}",
            f"{self.speedup:.2f}x",
        ]


HEADER = ["op", "MxNxK", "backend", "time us", "GB/s", "TFLOP/s", "vs dense"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _burst(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _iters_for(fn: Callable[[], object], device: torch.device, target_s: float) -> int:
    fn()
    one = min(_burst(fn, 1, device) for _ in range(5))
    return max(2, min(200, int(target_s / max(one, 1e-7))))


# Each round times every candidate back to back; within a round a candidate's time is the best of
# SUB_BURSTS short bursts, which drops bursts that lost the CPU to another process. The reported
# time and ratio are medians over rounds.
SUB_BURSTS = 3


def compare(
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int,
    target_s: float,
) -> dict[str, tuple[float, float]]:
    """Median time per call and median ratio to the "dense" entry, interleaved per round."""
    iters = {name: _iters_for(fn, device, target_s) for name, fn in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(min(_burst(fn, iters[name], device) for _ in range(SUB_BURSTS)))
    dense = times["dense"]
    return {
        name: (
            statistics.median(ts),
            statistics.median(d / t for d, t in zip(dense, ts, strict=True)),
        )
        for name, ts in times.items()
    }


def _modules(
    n: int, k: int, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.nn.Module]:
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen) * 0.02
    qweight, scale = quantize_int8_absmax(weight)
    mods: dict[str, torch.nn.Module] = {}
    mods["w8a16"] = Int8Linear(qweight, scale.to(dtype), None, dtype)
    mods["w8a16-int8pack"] = _Int8PackOnly(qweight, scale.to(dtype), None, dtype)
    # As the engine serves it on CPU: our W8A16 GEMM's copy where the avx512 kernels load.
    mods["w8a16-packed"] = Int8Linear(qweight, scale.to(dtype), None, dtype)
    for bits in (4, 3):
        codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
        scales = torch.rand(n, k // GROUP_SIZE, generator=gen) * 0.01
        zeros = torch.full((n, k // GROUP_SIZE), float(1 << (bits - 1)))
        mods[f"w{bits}a16"] = LowBitLinear.from_codes(
            codes, scales, zeros, GROUP_SIZE, bits, None, dtype
        )
    mods["w8a8"] = W8A8Linear.from_quantized(qweight, scale, None, dtype)
    # As the engine serves it on CPU: the weight in oneDNN's int8 layout and, where the native
    # kernels load, our few-row GEMM's (a no-op elsewhere); "-onednn" keeps oneDNN's only.
    mods["w8a8-packed"] = W8A8Linear.from_quantized(qweight, scale, None, dtype)
    mods["w8a8-onednn"] = W8A8Linear.from_quantized(qweight, scale, None, dtype)
    mask = torch.rand(n, k // 4, 4, generator=gen).argsort(-1) < 2
    sparse = (weight.reshape(n, k // 4, 4) * mask).reshape(n, k)
    mods["sparse24"] = SparseLinear.from_dense(sparse, None, dtype)
    mods["sparse24-packed"] = SparseLinear.from_dense(sparse, None, dtype)
    mods = {name: mod.to(device) for name, mod in mods.items()}
    if device.type == "cpu":
        mods["sparse24-packed"].pack_for_cpu()
        mods["w8a16-packed"].pack_for_cpu()
        mods["w8a8-packed"].pack_for_cpu()
        mods["w8a8-onednn"].pack_for_cpu()
        mods["w8a8-onednn"].cpu_native_pack = None
    return mods


def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the chosen kernel reads: the CPU int4pack copy replaces the packed codes there."""
    skip = set()
    if isinstance(module, LowBitLinear) and module.cpu_qweight is not None:
        skip = {"qweight", "qweight_hi", "scales", "zeros"}
    packed = 0
    if isinstance(module, W8A8Linear) and module.cpu_pack is not None:
        packed = module.in_features * module.out_features  # int8, in one of the packed layouts
    if isinstance(module, Int8Linear) and module.cpu_native_pack is not None:
        packed = module.in_features * module.out_features  # the packed copy replaces qweight
    if isinstance(module, SparseLinear) and module.cpu_values is not None:
        packed = module.pack_for_cpu()  # already packed: the copy's bytes (values + codes)
    return packed + sum(
        b.numel() * b.element_size()
        for name, b in module.named_buffers()
        if b is not None and name not in skip
    )


def _backend(op: str, module: torch.nn.Module, x: torch.Tensor) -> str:
    if op in ("w8a16", "w8a16-packed"):
        if module.cpu_native_pack is not None:
            return module.cpu_native_backend
        return select_w8a16_backend(x, module.qweight, module.scale)
    if op == "w8a16-int8pack":
        return "cpu-int8pack"
    if op in ("w4a16", "w3a16"):
        pack = None if module.cpu_qweight is None else (module.cpu_qweight, module.cpu_scales_zeros)
        return select_lowbit_backend(x, pack)
    if op in ("w8a8-packed", "w8a8-onednn") and module.cpu_pack is not None:
        own = module.cpu_native_pack is not None
        if own and native.w8a8_gemm_supported(x, module.in_features):
            return "cpu-native-gemm"
        ours = native.quantize_rows_supported(x)
        return "cpu-onednn-packed-native-quantize" if ours else "cpu-onednn-packed"
    if op.startswith("w8a8"):
        return select_w8a8_backend(x)
    if op == "sparse24-packed" and module.cpu_values is not None:
        return "cpu-native-sparse24"
    return select_sparse24_backend(x)


def run_table(
    shapes: list[tuple[int, int]],
    batch_sizes: list[int],
    ops: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    target_s: float,
) -> list[Row]:
    rows: list[Row] = []
    if device.type != "cpu":
        ops = tuple(op for op in ops if op not in CPU_ONLY_OPS)
    for n, k in shapes:
        dense_w = (torch.randn(n, k) * 0.02).to(dtype=dtype, device=device)
        mods = _modules(n, k, dtype, device)
        for m in batch_sizes:
            x = torch.randn(m, k, device=device).to(dtype)
            candidates: dict[str, Callable[[], object]] = {
                "dense": functools.partial(F.linear, x, dense_w)
            }
            # The engine's own dense path on CPU (weight packed once), for context.
            packed = dense_cpu.PackedLinear(dense_w, None) if dense_cpu.can_pack(dense_w) else None
            if packed is not None:
                candidates["dense-packed"] = functools.partial(packed, x)
            for op in ops:
                candidates[op] = functools.partial(mods[op], x)
            with torch.inference_mode():
                result = compare(candidates, device, rounds, target_s)
            t_dense, _ = result["dense"]
            dense_bytes = n * k * dense_w.element_size()
            label = f"{dtype_str(dtype)} F.linear"
            rows.append(Row("dense", m, n, k, label, t_dense, dense_bytes, 1.0))
            if packed is not None:
                t, ratio = result["dense-packed"]
                rows.append(Row("dense-packed", m, n, k, packed.backend, t, dense_bytes, ratio))
            for op in ops:
                t, ratio = result[op]
                rows.append(
                    Row(op, m, n, k, _backend(op, mods[op], x), t, _weight_bytes(mods[op]), ratio)
                )
            log.info("measured %dx%dx%d", m, n, k)
    return rows


def run_thresholds(
    shapes: list[tuple[int, int]],
    device: torch.device,
    dtype: torch.dtype,
    rounds: int,
    target_s: float,
) -> list[tuple[str, int, int, int, float, float, float]]:
    """Fast path vs the large-batch path of the same format, forced, at growing M."""
    out = []
    for n, k in shapes:
        mods = _modules(n, k, dtype, device)
        w8 = mods["w8a16"]
        low = mods["w4a16"]
        for m in (1, 8, 12, 16, 24, 32, 48, 64):
            x = torch.randn(m, k).to(dtype)
            partial = functools.partial
            cands: dict[str, Callable[[], object]] = {
                "dense": partial(cpu_paths.int8_dequant_matmul, x, w8.qweight, w8.scale),
                "int8pack": partial(cpu_paths.int8pack_matmul, x, w8.qweight, w8.scale),
                "lowbit-ref": partial(
                    lowbit_matmul_reference,
                    x,
                    low.qweight,
                    None,
                    low.scales,
                    low.zeros,
                    4,
                    GROUP_SIZE,
                ),
                "int4pack": partial(
                    cpu_paths.int4pack_matmul, x, low.cpu_qweight, GROUP_SIZE, low.cpu_scales_zeros
                ),
            }
            with torch.inference_mode():
                r = compare(cands, device, rounds, target_s)
            # "dense" here is the int8 de-quantize + matmul path: ratio > 1 means int8pack wins.
            out.append(("w8a16", m, n, k, r["int8pack"][0], r["dense"][0], r["int8pack"][1]))
            ratio4 = statistics.median([r["lowbit-ref"][0] / r["int4pack"][0]])
            out.append(("w4a16", m, n, k, r["int4pack"][0], r["lowbit-ref"][0], ratio4))
            log.info("thresholds %dx%dx%d", m, n, k)
    return out


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # float32: what engine.dtype "auto" computes in on CPUs without AVX-512 BF16 (with --ops
    # sparse24-packed, say: torch's int8 / int4 CPU kernels take 16-bit activations).
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--burst-ms", type=float, default=5.0, help="timed calls per round, in ms")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--batch", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument(
        "--shapes",
        default=",".join(f"{n}x{k}" for n, k in MODEL_SHAPES),
        help="comma-separated NxK weight shapes",
    )
    parser.add_argument("--thresholds", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    log.info(
        "torch %s, %d threads, device %s, dtype %s",
        torch.__version__,
        torch.get_num_threads(),
        device,
        dtype,
    )
    target = args.burst_ms / 1e3
    if args.thresholds:
        rows = run_thresholds(shapes, device, dtype, args.rounds, target)
        cells = [
            [op, f"{m}x{n}x{k}", f"{t_fast * 1e6:.1f}", f"{t_alt * 1e6:.1f}", f"{r:.2f}x"]
            for op, m, n, k, t_fast, t_alt, r in rows
        ]
        header = ["op", "MxNxK", "fast path us", "dequant+matmul us", "fast path speed-up"]
        print(format_table(header, cells))
        return
    rows = run_table(
        shapes,
        [int(b) for b in args.batch.split(",")],
        tuple(args.ops.split(",")),
        device,
        dtype,
        args.rounds,
        target,
    )
    print(format_table(HEADER, [r.cells() for r in rows]))
    log.info("backends used: %s", chosen_backends())


if __name__ == "__main__":
    main()
