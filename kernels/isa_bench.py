"""Per call, at every ISA level this CPU executes, one thread, best of `--rounds` passes
(kernels/README.md, "Every CPU"):

    python -m slimserve.kernels.isa_bench --op w8a8 --rows 1 8 32 128
    python -m slimserve.kernels.isa_bench --op w8a16 --rows 1 2 4 8 16 32
    python -m slimserve.kernels.isa_bench --op w4a16 --rows 1 8 32

W8A8 runs against the fp32 dense matmul (what a full variant runs where `engine.dtype: auto` is
fp32) and the exact fp32-chunk reference. W8A16 and W4A16 (`--group`, default 64; activations
in `--dtype`, default fp32) run against torch's int8pack / int4pack and the dense matmul in that
dtype. A pass cycles through `--copies`
distinct weight matrices, as a decode step goes through a model's layers, so the weights come
from memory and not from the caches; the figure is per matrix.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import cpu_isa, cpu_paths, native
from .bench import format_table
from .cpu_isa import Isa
from .lowbit import LowBitLinear
from .reference import int8_int8_matmul_reference, quantize_per_token_int8

SHAPES = ((1536, 576), (576, 1536))


def best_us(calls: Sequence[Callable[[], object]], rounds: int) -> float:
    """Best time of one pass over `calls`, per call."""
    for call in calls:
        call()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for call in calls:
            call()
        best = min(best, time.perf_counter() - started)
    return best / len(calls) * 1e6


def _weights(n: int, k: int, copies: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    qweights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
    scales = [torch.rand(n) * 1e-2 for _ in range(copies)]
    return qweights, scales


def w8a8_rows(levels: list[Isa], rows: list[int], rounds: int, copies: int) -> list[list[str]]:
    cells = []
    for n, k in SHAPES:
        qweights, scales = _weights(n, k, copies)
        dense = [torch.randn(n, k) for _ in range(copies)]
        packs = {}
        for level in levels:
            kernels = native.kernels_for(level)
            if kernels is not None:
                packs[level] = (kernels, [kernels.w8a8_pack(q) for q in qweights])
        for count in rows:
            x = torch.randn(count, k)
            row = [f"{n} x {k}", str(count)]
            for level in levels:
                if level not in packs:
                    row.append("-")
                    continue
                kernels, packed = packs[level]
                calls = [
                    functools.partial(kernels.w8a8_gemm, x, p, s)
                    for p, s in zip(packed, scales, strict=True)
                ]
                row.append(f"{best_us(calls, rounds):.0f}")
            row.append(f"{best_us([functools.partial(F.linear, x, d) for d in dense], rounds):.0f}")
            codes = quantize_per_token_int8(x)[0]
            reference = functools.partial(int8_int8_matmul_reference, codes, qweights[0])
            row.append(f"{best_us([reference], max(rounds // 4, 1)):.0f}")
            cells.append(row)
    return cells


Calls = list[Callable[[], object]] | None  # None: the path does not take this call


def weight_only_rows(
    levels: list[Isa],
    rows: list[int],
    rounds: int,
    make_weights: Callable[[int, int], object],
    native_calls: Callable[[native.NativeKernels, torch.Tensor, list], Calls],
    torch_calls: Callable[[torch.Tensor, list], Calls],
    copies: int,
    dtype: torch.dtype,
) -> list[list[str]]:
    """One row per shape and row count: our kernel at each level, torch's kernel, dense."""

    def cell(calls: Calls) -> str:
        return "-" if calls is None else f"{best_us(calls, rounds):.0f}"

    cells = []
    for n, k in SHAPES:
        weights = [make_weights(n, k) for _ in range(copies)]
        dense = [torch.randn(n, k).to(dtype) for _ in range(copies)]
        for count in rows:
            x = torch.randn(count, k).to(dtype)
            row = [f"{n} x {k}", str(count)]
            for level in levels:
                kernels = native.kernels_for(level)
                row.append(cell(None if kernels is None else native_calls(kernels, x, weights)))
            row.append(cell(torch_calls(x, weights)))
            row.append(cell([functools.partial(F.linear, x, d) for d in dense]))
            cells.append(row)
    return cells


def w8a16_rows(
    levels: list[Isa], rows: list[int], rounds: int, copies: int, dtype: torch.dtype
) -> list[list[str]]:
    def make(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) * 1e-2

    def ours(kernels: native.NativeKernels, x: torch.Tensor, weights: list) -> Calls:
        if x.shape[0] > kernels.w8a16_max_rows:
            return None
        return [functools.partial(kernels.w8a16_gemv, x, q, s) for q, s in weights]

    def torchs(x: torch.Tensor, weights: list) -> Calls:
        if not cpu_paths.int8pack_supported(x, x.shape[1]):
            return None
        return [functools.partial(cpu_paths.int8pack_matmul, x, q, s) for q, s in weights]

    return weight_only_rows(levels, rows, rounds, make, ours, torchs, copies, dtype)


def w4a16_rows(
    levels: list[Isa], rows: list[int], rounds: int, copies: int, dtype: torch.dtype, group: int
) -> list[list[str]]:
    def make(n: int, k: int) -> LowBitLinear:
        codes = torch.randint(0, 16, (n, k))
        scales = torch.rand(n, k // group) * 1e-2
        zeros = torch.rand(n, k // group) * 15
        return LowBitLinear.from_codes(codes, scales, zeros, group, 4, None, dtype)

    def ours(kernels: native.NativeKernels, x: torch.Tensor, modules: list) -> Calls:
        gemv = kernels.w4a16_gemv
        return [
            functools.partial(gemv, x, mod.qweight, mod.scales, mod.zeros, group) for mod in modules
        ]

    def torchs(x: torch.Tensor, modules: list) -> Calls:
        if modules[0].cpu_qweight is None or x.shape[0] > cpu_paths.LOWBIT_INT4PACK_MAX_M:
            return None
        return [
            functools.partial(
                cpu_paths.int4pack_matmul, x, mod.cpu_qweight, group, mod.cpu_scales_zeros
            )
            for mod in modules
        ]

    return weight_only_rows(levels, rows, rounds, make, ours, torchs, copies, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--op", choices=["w8a8", "w8a16", "w4a16"], default="w8a8")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--copies", type=int, default=32, help="distinct weights per pass")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="W8A16 / W4A16"
    )
    parser.add_argument("--group", type=int, default=64, help="W4A16's group size")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    levels = cpu_isa.runnable()
    if args.op == "w8a8":
        header = ["N x K", "rows", *(f"W8A8 {level.label} us" for level in levels)]
        header += ["fp32 dense us", "W8A8 reference us"]
        cells = w8a8_rows(levels, args.rows, args.rounds, args.copies)
    elif args.op == "w8a16":
        header = ["N x K", "rows", *(f"W8A16 {level.label} us" for level in levels)]
        header += ["torch int8pack us", f"{args.dtype} dense us"]
        cells = w8a16_rows(levels, args.rows, args.rounds, args.copies, dtype)
    else:
        header = ["N x K", "rows", *(f"W4A16 {level.label} us" for level in levels)]
        header += ["torch int4pack us", f"{args.dtype} dense us"]
        cells = w4a16_rows(levels, args.rows, args.rounds, args.copies, dtype, args.group)
    print(f"CPU kernels at levels {[level.label for level in levels]}, one thread")
    print(format_table(header, cells))


if __name__ == "__main__":
    main()
