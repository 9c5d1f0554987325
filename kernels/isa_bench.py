"""W8A8 per call at every ISA level this CPU executes, against the fp32 dense matmul (what a full
variant runs where `engine.dtype: auto` is fp32) and the exact fp32-chunk reference, one thread,
best of `--rounds` calls (kernels/README.md, "Every CPU").

    python -m slimserve.kernels.isa_bench --rows 1 8 32 128
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import cpu_isa, native
from .bench import format_table
from .reference import int8_int8_matmul_reference, quantize_per_token_int8

SHAPES = ((1536, 576), (576, 1536))


def best_us(call: Callable[[], object], rounds: int) -> float:
    call()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    levels = cpu_isa.runnable()
    header = ["N x K", "rows", *(f"W8A8 {level.label} us" for level in levels)]
    header += ["fp32 dense us", "W8A8 reference us"]
    cells = []
    for n, k in SHAPES:
        qweight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        wscale = torch.rand(n) * 1e-2
        dense = torch.randn(n, k)
        packs = {}
        for level in levels:
            kernels = native.kernels_for(level)
            if kernels is not None:
                packs[level] = (kernels, kernels.w8a8_pack(qweight))
        for rows in args.rows:
            x = torch.randn(rows, k)
            row = [f"{n} x {k}", str(rows)]
            for level in levels:
                if level not in packs:
                    row.append("-")
                    continue
                kernels, packed = packs[level]
                call = functools.partial(kernels.w8a8_gemm, x, packed, wscale)
                row.append(f"{best_us(call, args.rounds):.0f}")
            row.append(f"{best_us(functools.partial(F.linear, x, dense), args.rounds):.0f}")
            codes = quantize_per_token_int8(x)[0]
            reference = functools.partial(int8_int8_matmul_reference, codes, qweight)
            row.append(f"{best_us(reference, max(args.rounds // 4, 1)):.0f}")
            cells.append(row)
    print(f"CPU kernels at levels {[level.label for level in levels]}, one thread")
    print(format_table(header, cells))


if __name__ == "__main__":
    main()
