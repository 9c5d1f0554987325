"""Per call, a dense projection at the default model's shapes: oneDNN's prepacked matmul (one
torch thread) against our own GEMM's copy (`PackedLinear`'s native path) at 1 and 2 kernel
threads (kernels/README.md, "Our own bf16 GEMM for every dense projection"):

    python -m slimserve.kernels.dense_bench --dtype bfloat16 --rows 1 8 32 --copies 30

A pass cycles through `--copies` distinct weights (one for the lm_head, whose single copy is
already far larger than the caches), as a decode step goes through a model's layers, so the
weights come from memory; the figure is per call, best of `--rounds` passes. Our bf16 GEMM
needs AVX-512 BF16; where the CPU has AMX-BF16 it is measured on its AVX-512 tiles and on AMX
tiles (`cpu_bf16_amx.h`, from 3 rows). For the avx2 level as an AVX2-only CPU runs it
(our fp32 GEMM against oneDNN's AVX2 kernels):

    SLIMSERVE_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python -m slimserve.kernels.dense_bench --dtype float32 --rows 1 8 32 128

`--int8` measures our W8A16 GEMM (the int8 variant's, on the weights as int8 codes) instead,
on its VNNI tiles and, where the CPU has AMX, its AMX-INT8 tiles (from 16 rows).
"""

from __future__ import annotations

import argparse
import functools

import torch

from . import native
from .bench import format_table
from .dense_cpu import PACK_BATCH_HINT
from .isa_bench import best_us

# qkv, o, gate_up, down, lm_head of SmolLM2-135M (N x K).
SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))
LARGE = 10_000_000  # weights of more elements than this get one copy


def onednn_calls(x: torch.Tensor, weights: list[torch.Tensor]) -> list:
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT) for w in weights]
    return [
        functools.partial(torch.ops.mkldnn._linear_pointwise, x, p, None, "none", [], "")
        for p in packed
    ]


def w8a16_calls(kernels: native.NativeKernels, x: torch.Tensor, weights: list) -> list | None:
    """Our W8A16 GEMM's calls on the weights rounded to int8 codes (one scale per channel), as
    the int8 variant serves them once packed."""
    if not kernels.w8a16_gemm_available:
        return None
    calls = []
    for w in weights:
        scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
        codes = (w.float() / scale[:, None]).round().to(torch.int8)
        calls.append(functools.partial(kernels.w8a16_gemm, x, kernels.w8a8_pack(codes), scale))
    return calls


def native_calls(
    kernels: native.NativeKernels, x: torch.Tensor, weights: list, bf16_storage: bool = False
) -> list | None:
    """Our GEMM's calls; bf16 weights in the plain layout (the coded one is measured on the
    model's own weights by `loadtests.decode_profile --bf16-layout`); fp32 weights packed in
    fp32, or in bf16 (`bf16_storage`: they are bf16 numbers here, as a bf16 checkpoint's are
    when it is served in fp32)."""
    n = weights[0].shape[0]
    if x.dtype == torch.bfloat16:
        if not kernels.bf16_gemm_available:
            return None
        packed = [kernels.bf16_pack(w, coded=False) for w in weights]
        return [functools.partial(kernels.bf16_gemm, x, p, n, None) for p in packed]
    packed = [kernels.f32_pack(w, bf16_storage=bf16_storage) for w in weights]
    return [functools.partial(kernels.f32_gemm, x, p, n, None) for p in packed]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--copies", type=int, default=30, help="distinct weights per pass")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="kernel threads")
    parser.add_argument(
        "--int8", action="store_true", help="ours: the W8A16 GEMM on the weights as int8 codes"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kernels = native.kernels()
    if kernels is None:
        raise SystemExit("slimserve's native CPU kernels do not load here (see the log)")
    dtype = getattr(torch, args.dtype)
    fp32 = dtype == torch.float32
    default_amx = kernels.amx
    # AMX off, then on (the bf16 GEMM from 3 rows, the W8A16 one from 16), where it can be here.
    amx_modes = [False] + ([True] if (args.int8 or not fp32) and kernels.set_amx(True) else [])
    cells = []
    for count in args.rows:
        for n, k in SHAPES:
            copies = 1 if n * k > LARGE else args.copies
            # bf16 numbers in either dtype: a bf16 checkpoint's weights, as the model's are.
            weights = [torch.randn(n, k).bfloat16().to(dtype) for _ in range(copies)]
            x = torch.randn(count, k).to(dtype)
            row = [
                str(count),
                f"{n} x {k}",
                f"{best_us(onednn_calls(x, weights), args.rounds):.0f}",
            ]
            if args.int8:
                ours_calls = [w8a16_calls(kernels, x, weights)]
            else:
                ours_calls = [native_calls(kernels, x, weights, bf16_storage=False)]
                if fp32:
                    ours_calls.append(native_calls(kernels, x, weights, bf16_storage=True))
            for ours in ours_calls:
                for amx in amx_modes:
                    kernels.set_amx(amx)
                    for threads in args.threads:
                        kernels.set_threads(threads)
                        row.append("-" if ours is None else f"{best_us(ours, args.rounds):.0f}")
            kernels.set_threads(1)
            cells.append(row)
    kernels.set_amx(default_amx)
    header = ["rows", "N x K", "oneDNN prepacked us", *(f"ours {t} thr us" for t in args.threads)]
    if len(amx_modes) > 1:
        header += [f"ours on AMX, {t} thr us" for t in args.threads]
    if fp32 and not args.int8:
        header += [f"ours, bf16 weights, {t} thr us" for t in args.threads]
    ours = "the W8A16 GEMM on int8 weights" if args.int8 else f"{args.dtype} weights"
    print(f"{args.dtype} activations, ours: {ours}, ISA level {kernels.isa.label}")
    print(format_table(header, cells))


if __name__ == "__main__":
    main()
