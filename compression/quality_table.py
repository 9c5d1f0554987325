"""Measure every quantization method on one model and print a markdown table.

    python -m slimserve.compression.quality_table [--model smollm2-135m-instruct] [--threads N]

Each row: a fresh copy of the model, compressed by one spec (timed), then perplexity on the
held-out split and agreement / KL against the uncompressed model. Ends with the quality bars.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import platform
import time
from dataclasses import dataclass

import torch
from pydantic import TypeAdapter

from .evaluation import compare_to_reference, evaluation_ids, perplexity
from .registry import apply_compression
from .report import resident_weight_bytes
from .specs import CompressionSpec

log = logging.getLogger(__name__)

# (row label, spec). Group 64 for the low-bit rows: the hidden size 576 is 4.5 x 128.
ROWS: list[tuple[str, dict]] = [
    ("int8 per-channel (W8A16)", {"method": "int8-weight-only"}),
    ("int8 per-tensor (W8A16)", {"method": "int8-weight-only", "granularity": "per-tensor"}),
    ("LLM.int8() (W8A8 + 16-bit outliers)", {"method": "llm-int8", "threshold": 6.0}),
    ("SmoothQuant W8A8 a=0.5", {"method": "smoothquant-w8a8", "alpha": 0.5}),
    ("SmoothQuant W8A8 a=auto", {"method": "smoothquant-w8a8", "alpha": "auto"}),
    ("GOBO w4 g64 + 16-bit outliers", {"method": "gobo", "bits": 4, "group_size": 64}),
    ("RTN w4 g64", {"method": "rtn", "bits": 4, "group_size": 64}),
    ("GPTQ w4 g64", {"method": "gptq", "bits": 4, "group_size": 64}),
    ("AWQ w4 g64", {"method": "awq", "bits": 4, "group_size": 64}),
    ("RTN w3 g64", {"method": "rtn", "bits": 3, "group_size": 64}),
    ("GPTQ w3 g64", {"method": "gptq", "bits": 3, "group_size": 64}),
    ("AWQ w3 g64", {"method": "awq", "bits": 3, "group_size": 64}),
    ("GPTQ w4 g32", {"method": "gptq", "bits": 4, "group_size": 32}),
    (
        "GPTQ w4 g32, 4x calibration",
        {"method": "gptq", "bits": 4, "group_size": 32, "calibration": {"samples": 128}},
    ),
    # Float zero points at group 32 land exactly on the checkpoint's own Q4_1 grid.
    (
        "RTN w4 g32 float zero",
        {"method": "rtn", "bits": 4, "group_size": 32, "zero_point": "float"},
    ),
]


def stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of the saved state (persistent tensors; a tied pair once): what an artifact holds.

    resident_weight_bytes also counts derived copies kernels keep in memory (e.g. an int4pack
    layout for the CPU matmul), so the two differ for the low-bit rows.
    """
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.untyped_storage().nbytes()
    return total


@dataclass
class Row:
    label: str
    spec: dict
    stored_mb: float
    resident_mb: float
    ppl: float
    agreement: float
    kl: float
    seconds: float


def _measure(label: str, spec: dict | None, reference, eval_ids, compare_ids, args) -> Row:
    model = reference if spec is None else copy.deepcopy(reference)
    seconds = 0.0
    if spec is not None:
        parsed = TypeAdapter(CompressionSpec).validate_python(spec)
        parsed.check_model(model.config)
        started = time.perf_counter()
        report = apply_compression(model, [parsed])
        seconds = time.perf_counter() - started
        log.info("%s: %s %s", label, report.summary(), report.methods[0].detail)
    ppl = perplexity(model, eval_ids, context=args.context, stride=args.stride)
    if spec is None:
        agreement, kl = 1.0, 0.0
    else:
        quality = compare_to_reference(model, reference, compare_ids)
        agreement, kl = quality["agreement"], quality["kl"]
    row = Row(
        label,
        spec or {},
        stored_bytes(model) / 1e6,
        resident_weight_bytes(model) / 1e6,
        ppl,
        agreement,
        kl,
        seconds,
    )
    log.info("%s: ppl %.3f agreement %.4f kl %.4f", label, ppl, agreement, kl)
    del model
    gc.collect()
    return row


def _markdown(rows: list[Row]) -> str:
    full = rows[0].ppl
    lines = [
        "| variant | spec | stored MB | resident MB | PPL | ΔPPL | top-1 agree | KL (nats) "
        "| compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spec = ", ".join(f"{k}: {v}" for k, v in r.spec.items()) or "-"
        delta = f"{100 * (r.ppl / full - 1):+.2f}%" if r.spec else "-"
        lines.append(
            f"| {r.label} | `{spec}` | {r.stored_mb:.1f} | {r.resident_mb:.1f} | {r.ppl:.3f} | "
            f"{delta} | {r.agreement:.4f} | {r.kl:.4f} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def _bars(rows: list[Row]) -> list[str]:
    by = {r.label: r for r in rows}
    full = rows[0].ppl
    out = []

    def check(text: str, ok: bool) -> None:
        out.append(f"- [{'x' if ok else ' '}] {text}")

    for bits in (4, 3):
        rtn = by.get(f"RTN w{bits} g64")
        for method in ("GPTQ", "AWQ"):
            other = by.get(f"{method} w{bits} g64")
            if rtn and other:
                check(
                    f"{method} w{bits} ({other.ppl:.3f}) beats RTN w{bits} ({rtn.ppl:.3f})",
                    other.ppl < rtn.ppl,
                )
    for label in ("int8 per-channel (W8A16)", "SmoothQuant W8A8 a=0.5", "SmoothQuant W8A8 a=auto"):
        if label in by:
            delta = by[label].ppl / full - 1
            check(f"{label} within 1% of full ({100 * delta:+.2f}%)", delta <= 0.01)
    four = [r for r in rows if r.spec.get("method") in ("gptq", "awq") and r.spec.get("bits") == 4]
    for zero_point in ("integer", "float"):
        candidates = [r for r in four if r.spec.get("zero_point", "integer") == zero_point]
        if candidates:
            best = min(candidates, key=lambda r: r.ppl)
            delta = best.ppl / full - 1
            check(
                f"best 4-bit GPTQ/AWQ with {zero_point} zero points, {best.label}, within 5% of "
                f"full ({100 * delta:+.2f}%)",
                delta <= 0.05,
            )
    if "int8 per-channel (W8A16)" in by:
        s = by["int8 per-channel (W8A16)"].seconds
        check(f"int8 compress-on-load under 15 s ({s:.1f} s)", s < 15)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens scored")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--compare-windows", type=int, default=4, help="256-token windows")
    parser.add_argument("--only", nargs="*", help="row labels (substrings) to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from slimserve.models.store import load_model_and_tokenizer

    reference, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    eval_ids = evaluation_ids(tokenizer, max_tokens=args.eval_tokens + 1)
    # Agreement / KL on the start of the held-out text (it is also inside the PPL stream).
    compare_ids = eval_ids[0, : args.compare_windows * 256].reshape(-1, 256)
    rows_to_run = [
        (label, spec)
        for label, spec in ROWS
        if not args.only or any(part.lower() in label.lower() for part in args.only)
    ]
    started = time.perf_counter()
    rows = [_measure("full (bf16)", None, reference, eval_ids, compare_ids, args)]
    for label, spec in rows_to_run:
        rows.append(_measure(label, spec, reference, eval_ids, compare_ids, args))
    total = time.perf_counter() - started
    print(_markdown(rows))
    print()
    print(
        f"{args.model}, {args.dtype}; PPL: {eval_ids.shape[1] - 1} held-out tokens (pydoc "
        f"evaluation split), context {args.context}, stride {args.stride}; agreement / KL: "
        f"{compare_ids.numel()} tokens. torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}; whole table {total:.0f} s."
    )
    print()
    print("\n".join(_bars(rows)))


if __name__ == "__main__":
    main()
